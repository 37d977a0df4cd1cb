"""kNN stage vs the number of IVF cells (nprobe 1, the model's PCA search space), as the pipeline sees it:
each search right after an INT8 ONNX Runtime feature call, batch 1 and 8; plus how often the approximate
nearest-neighbour distance differs from the exact one (in the same search space) on test patches.

    .venv/bin/python benchmarks/knn_nlist.py MODEL_DIR [DATA] [NLIST ...]

MODEL_DIR needs `hyads export MODEL_DIR --int8`. Figures are ms per image, median of 40 passes over 8 test
images; rows alternate so drift hits all of them.
"""

from __future__ import annotations

import sys

import numpy as np

from hyads.detectors.patchcore import NearestNeighbourIndex
from knn_dims import setup, timed_pass  # sibling script (benchmarks/ is on sys.path when run as a script)


def main(model_dir: str, data: str, nlists: list[int], reps: int = 40) -> None:
    model, x, q, per_image, sess = setup(model_dir, data, "features.int8.onnx")
    c = model.config
    bank = model.bank_.bank_
    exact = NearestNeighbourIndex(bank, "flat", pca_dim=c.knn_dim).search(q)
    indexes = {n: NearestNeighbourIndex(bank, "ivf", nlist=n, nprobe=1, seed=c.seed, pca_dim=c.knn_dim) for n in nlists}

    def one_pass(search, batch: int) -> tuple[float, float]:
        return timed_pass(sess, x, q, per_image, search, batch)

    rows: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _ in range(reps):
        for n, ix in indexes.items():
            for batch in (1, 8):
                rows.setdefault((n, batch), []).append(one_pass(ix.search, batch))
    print(f"bank {bank.shape[0]} rows, search space {c.knn_dim or bank.shape[1]} dims, {per_image} queries per image")
    print("| IVF cells | batch | INT8 features ms | kNN ms | kNN share of features + kNN | queries with the exact NN distance | mean distance excess |")
    print("|---|---|---|---|---|---|---|")
    for (n, batch), ts in rows.items():
        f, k = (1000 * float(np.median([t[j] for t in ts[1:]])) / len(x) for j in (0, 1))
        approx = indexes[n].search(q)
        same = float(np.mean(np.isclose(approx, exact, rtol=1e-4, atol=1e-5)))
        excess = float(np.mean(approx / np.maximum(exact, 1e-9) - 1))
        print(f"| {n} | {batch} | {f:.2f} | {k:.2f} | {100 * k / (f + k):.1f} % | {100 * same:.1f} % | {100 * excess:.2f} % |")


if __name__ == "__main__":
    args = sys.argv[1:]
    data = args[1] if len(args) > 1 and not args[1].isdigit() else "../shared/data/mvtec_ad/bottle"
    nl = [int(a) for a in args[1:] if a.isdigit()] or [277, 554, 1108]
    main(args[0], data, nl)

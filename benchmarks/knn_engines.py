"""kNN engines on synthetic clustered banks: hyads's IVF list scan (detectors/ivf_scan.py) against faiss's IVF
search, ms per image (1,024 queries; 8 images per call, each its own rerank group), median of 10 calls, with
the same cells, nprobe, PCA and 5 % rerank. Shows where each wins, which sets NearestNeighbourIndex.SCAN_MAX_WORK
(the "auto" engine's threshold on nprobe x mean cell rows x dims).

    .venv/bin/python benchmarks/knn_engines.py
"""

from __future__ import annotations

import numpy as np

from hyads.detectors.patchcore import NearestNeighbourIndex
from knn_overhead import median_ms  # sibling script (benchmarks/ is on sys.path when run as a script)


def main() -> None:
    rng = np.random.default_rng(0)
    print("| bank rows | dims searched | nprobe | nlist | work per query | scan ms/img | faiss ms/img |")
    print("|---|---|---|---|---|---|---|")
    for rows, pca, nprobe in [(4813, 64, 1), (19251, 64, 1), (19251, 0, 8), (214016, 64, 1), (214016, 64, 8)]:
        centres = rng.normal(size=(300, 152)).astype(np.float32) * 3
        bank = (centres[rng.integers(0, 300, rows)] + rng.normal(size=(rows, 152))).astype(np.float32)
        q = (centres[rng.integers(0, 300, 8192)] + rng.normal(size=(8192, 152))).astype(np.float32)
        out = []
        for engine in ("scan", "faiss"):
            ix = NearestNeighbourIndex(bank, "ivf", nprobe=nprobe, pca_dim=pca, rerank=0.05,
                                       rerank_nprobe=max(8, 2 * nprobe), engine=engine)
            out.append(median_ms(lambda: ix.search(q, 1024), reps=10) / 8)
        nlist = max(16, int(2 * np.sqrt(rows)))  # NearestNeighbourIndex's default
        work = nprobe * rows / nlist * (pca or 152)
        print(f"| {rows:,} | {pca or 152} | {nprobe} | {nlist} | {work:,.0f} | {out[0]:.2f} | {out[1]:.2f} |")


if __name__ == "__main__":
    main()

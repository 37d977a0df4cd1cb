"""kNN search options at the bottle bank size: time per image and accuracy, measured in one process.

    .venv/bin/python benchmarks/knn_options.py ../shared/data/mvtec_ad/bottle

Features are extracted once (torch); every option searches the same test-image patches. Time = median over
repetitions of searching one batch of 8 images' patches, divided by 8. Accuracy: image and pixel AUROC with
the usual upsampling + smoothing of the distances.
"""

from __future__ import annotations

import sys
import time

import faiss
import numpy as np
import torch

from hyads import HyADS
from hyads import metrics as M
from hyads.data import load_dataset
from hyads.detectors.patchcore import NearestNeighbourIndex, Reservoir, greedy_coreset
from hyads.evaluation import gt_masks


def main(root: str) -> None:
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    ds = load_dataset(root)
    model = HyADS(seed=0)
    model.progress = False
    model._build_features()
    train = np.concatenate([model._patches(rgb) for rgb in model._batches(ds.train, "train")])
    n, g, _, d = train.shape
    train = train.reshape(-1, d)
    test = np.concatenate([model._patches(rgb) for rgb in model._batches([s.path for s in ds.test], "test")])
    labels = np.array([s.label for s in ds.test])
    gts = gt_masks(ds.test, model.config.image_size)
    res = Reservoir(int(0.1 * len(train)), d, 0)
    res.update(train)
    bank10 = res.filled.copy()
    proj = np.random.default_rng(0).normal(size=(d, 64)).astype(np.float32) / 8.0
    t0 = time.perf_counter()
    core1 = train[greedy_coreset(train, int(0.01 * len(train)), 64, 0)]
    t_core = time.perf_counter() - t0
    hnsw = faiss.IndexHNSWFlat(d, 16)
    hnsw.hnsw.efSearch = 32
    hnsw.add(bank10)

    class Hnsw:
        kind = "hnsw (M=16, efSearch=32)"

        def search(self, q):
            dist, _ = hnsw.search(np.ascontiguousarray(q, np.float32), 1)
            return np.sqrt(np.maximum(dist[:, 0], 0))

    options = [
        ("reservoir 10 %, IVF nprobe 4 (default)", bank10, NearestNeighbourIndex(bank10, "auto", nprobe=4), None),
        ("reservoir 10 %, exact", bank10, NearestNeighbourIndex(bank10, "flat"), None),
        ("reservoir 10 %, HNSW", bank10, Hnsw(), None),
        ("reservoir 10 %, IVF nprobe 1", bank10, NearestNeighbourIndex(bank10, "ivf", nprobe=1), None),
        ("coreset 1 %, exact", core1, NearestNeighbourIndex(core1, "flat"), None),
        ("coreset 1 %, 64-d projection, exact", core1 @ proj, NearestNeighbourIndex(core1 @ proj, "flat"), proj),
        ("reservoir 10 %, 64-d projection, IVF nprobe 4", bank10 @ proj, NearestNeighbourIndex(bank10 @ proj, "auto", nprobe=4), proj),
    ]
    print(f"bank rows: reservoir {len(bank10)}, coreset {len(core1)} (selection {t_core:.1f} s); {g * g} queries per image")
    print("| option | bank rows | kNN ms / image | image AUROC | pixel AUROC |")
    print("|---|---|---|---|---|")
    q8 = test[:8].reshape(-1, d)
    for name, bank, index, p in options:
        q = q8 @ p if p is not None else q8
        index.search(q)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            index.search(q)
            times.append(time.perf_counter() - t)
        ms = float(np.median(times)) / 8 * 1000
        flat = test.reshape(-1, d)
        dist = index.search(flat @ p if p is not None else flat).reshape(len(test), 1, g, g)
        maps = model._upsample_smooth(dist)
        scores = maps.reshape(len(maps), -1).max(1)
        print(f"| {name} | {len(bank)} | {ms:.2f} | {M.auroc(labels, scores):.4f} | {M.auroc(gts, maps):.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mvtec_ad/bottle")

"""Memory bank at scale: memory, search time and AUROC of faiss index options at 1x, 10x, 100x the bottle bank.

The bank is grown with more patches: 10x = every patch of the 188 bottle training images (the default bank
keeps 10 %), 100x = every patch of 10 augmented copies of each image (flips, 90-degree rotations, +-4 %
brightness). AUROC is measured on a fixed subset of the test set (all 20 normal + every 3rd defect image) so
that exact search at 100x stays affordable on 2 cores. fp16 flat search is skipped at 100x (no BLAS path:
8x slower than fp32 flat at 10x).

Run: .venv/bin/python benchmarks/bank_scale.py runs/bottle-reservoir ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from hyads import load_model, metrics as M
from hyads.data import load_dataset, load_mask
from hyads.detectors.patchcore import NearestNeighbourIndex
from hyads.pipeline import _to_rgb


def augment(rgb: np.ndarray, k: int) -> np.ndarray:
    ops = [lambda x: x, lambda x: x[:, ::-1], lambda x: x[::-1], lambda x: np.rot90(x, 1), lambda x: np.rot90(x, 2),
           lambda x: np.rot90(x, 3), lambda x: x.transpose(1, 0, 2), lambda x: np.clip(x * 1.04, 0, 1),
           lambda x: np.clip(x * 0.96, 0, 1), lambda x: np.rot90(x[:, ::-1], 1)]
    return np.ascontiguousarray(ops[k](rgb))


def main(model_dir: str, data: str) -> None:
    model = load_model(model_dir)
    model.progress = False
    size = model.config.image_size
    ds = load_dataset(data)
    train = [_to_rgb(p, size) for p in ds.train]
    patches = []
    t = time.perf_counter()
    for k in range(10):
        for i in range(0, len(train), 8):
            p = model._patches(np.stack([augment(x, k) for x in train[i : i + 8]]))
            patches.append(p.reshape(-1, p.shape[-1]))
    allp = np.concatenate(patches)
    print(f"extracted {len(allp)} patches in {time.perf_counter() - t:.0f} s", flush=True)
    n_identity = sum(len(p) for p in patches[: (len(train) + 7) // 8])  # the un-augmented copy
    base = model.bank_.bank_
    banks = {"1x": base, "10x": allp[:n_identity], "100x": allp}
    test = [s for s in ds.test if s.label == 0] + [s for s in ds.test if s.label == 1][::3]
    labels = np.array([s.label for s in test])
    gts = np.stack([load_mask(s.mask_path, size=size) if s.mask_path else np.zeros((size, size), bool) for s in test])
    q = np.concatenate([model._patches(np.stack([_to_rgb(s.path, size) for s in test[i : i + 8]]))
                        for i in range(0, len(test), 8)])
    grid = q.shape[1]
    qf = q.reshape(-1, q.shape[-1])
    rows = []
    exact_auroc = {}
    for scale, bank in banks.items():
        for kind, f16 in (("flat", False), ("flat", True), ("ivf", False), ("ivf", True), ("ivfpq", False)):
            if kind == "flat" and f16 and len(bank) > 500_000:
                continue  # fp16 flat search has no BLAS path: ~8x slower than fp32 flat, hours at this size
            t = time.perf_counter()
            index = NearestNeighbourIndex(bank, kind, nprobe=8, float16=f16)
            build = time.perf_counter() - t
            index.search(qf[: grid * grid])
            t = time.perf_counter()
            d = index.search(qf)
            search_ms = 1000 * (time.perf_counter() - t) / len(test)
            maps = model._upsample_smooth(d.reshape(len(test), 1, grid, grid))
            img = M.auroc(labels, maps.reshape(len(test), -1).max(1))
            pix = M.auroc(gts, maps)
            if kind == "flat" and not f16:
                exact_auroc[scale] = (img, pix)
            row = {"scale": scale, "rows": len(bank), "index": index.kind, "memory_mib": index.memory_bytes() / 2**20,
                   "build_s": build, "search_ms_per_image": search_ms, "image_auroc": img, "pixel_auroc": pix,
                   "pixel_auroc_change_vs_exact": pix - exact_auroc[scale][1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| scale | rows | index | memory MiB | build s | search ms/img | image AUROC | pixel AUROC | Δ pixel vs exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']} | {r['rows']:,} | {r['index']} | {r['memory_mib']:.1f} | {r['build_s']:.1f} | "
              f"{r['search_ms_per_image']:.1f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
              f"{r['pixel_auroc_change_vs_exact']:+.4f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])

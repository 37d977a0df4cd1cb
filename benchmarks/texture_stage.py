"""Where the texture stage's time goes: per image, LBP codes, LBP cell histograms, HOG, the neighbourhood
filter, and the texture-bank search, for a saved model with a texture detector (median of REPS passes over
the images, one thread pool of `--threads`).

    .venv/bin/python benchmarks/texture_stage.py runs/neu_seg_ctx/model ../shared/data/neu_seg/JPEGImages
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter
from skimage.feature import hog, local_binary_pattern

from hyads import HyADS
from hyads.features import texture as tex
from hyads.pipeline import _to_rgb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("images")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    model = HyADS.load(a.model)
    model.progress = False
    S = model.config.image_size
    paths = sorted(p for p in Path(a.images).iterdir() if p.suffix.lower() in (".jpg", ".png", ".bmp"))[: a.n]
    rgb = np.stack([_to_rgb(str(p), S) for p in paths])
    grays = [tex.to_gray(x) for x in rgb]
    g = S // tex.CELL

    def lbp_codes():
        return [local_binary_pattern((x * 255).astype(np.uint8), P=8, R=1, method="uniform") for x in grays]

    codes = [c.astype(np.int64) for c in lbp_codes()]

    def lbp_hist():
        return [np.eye(tex.LBP_BINS, dtype=np.float32)[c].reshape(g, tex.CELL, g, tex.CELL, -1).mean(axis=(1, 3))
                for c in codes]

    def hogs():
        return [hog(x, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2-Hys",
                    feature_vector=False) for x in grays]

    desc = np.stack([tex.texture_descriptors(x) for x in grays])

    def neighbourhood():
        return uniform_filter(desc, size=(1, 3, 3, 1), mode="nearest")

    smoothed = neighbourhood()

    def search():  # standardise, exact search in the texture bank, upsample + smooth the map
        return model._texture_maps(rgb, smoothed)

    stages = {"LBP codes": lbp_codes, "LBP histograms": lbp_hist, "HOG": hogs, "3x3 neighbourhood": neighbourhood,
              "bank search + map": search,
              "descriptors, 1 thread": lambda: tex.batch_descriptors(rgb, threads=1),
              f"descriptors, {a.threads} threads": lambda: tex.batch_descriptors(rgb, threads=a.threads),
              "whole stage (descriptors + maps)": lambda: model._texture_maps(rgb)}
    print(f"{len(paths)} images at {S} px, texture bank {len(model.texture_reservoir_.filled)} x {tex.DIM}")
    for name, fn in stages.items():
        fn()
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"{name:40s} {1000 * statistics.median(times) / len(paths):7.2f} ms per image", flush=True)


if __name__ == "__main__":
    main()

"""Texture descriptors (LBP + HOG from scikit-image) as dense maps, and a texture-only anomaly detector.

Per 8x8 cell: the histogram of uniform LBP codes (radius 1, 8 neighbours: 10 bins) and the HOG block
descriptor (9 orientations, 8x8 cells, 2x2 blocks: 36 values) of the block starting at that cell. Everything
is vectorised (one-hot + reshape-mean for the histograms); no Python loop over pixels.

Anomaly scoring choice: distance to the nearest descriptor in a bank of normal descriptors (standardised per
dimension), not per-location Gaussian statistics. A bank works for both aligned objects (bottle) and
unaligned textured surfaces (magnetic tile, NEU steel), where per-location statistics would mix unrelated
texture; it is also the same mechanism as PatchCore, so the fusion sees comparable maps.
"""

from __future__ import annotations

import numpy as np
from skimage.feature import hog, local_binary_pattern

from ..utils import thread_map

CELL = 8
LBP_BINS = 10  # uniform LBP with P=8 has P + 2 codes
HOG_DIM = 36
DIM = LBP_BINS + HOG_DIM


def to_gray(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def texture_descriptors(gray: np.ndarray) -> np.ndarray:
    """(S, S) gray in [0, 1] -> (S/8, S/8, 46) per-cell [LBP histogram, HOG block] descriptors."""
    s = gray.shape[0]
    g = s // CELL
    codes = local_binary_pattern((gray * 255).astype(np.uint8), P=8, R=1, method="uniform").astype(np.int64)
    onehot = np.eye(LBP_BINS, dtype=np.float32)[codes[: g * CELL, : g * CELL]]
    lbp = onehot.reshape(g, CELL, g, CELL, LBP_BINS).mean(axis=(1, 3))
    h = hog(gray, orientations=9, pixels_per_cell=(CELL, CELL), cells_per_block=(2, 2), block_norm="L2-Hys",
            feature_vector=False)  # (g-1, g-1, 2, 2, 9)
    h = h.reshape(h.shape[0], h.shape[1], HOG_DIM).astype(np.float32)
    h = np.pad(h, ((0, g - h.shape[0]), (0, g - h.shape[1]), (0, 0)), mode="edge")
    return np.concatenate([lbp, h], axis=2)


def batch_descriptors(rgb: np.ndarray, neighbourhood: int = 3, threads: int | None = None) -> np.ndarray:
    """(B, S, S, 3) -> (B, g, g, 46), each cell averaged with its k x k neighbours (local histograms).

    Images are described in parallel threads (default: torch's thread count, which `--threads` sets):
    scikit-image's LBP and HOG kernels release the GIL, and they are single-threaded per image."""
    from scipy.ndimage import uniform_filter

    def describe(x: np.ndarray) -> np.ndarray:
        return texture_descriptors(to_gray(x))

    out = np.stack(thread_map(describe, rgb, threads))
    if neighbourhood > 1:
        out = uniform_filter(out, size=(1, neighbourhood, neighbourhood, 1), mode="nearest")
    return out

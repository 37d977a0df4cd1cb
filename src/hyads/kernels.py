"""Small compiled loops (numba) for the per-image work between the backbone and the verdict.

Why not torch for these: torch runs every op on its OpenMP pool, whose idle threads spin after each parallel
region; the next batch's image decoding then shared the cores with spinning threads and took 1.5 ms per image
instead of ~0.9 (docs/RESULTS.md). These loops are single-threaded and leave no pool behind. Compiled on first
use and cached on disk, so later processes load them in ~0.2 s.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _ivf_scan(z: np.ndarray, cells: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each query z[i] to the nearest row of the cells cells[i, :], where cell c holds
    rows[offsets[c]:offsets[c + 1]]."""
    nq, d = z.shape
    out = np.empty(nq, np.float32)
    for i in range(nq):
        best = np.float32(np.inf)
        for p in range(cells.shape[1]):
            c = cells[i, p]
            for r in range(offsets[c], offsets[c + 1]):
                s = np.float32(0.0)
                for j in range(d):
                    t = z[i, j] - rows[r, j]
                    s += t * t
                if s < best:
                    best = s
        out[i] = best
    return out


def _upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """(B, h, w) -> (B, size, size), bilinear with half-pixel centres: torch's
    F.interpolate(mode="bilinear", align_corners=False) without antialiasing, same arithmetic order."""
    b, h, w = x.shape
    out = np.empty((b, size, size), np.float32)
    sy, sx = np.float32(h / size), np.float32(w / size)
    x0 = np.empty(size, np.int64)
    x1 = np.empty(size, np.int64)
    lx0 = np.empty(size, np.float32)
    lx1 = np.empty(size, np.float32)
    for ox in range(size):  # source columns and weights, shared by every row
        fx = max(sx * (np.float32(ox) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
        x0[ox] = int(fx)
        x1[ox] = x0[ox] + 1 if x0[ox] < w - 1 else x0[ox]
        lx1[ox] = fx - np.float32(x0[ox])
        lx0[ox] = np.float32(1.0) - lx1[ox]
    rowx = np.empty((h, size), np.float32)
    for k in range(b):
        for r in range(h):  # interpolate every source row along x once ...
            for ox in range(size):
                rowx[r, ox] = lx0[ox] * x[k, r, x0[ox]] + lx1[ox] * x[k, r, x1[ox]]
        for oy in range(size):  # ... then each output row is a blend of two of them (contiguous: vectorises)
            fy = max(sy * (np.float32(oy) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
            y0 = int(fy)
            y1 = y0 + 1 if y0 < h - 1 else y0
            ly1 = fy - np.float32(y0)
            ly0 = np.float32(1.0) - ly1
            for ox in range(size):
                out[k, oy, ox] = ly0 * rowx[y0, ox] + ly1 * rowx[y1, ox]
    return out


_COMPILED: dict[str, Callable[..., Any]] = {}


def _jit(fn: Callable[..., Any], fastmath: bool) -> Callable[..., Any]:
    if fn.__name__ not in _COMPILED:
        import numba

        try:  # machine code cached beside this module (or in numba's user cache) for later processes
            _COMPILED[fn.__name__] = numba.njit(cache=True, fastmath=fastmath, nogil=True)(fn)
        except RuntimeError:  # no writable cache location: compile in each process (~0.5 s)
            _COMPILED[fn.__name__] = numba.njit(fastmath=fastmath, nogil=True)(fn)
    return _COMPILED[fn.__name__]


def ivf_scan(z: np.ndarray, cells: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # fastmath: lets the distance loop vectorise (sums in a different order: last-bit differences only)
    return _jit(_ivf_scan, True)(z, cells, offsets, rows)


def upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    return _jit(_upsample_bilinear, False)(np.ascontiguousarray(x, dtype=np.float32), int(size))

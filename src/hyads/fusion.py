"""Fusion of anomaly maps: per-map normalisation on normal images, and weights chosen by grid search.

Each map is standardised with the mean and standard deviation of its values on held-out normal images, so
the weights compare like with like. Weights lie on the simplex (step 0.1 by default) and are chosen to
maximise F1 on validation data: pixel F1-max when defect masks exist (real, or synthetic defects pasted on
held-out normal images), image F1-max otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from .metrics import f1_max


def map_stats(maps: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a stack of normal maps (the std never zero)."""
    m = float(np.mean(maps))
    s = float(np.std(maps))
    return m, s if s > 1e-12 else 1.0


def fuse(maps: Mapping[str, np.ndarray], weights: Mapping[str, float],
         stats: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """Weighted sum of standardised maps; a single map with weight 1 is returned unchanged (raw units)."""
    active = [k for k, w in weights.items() if w > 0]
    if len(active) == 1 and weights[active[0]] == 1.0 and len(weights) == 1:
        return maps[active[0]]
    out = None
    for k in active:
        mean, std = stats[k]
        term = (weights[k] / std) * (maps[k] - mean)
        out = term if out is None else out + term
    assert out is not None, "at least one weight must be positive"
    return out.astype(np.float32)


def simplex_grid(names: list[str], step: float = 0.1) -> list[dict[str, float]]:
    n = int(round(1 / step))
    grid = []
    for combo in itertools.product(range(n + 1), repeat=len(names)):
        if sum(combo) == n:
            grid.append({k: c / n for k, c in zip(names, combo)})
    return grid


def _downsample(maps: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return maps
    n, h, w = maps.shape
    return maps[:, : h - h % factor, : w - w % factor].reshape(n, h // factor, factor, w // factor, factor).mean((2, 4))


def search_inputs(maps: Mapping[str, np.ndarray], labels: np.ndarray, masks: np.ndarray | None,
                  downsample: int = 4) -> tuple[Mapping[str, np.ndarray], np.ndarray, bool]:
    """What the weight search scores: (maps, target, pixel-level?). Pixel level when masks hold defects:
    maps averaged over `downsample` blocks and a block is positive if any of its pixels is; else image labels."""
    use_pixels = masks is not None and bool(masks.any())
    if not use_pixels:
        return maps, np.asarray(labels), False
    small = {k: _downsample(v, downsample) for k, v in maps.items()}
    return small, _downsample(masks.astype(np.float32), downsample) > 0, True


def search_weights(
    maps: Mapping[str, np.ndarray],
    stats: Mapping[str, tuple[float, float]],
    labels: np.ndarray,
    masks: np.ndarray | None = None,
    step: float = 0.1,
    downsample: int = 4,
) -> tuple[dict[str, float], float, str]:
    """Grid-search fusion weights; returns (weights, best F1, objective name).

    Pixel F1 is computed on maps averaged over `downsample` x `downsample` blocks (masks: any defect pixel
    in the block), which keeps the search fast and does not change which map is informative.
    """
    names = sorted(maps)
    if len(names) == 1:
        return {names[0]: 1.0}, float("nan"), "single map"
    small, target, use_pixels = search_inputs(maps, labels, masks, downsample)
    best, best_w = -1.0, None
    for w in simplex_grid(names, step):
        fused = fuse(small, w, stats)
        score = fused if use_pixels else fused.reshape(len(fused), -1).max(1)
        f1, _ = f1_max(target, score)
        if f1 > best + 1e-9:
            best, best_w = f1, w
    assert best_w is not None
    return best_w, best, "pixel F1-max" if use_pixels else "image F1-max"

"""Federated fusion weights and decision threshold: the FedShufde "stats" job.

Each site keeps its own detectors (its PatchCore bank is personal, docs/federated.md) and standardises every
detector map with the mean / std of its own normal validation images, so fused scores are in the same
"standard deviations above this site's normal" units everywhere. What the sites then decide together:

- the fusion weights: for every candidate weight vector on the simplex grid, a site histograms its fused
  validation scores of defect and normal pixels (real masks or synthetic defects, exactly the evidence its
  local grid search would use); the server averages the histograms and picks the weights with the best F1
  over the pooled evidence;
- the decision threshold, as a number k of standard deviations: at every candidate weight vector the site
  also histograms its image scores (max of the fused map) of normal and defect validation images, as z-scores
  against the mean and std of its own normal image scores; at the chosen weights the server takes the
  `quantile` of the pooled normal z-scores (the local rule when no real defect is labelled), and each site
  sets threshold = its normal mean + k x its normal std. Why z-scores: an image score is a maximum over the
  whole map, so its normal level depends on the product (bottle vs tile) even after pixel standardisation;
  measured, a threshold shared in pixel-standardised units cost the bottle sites 10-16 points of image F1.

Why histograms: they are a fixed-length vector whatever a site's image count, so they travel through the same
clip -> Gaussian noise -> shuffler -> validator path as model updates. Each (positive, negative) pair is
normalised by the site's total, so it sums to 1: one site's whole vector has L2 norm <= sqrt(2G) for G grid
points, which is the clip bound C (a no-op for honest sites, a cap for others). Any two uploads differ by at
most 2C, the sensitivity the Gaussian noise is calibrated to, as for model updates (conservative: pairs of
L1 norm 1 are at most sqrt(2) apart, so two honest uploads at most 2 sqrt(G)).
Bins are uniform in asinh(score) (fine near 0, wide in the tail), so one grid covers any site's scale.
Every site counts equally in the mean (an unweighted mean: a weight would identify the sender).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HyADSError
from ..fusion import fuse, search_inputs, simplex_grid
from ..thresholds import Calibration
from .fedshufde import FedSettings

BINS = 128
LOW, HIGH = -8.0, 500.0  # fused scores outside go to the end bins


def edges(bins: int = BINS) -> np.ndarray:
    return np.sinh(np.linspace(math.asinh(LOW), math.asinh(HIGH), bins + 1))


def _pair(pos: np.ndarray, neg: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Histograms of positive and negative scores, both divided by their joint count (the pair sums to 1)."""
    nb = len(e) - 1
    cp = np.bincount(np.clip(np.searchsorted(e, pos.ravel(), "right") - 1, 0, nb - 1), minlength=nb)
    cn = np.bincount(np.clip(np.searchsorted(e, neg.ravel(), "right") - 1, 0, nb - 1), minlength=nb)
    total = max(1, int(cp.sum() + cn.sum()))
    return np.concatenate([cp, cn]).astype(np.float64) / total


def _image_scores(model: Any, weights: dict[str, float]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(image scores of the site's validation images, their labels, mean and std of the normal ones)."""
    maps, labels, _, _ = model._fusion_search
    labels = np.asarray(labels)
    img = fuse(maps, weights, model.map_stats_).reshape(len(labels), -1).max(1).astype(np.float64)
    normal = img[labels == 0]
    sd = float(normal.std()) if len(normal) > 1 else 0.0
    return img, labels, float(normal.mean()), sd if sd > 1e-12 else max(abs(float(normal.mean())) * 0.05, 1e-6)


def site_statistics(model: Any, step: float | None = None, bins: int = BINS) -> np.ndarray:
    """One site's upload: for each simplex grid point, [pixel pos | pixel neg | image defect | image normal]
    histograms (4 x bins). `model` is a fitted HyADS with >= 2 detectors and a fusion search."""
    search = getattr(model, "_fusion_search", None)
    if search is None or len(model.detectors) < 2:
        raise HyADSError("federated calibration needs a model fitted with >= 2 detectors and validation images")
    maps, labels, masks, _ = search
    labels = np.asarray(labels)
    if not (labels == 0).any():
        raise HyADSError("federated calibration needs defect-free validation images at every site")
    small, target, pixels = search_inputs(maps, labels, masks)
    e = edges(bins)
    out = []
    for w in simplex_grid(sorted(maps), step or model.config.fusion_step):
        fused_small = fuse(small, w, model.map_stats_)
        if pixels:
            out.append(_pair(fused_small[target], fused_small[~target], e))
        else:  # image objective: target holds image labels, scores are image maxima
            score = fused_small.reshape(len(fused_small), -1).max(1)
            out.append(_pair(score[labels == 1], score[labels == 0], e))
        img, _, mu, sd = _image_scores(model, w)
        z = (img - mu) / sd
        out.append(_pair(z[labels == 1], z[labels == 0], e))
    return np.concatenate(out).astype(np.float32)


def clip_bound(n_grid: int) -> float:
    """L2 norm an honest upload cannot exceed: 2 pairs per grid point, each of L1 (hence L2) norm <= 1."""
    return math.sqrt(2 * n_grid)


def _f1_curve(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """F1 when everything from bin k upwards is called a defect, for every k."""
    # Cumulative sums of the raw (noisy, possibly negative) bins are unbiased; clamping each bin at 0 first
    # would add the positive half of every bin's noise to the rare defect class.
    tp = np.maximum(np.cumsum(pos[::-1])[::-1], 0.0)
    fp = np.maximum(np.cumsum(neg[::-1])[::-1], 0.0)
    fn = np.maximum(pos.sum() - tp, 0.0)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


@dataclass
class FederatedCalibration:
    weights: dict[str, float]
    pooled_f1: float
    k: float  # threshold in standard deviations of a site's normal image scores above their mean
    quantile: float
    grid_points: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combine(mean: np.ndarray, names: list[str], step: float, quantile: float = 0.99,
            bins: int = BINS) -> FederatedCalibration:
    """Server side: from the mean of the sites' (noisy) uploads, the weights with the best pooled F1 and the
    `quantile` of the pooled normal image z-scores at those weights (interpolated inside its bin)."""
    grid = simplex_grid(sorted(names), step)
    h = np.asarray(mean, np.float64)  # LDP noise can make bins negative: handled on cumulative sums
    if h.size != len(grid) * 4 * bins:
        raise HyADSError(f"statistics vector has {h.size} values, expected {len(grid) * 4 * bins}")
    h = h.reshape(len(grid), 4, bins)
    f1 = np.array([_f1_curve(h[g, 0], h[g, 1]).max() for g in range(len(grid))])
    best = int(np.argmax(f1))  # first of equals, like the local search
    e = edges(bins)
    raw = np.cumsum(h[best, 3])
    if raw[-1] <= 0:
        raise HyADSError("the pooled normal image scores sum to <= 0: no usable statistics (with local noise: "
                         "the noise swamps the histograms; it needs far more sites or a larger eps0)")
    cdf = np.clip(np.maximum.accumulate(raw / raw[-1]), 0.0, 1.0)  # monotone despite noise
    normal = np.diff(np.r_[0.0, cdf])
    k = int(min(np.searchsorted(cdf, quantile), bins - 1))
    below = cdf[k - 1] if k else 0.0
    frac = (quantile - below) / max(cdf[k] - below, 1e-12)
    t = math.asinh(e[k]) + frac * (math.asinh(e[k + 1]) - math.asinh(e[k]))  # linear in the asinh scale
    return FederatedCalibration(grid[best], float(f1[best]), float(math.sinh(t)), quantile, len(grid))


def apply(model: Any, cal: FederatedCalibration) -> Any:
    """Install the federation's weights and threshold rule in a site's model: threshold = the site's normal
    image-score mean + k std at the federated weights (its map statistics stay its own)."""
    model.weights_ = dict(cal.weights)
    _, _, mu, sd = _image_scores(model, model.weights_)
    model.calibration_ = Calibration(mu + cal.k * sd, sd, f"federated: normal mean + {cal.k:.3f} std (k = "
                                     f"quantile {cal.quantile} of pooled normal image z-scores)")
    model.fusion_info_ = {**getattr(model, "fusion_info_", {}), "federated": cal.to_dict()}
    model.fit_info_["fusion_weights"] = model.weights_
    return model


def stats_settings(n_grid: int, eps0: float = math.inf, delta0: float = 1e-6, bins: int = BINS,
                   chunks: int = 1, seed: int = 0) -> FedSettings:
    """FedSettings of the one-round stats job for `n_grid` weight grid points."""
    return FedSettings(model="stats", shape=(n_grid * 4 * bins,), clip=clip_bound(n_grid), eps0=eps0,
                       delta0=delta0, chunks=chunks, server_lr=1.0, seed=seed)


def federated_calibration(models: list[Any], eps0: float = math.inf, delta0: float = 1e-6,
                          quantile: float = 0.99, step: float | None = None, bins: int = BINS,
                          apply_to_models: bool = True) -> tuple[FederatedCalibration, dict[str, Any]]:
    """Run the stats job over Flower for fitted site models: one round, uploads privatised and shuffled.
    Returns the calibration (installed in every model when `apply_to_models`) and the round log."""
    from .flower import run_simulation
    from .privacy import privacy_report

    names = sorted(models[0].detectors)
    if any(sorted(m.detectors) != names for m in models):
        raise HyADSError("every site must use the same detectors")
    step = step or models[0].config.fusion_step
    n_grid = len(simplex_grid(names, step))
    s = stats_settings(n_grid, eps0, delta0, bins)
    data = [{"stats": site_statistics(m, step, bins)} for m in models]
    strategy = run_simulation(data, s, rounds=1)
    cal = combine(strategy.global_arrays[0], names, step, quantile, bins)
    if apply_to_models:
        for m in models:
            apply(m, cal)
    log = {"settings": s.to_dict(), "rounds": [asdict(r) for r in strategy.rounds],
           "privacy": privacy_report(eps0, delta0, len(models), 1)}
    return cal, log


def run_calibration_federation(roots: list[Path], n_clients: int, split: str, alpha: float = 0.5,
                               eps0: float = math.inf, delta0: float = 1e-6, hyads: dict[str, Any] | None = None,
                               seed: int = 0, out: Path | None = None, log=print) -> dict[str, Any]:
    """Simulate sites over the datasets' normal training images (split as in `hyads federate`), fit each
    site's HyADS (default: texture + PatchCore), agree on fusion weights and threshold with the stats job,
    and save every site's model (federated weights installed) under out/site<i>/."""
    from ..data.datasets import load_dataset
    from ..pipeline import HyADS
    from .runner import assign

    paths, groups = [], []
    for k, root in enumerate(roots):
        ds = load_dataset(root, seed=seed)
        paths += list(ds.train)
        groups += [k] * len(ds.train)
    parts = assign(np.asarray(groups), n_clients, split, alpha, seed)
    cfg = {"detectors": ["texture", "patchcore"], "seed": seed, **(hyads or {})}
    models = []
    for i, idx in enumerate(parts):
        m = HyADS(**cfg)
        m.progress = False
        m.fit([paths[j] for j in idx])
        models.append(m)
        log(f"site {i}: {len(idx)} images, local weights {m.weights_}, local threshold {m.calibration_.threshold:.4g}")
    local = [{"weights": m.weights_, "threshold": m.calibration_.threshold} for m in models]
    cal, job = federated_calibration(models, eps0, delta0)
    log(f"federated weights {cal.weights}, threshold k = {cal.k:.3f} normal std (pooled F1 {cal.pooled_f1:.3f})")
    result = {"sites": len(models), "split": split, "images_per_site": [len(p) for p in parts], "local": local,
              "federated": cal.to_dict(), "site_thresholds": [m.calibration_.threshold for m in models], "job": job}
    if out is not None:
        from ..utils import clean_json, write_text_atomic

        out.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(models):
            m.save(out / f"site{i}")
        write_text_atomic(out / "calibration.json", json.dumps(clean_json(result), indent=2))
    return result

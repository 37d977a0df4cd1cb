"""Evaluate a fitted model on a labelled test set: image- and pixel-level metrics, per-defect-type AUROC."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics as M
from .data.datasets import Dataset, Sample
from .data.io import image_size_of, load_mask
from .errors import DatasetError
from .pipeline import HyADS


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)


def gt_masks(samples: list[Sample], size: int) -> np.ndarray | None:
    if not any(s.mask_path is not None for s in samples if s.label == 1):
        return None
    out = np.zeros((len(samples), size, size), dtype=bool)
    for i, s in enumerate(samples):
        if s.mask_path is not None:
            out[i] = load_mask(s.mask_path, expected_hw=image_size_of(s.path), size=size)
    return out


SMALL_AREA = 0.03


def evaluate(model: HyADS, dataset: Dataset, small_area: float = SMALL_AREA) -> Evaluation:
    samples = dataset.test
    if not samples:
        raise DatasetError(f"{dataset.root}: no test images to evaluate on ({dataset.layout} layout)")
    size = model.config.image_size
    gts = gt_masks(samples, size)  # read masks first: a bad mask fails before the slow part
    t0 = time.perf_counter()
    maps = model.anomaly_map([s.path for s in samples])
    seconds = time.perf_counter() - t0
    return evaluate_maps(samples, maps, gts, model.threshold_, len(samples) / seconds, small_area)


def evaluate_maps(
    samples: list[Sample], maps: np.ndarray, gts: np.ndarray | None, thr: float, images_per_second: float,
    small_area: float = SMALL_AREA,
) -> Evaluation:
    """All metrics from precomputed maps (image score = map maximum, prediction = score >= thr)."""
    scores = maps.reshape(len(maps), -1).max(1)
    labels = np.array([s.label for s in samples])
    pred = scores >= thr
    m: dict[str, Any] = {
        "n_images": len(samples),
        "n_defect": int(labels.sum()),
        "image_auroc": M.auroc(labels, scores),
        "image_f1": M.f1_score_at(labels, scores, thr),
        "image_f1_max": M.f1_max(labels, scores)[0],
        "accuracy": float((pred == labels.astype(bool)).mean()),
        "threshold": thr,
        "images_per_second": images_per_second,
    }
    if gts is not None:
        masks_pred = maps >= thr
        m.update(
            pixel_auroc=M.auroc(gts, maps),
            aupro=M.aupro(gts, maps),
            pixel_f1_max=M.f1_max(gts, maps)[0],
            iou=M.iou(masks_pred, gts),
            dice=M.dice(masks_pred, gts),
        )
    y = labels.astype(bool)
    m["confusion"] = {"tn": int((~pred & ~y).sum()), "fp": int((pred & ~y).sum()),
                      "fn": int((~pred & y).sum()), "tp": int((pred & y).sum())}
    per_type: dict[str, dict[str, float]] = {}
    normal = labels == 0
    for t in sorted({s.defect_type for s in samples if s.label == 1}):
        sel = np.array([s.defect_type == t for s in samples])
        both = sel | normal
        row = {"n": int(sel.sum()), "auroc": M.auroc(labels[both], scores[both]),
               "f1": M.f1_score_at(labels[both], scores[both], thr), "recall": float(pred[sel].mean())}
        if gts is not None:
            row["iou"] = M.iou((maps[sel] >= thr), gts[sel])
        per_type[t] = row
    m["per_type"] = per_type
    if gts is not None:
        m["by_size"] = size_groups(labels, scores, gts, thr, small_area)
    return Evaluation(m, samples, scores, maps, gts, per_type)


def size_groups(
    labels: np.ndarray, scores: np.ndarray, gts: np.ndarray, threshold: float, small_area: float = SMALL_AREA
) -> dict[str, Any]:
    """Detection F1 for small and large defects separately (the seed paper reports both).

    A defect image is "small" when its ground-truth area is below `small_area` of the image (default 3 %,
    which on MVTec bottle separates broken_small from broken_large); each group's F1 is computed against all
    normal test images. Defect images without a mask are left out.
    """
    area = gts.reshape(len(gts), -1).mean(1)
    normal = labels == 0
    out: dict[str, Any] = {"small_area_fraction": small_area}
    for name, sel in (("small", (labels == 1) & (area > 0) & (area < small_area)),
                      ("large", (labels == 1) & (area >= small_area))):
        both = sel | normal
        out[name] = {"n": int(sel.sum()),
                     "f1": M.f1_score_at(labels[both], scores[both], threshold) if sel.any() else float("nan"),
                     "recall": float((scores[sel] >= threshold).mean()) if sel.any() else float("nan")}
    return out

"""Fit + evaluate the segmentation head on a pixel-labelled dataset (NEU-Seg protocol): train on train.txt,
pick the epoch on val.txt, report per-class IoU, mean IoU and binary defect-vs-background IoU on test.txt at
the masks' own resolution."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics as M
from .data.datasets import SegDataset
from .data.io import load_label_mask
from .errors import HyADSError
from .pipeline import HyADS
from .segmentation import labels_from_probs
from .utils import clean_json, write_text_atomic


def evaluate_segmentation(model: HyADS | Sequence[HyADS], pairs: list[tuple[Path, Path]],
                          classes: list[str]) -> dict[str, Any]:
    """Scores of one model, or of an ensemble whose class probabilities are averaged (the models may differ in
    resolution and detectors, not in classes), on (image, class-mask) pairs at the masks' own size."""
    models = [model] if isinstance(model, HyADS) else list(model)
    for m in models:
        if list(m.config.seg_classes) != list(classes):
            raise HyADSError(f"a model segments {m.config.seg_classes}, the dataset has {classes}")
    gts = [load_label_mask(m) for _, m in pairs]
    t0 = time.perf_counter()
    if len(models) == 1 and len({g.shape for g in gts}) == 1:
        pred: list[np.ndarray] | np.ndarray = models[0].predict_labels([p for p, _ in pairs], size=gts[0].shape)
    else:
        pred = []
        chunk = 32
        for i in range(0, len(pairs), chunk):  # bounded memory: one chunk's probabilities at a time
            part, part_gts = pairs[i : i + chunk], gts[i : i + chunk]
            same = len({g.shape for g in part_gts}) == 1
            groups = [(part, part_gts[0].shape)] if same else [([pp], g.shape) for pp, g in zip(part, part_gts)]
            for items, shape in groups:
                prob = sum(torch.from_numpy(m.predict_seg_probs([p for p, _ in items], size=shape)) for m in models)
                pred.extend(labels_from_probs(prob / len(models)))
    seconds = time.perf_counter() - t0
    return {**segmentation_scores(pred, gts, classes), "images_per_second": len(pairs) / seconds,
            "n_models": len(models)}


def segmentation_scores(pred: list[np.ndarray] | np.ndarray, gts: list[np.ndarray], classes: list[str]) -> dict[str, Any]:
    """Per-class IoU (all pixels pooled), mean IoU over defect classes and with background, binary IoU/Dice."""
    flat_p = np.concatenate([np.ravel(p) for p in pred])
    flat_t = np.concatenate([np.ravel(g) for g in gts])
    ious = M.class_iou(flat_p, flat_t, len(classes) + 1)
    return {
        "n_images": len(gts),
        "per_class_iou": {name: float(v) for name, v in zip(["background", *classes], ious)},
        "miou_defect_classes": float(np.nanmean(ious[1:])),
        "miou_with_background": float(np.nanmean(ious)),
        "binary_iou": M.iou(flat_p > 0, flat_t > 0),
        "binary_dice": M.dice(flat_p > 0, flat_t > 0),
        "pixel_accuracy": float((flat_p == flat_t).mean()),
    }


def run_segmentation(ds: SegDataset, out: Path, model: HyADS, max_train: int = 0,
                     init_head: Path | None = None, input_cache: Path | None = None) -> dict[str, Any]:
    """Fit on train (val for epoch selection), evaluate on test; writes model/, metrics.json, results.md.
    `init_head`: a saved model whose head starts the training; `input_cache`: folder of cached head inputs
    (both HyADS.fit_segmentation)."""
    out.mkdir(parents=True, exist_ok=True)
    train = ds.splits["train"][: max_train or None]
    val = ds.splits.get("val", [])
    t0 = time.perf_counter()
    model.fit_segmentation([p for p, _ in train], [m for _, m in train], ds.classes,
                           [p for p, _ in val] or None, [m for _, m in val] or None, init_head=init_head,
                           input_cache=input_cache)
    fit_s = time.perf_counter() - t0
    model.save(out / "model")
    result = {"dataset": str(ds.root), "classes": ds.classes, "n_train": len(train), "n_val": len(val),
              "fit_seconds": fit_s, "detectors": model.detectors, "seg_features": model.config.seg_features,
              "test": evaluate_segmentation(model, ds.splits["test"], ds.classes)}
    write_text_atomic(out / "metrics.json", json.dumps(clean_json(result), indent=2))
    t = result["test"]
    rows = "\n".join(f"| {k} | {100 * v:.2f} |" for k, v in t["per_class_iou"].items())
    md = (f"# Segmentation on {ds.root.name} (test split, {t['n_images']} images)\n\n"
          f"| class | IoU (%) |\n|---|---|\n{rows}\n"
          f"| **mean IoU, defect classes** | {100 * t['miou_defect_classes']:.2f} |\n"
          f"| mean IoU, with background | {100 * t['miou_with_background']:.2f} |\n"
          f"| binary defect-vs-background IoU | {100 * t['binary_iou']:.2f} |\n\n"
          f"Fit {fit_s:.0f} s on {len(train)} images; inference {t['images_per_second']:.1f} img/s.\n")
    write_text_atomic(out / "results.md", md)
    return result

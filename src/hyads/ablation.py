"""The seed paper's six-way ablation: texture, AE, PatchCore alone, texture+AE, AE+PatchCore, all three.

The three detectors are fitted once; each combination then gets its own fusion weights (searched on the same
validation data as a full fit), its own threshold on held-out normal images, and is evaluated on the test
split from the per-detector maps, so differences come from the combination alone. img/s counts the time of
the detectors in the combination on the test set (each detector timed separately), plus fusion.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import HyADSConfig
from .data.datasets import load_dataset
from .errors import DatasetError
from .evaluation import evaluate_maps, gt_masks
from .fusion import fuse, search_weights
from .pipeline import HyADS, rgb_batch
from .report.html import fmt
from .utils import clean_json
from .thresholds import calibrate

COMBOS = (("texture",), ("ae",), ("patchcore",), ("texture", "ae"), ("ae", "patchcore"),
          ("texture", "ae", "patchcore"))
NAMES = {"texture": "texture", "ae": "AE", "patchcore": "PatchCore"}
COLUMNS = ("image_auroc", "image_f1", "pixel_auroc", "aupro", "iou", "dice", "images_per_second")


def run_ablation(data: Path, out: Path, seed: int = 0, log: Callable[[str], None] = print,
                 **overrides: Any) -> dict[str, Any]:
    ds = load_dataset(data, seed=seed)
    if not ds.test:
        raise DatasetError(f"{data}: no test images, so there is nothing to compare the combinations on")
    cfg = HyADSConfig(detectors=["texture", "ae", "patchcore"], seed=seed, **overrides)
    model = HyADS(cfg)
    t0 = time.perf_counter()
    model.fit(ds.train)
    log(f"fitted texture + AE + PatchCore in {time.perf_counter() - t0:.0f} s")
    search_maps, search_labels, search_masks, normal_maps = model._fusion_search
    size = cfg.image_size
    gts = gt_masks(ds.test, size)
    rgb_batches = [rgb_batch([s.path for s in ds.test[i : i + cfg.batch_size]], size)
                   for i in range(0, len(ds.test), cfg.batch_size)]
    test_maps: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for det, fn in (("patchcore", lambda r: model._maps_from_patches(model._patches(r))),
                    ("texture", model._texture_maps), ("ae", model._ae_maps)):
        t = time.perf_counter()
        test_maps[det] = np.concatenate([fn(r) for r in rgb_batches])
        seconds[det] = time.perf_counter() - t
    rows: dict[str, Any] = {}
    for combo in COMBOS:
        name = " + ".join(NAMES[d] for d in combo)
        sub = {d: search_maps[d] for d in combo}
        stats = {d: model.map_stats_[d] for d in combo}
        if len(combo) == 1:
            weights, stats = {combo[0]: 1.0}, {combo[0]: (0.0, 1.0)}
        else:
            weights, _, _ = search_weights(sub, stats, search_labels, search_masks, cfg.fusion_step)
        normal_scores = fuse({d: normal_maps[d] for d in combo}, weights, stats).reshape(len(normal_maps[combo[0]]), -1).max(1)
        thr = calibrate(normal_scores, cfg.normal_quantile).threshold
        t = time.perf_counter()
        fused = fuse({d: test_maps[d] for d in combo}, weights, stats)
        fuse_s = time.perf_counter() - t
        ips = len(ds.test) / (sum(seconds[d] for d in combo) + fuse_s)
        m = evaluate_maps(ds.test, fused, gts, thr, ips).metrics
        rows[name] = {**{k: m.get(k) for k in COLUMNS}, "weights": weights}
        log(f"{name}: image AUROC {fmt(m['image_auroc'])}, pixel AUROC {fmt(m.get('pixel_auroc', float('nan')))}")
    out.mkdir(parents=True, exist_ok=True)
    header = ["combination", *COLUMNS, "weights"]
    lines = [f"Ablation on {data} ({len(ds.train)} train / {len(ds.test)} test images), seed {seed}, "
             f"AE epochs run: {len(model.ae_history_)}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        w = ", ".join(f"{NAMES[k]} {v:.1f}" for k, v in r["weights"].items())
        vals = [fmt(r[c]) if r[c] is not None else "" for c in COLUMNS]
        vals[-1] = f"{r['images_per_second']:.1f}"
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {w} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(clean_json({"data": str(data), "rows": rows,
                                                              "ae_history": model.ae_history_,
                                                              "detector_seconds": seconds}), indent=2))
    return rows

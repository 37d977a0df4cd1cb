"""A self-contained report folder: metrics (JSON + Markdown), one overlay PNG per test image, index.html.

Only relative links to files written here; no external assets (inspection PCs are often offline).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.io import load_image
from .overlay import heatmap_overlay, save_png

if TYPE_CHECKING:
    from ..evaluation import Evaluation
    from ..pipeline import HyADS


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4f}"
    return str(v)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(model: "HyADS", result: "Evaluation", out: str | Path) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scalar = {k: v for k, v in result.metrics.items() if not isinstance(v, dict)}
    (out / "metrics.json").write_text(json.dumps(_clean(result.metrics), indent=2))
    md = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalar.items()]
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    size = model.config.image_size
    thr = model.threshold_
    rows = []
    order = np.argsort(-result.scores)
    for rank, i in enumerate(order):
        s = result.samples[i]
        amap = result.maps[i]
        gt = result.masks[i] if result.masks is not None else None
        name = f"images/{rank:04d}_{s.defect_type}_{s.path.stem}.png"
        save_png(heatmap_overlay(load_image(s.path, size), model.normalise(amap), amap >= thr, gt), out / name)
        verdict = "defect" if result.scores[i] >= thr else "normal"
        ok = (verdict == "defect") == bool(s.label)
        rows.append(
            f"<tr class='{'ok' if ok else 'bad'}'><td>{html.escape(s.defect_type)}</td>"
            f"<td>{html.escape(s.path.name)}</td><td>{float(model.normalise(result.scores[i])):.3f}</td>"
            f"<td>{verdict}</td><td><img src='{name}' width='192'></td></tr>"
        )
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in scalar.items())
    type_rows = "".join(
        f"<tr><td>{html.escape(t)}</td>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in ("n", "auroc", "recall", "iou"))
        + "</tr>"
        for t, r in result.per_type.items()
    )
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>hyads report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.bad{{background:#fdd}}</style></head><body>
<h1>hyads evaluation report</h1>
<p>Model: backbone {html.escape(model.config.backbone)}, sampler {html.escape(model.config.sampler)},
bank {model.fit_info_.get('bank_size')} patches, threshold {thr:.4f} ({html.escape(model.calibration_.method)}).
Overlays: heat map (0.5 = threshold), white outline = predicted mask, green outline = ground truth.</p>
<h2>Metrics</h2><table>{metric_rows}</table>
<h2>Per defect type</h2><table><tr><th>type</th><th>n</th><th>AUROC</th><th>recall</th><th>IoU</th></tr>{type_rows}</table>
<h2>Images, highest score first (red rows are wrong verdicts)</h2>
<table><tr><th>type</th><th>file</th><th>score</th><th>verdict</th><th>overlay</th></tr>{''.join(rows)}</table>
</body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out

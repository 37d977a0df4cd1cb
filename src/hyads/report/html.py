"""A self-contained report folder: index.html + PNGs + metrics.json/.md.

The page links only to files written beside it (no CDN, no scripts): inspection PCs are often offline.
Every number on the page comes from the same metrics dict that is written to metrics.json, and carries a
`data-key` attribute so tests can check that the page and the JSON agree.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.io import load_image
from . import plots
from ..utils import clean_json
from .overlay import heatmap_overlay, save_png

if TYPE_CHECKING:
    from ..evaluation import Evaluation
    from ..pipeline import HyADS

GALLERY_SIZE = 6


def fmt(v: Any) -> str:
    """The one number format used on the page (tests rely on it)."""
    if isinstance(v, (float, np.floating)):
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.4f}"
    return html.escape(str(v))


def _cell(key: str, v: Any) -> str:
    return f"<td data-key='{html.escape(key)}'>{fmt(v)}</td>"


def _gallery_item(model: "HyADS", result: "Evaluation", i: int, out: Path, tag: str) -> str:
    s = result.samples[i]
    size = model.config.image_size
    rgb = load_image(s.path, size)
    amap = result.maps[i]
    gt = result.masks[i] if result.masks is not None else None
    overlay = heatmap_overlay(rgb, model.normalise(amap), amap >= model.threshold_, gt)
    pair = np.concatenate([(rgb * 255).round().astype(np.uint8), np.full((size, 4, 3), 255, np.uint8), overlay], 1)
    name = f"gallery/{tag}_{i:04d}_{s.path.stem}.png"
    save_png(pair, out / name)
    score = float(model.normalise(result.scores[i]))
    return (f"<figure><img src='{name}' alt='{html.escape(s.path.name)}'><figcaption>{html.escape(s.defect_type)}/"
            f"{html.escape(s.path.name)} — score {score:.3f}</figcaption></figure>")


def write_report(model: "HyADS", result: "Evaluation", out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    labels = np.array([s.label for s in result.samples])
    scores, thr = result.scores, model.threshold_
    (out / "metrics.json").write_text(json.dumps(clean_json(m), indent=2))
    scalar = {k: v for k, v in m.items() if not isinstance(v, dict)}
    (out / "metrics.md").write_text(
        "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in scalar.items()]) + "\n"
    )

    figs = []
    if 0 < labels.sum() < len(labels):
        figs.append(plots.roc_plot(labels, scores, out / "roc.png"))
        figs.append(plots.pr_plot(labels, scores, out / "pr.png"))
    if result.masks is not None and result.masks.any():
        figs.append(plots.pro_plot(result.masks, result.maps, out / "pro.png"))
    figs.append(plots.histogram_plot(labels, scores, thr, out / "histogram.png"))
    c = m["confusion"]
    figs.append(plots.confusion_plot(np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]]), out / "confusion.png"))

    # Galleries: highest-scoring normals (false positives first), lowest-scoring defects, a seeded TP sample.
    normal_idx = np.nonzero(labels == 0)[0]
    defect_idx = np.nonzero(labels == 1)[0]
    worst_fp = normal_idx[np.argsort(-scores[normal_idx])][:GALLERY_SIZE]
    worst_fn = defect_idx[np.argsort(scores[defect_idx])][:GALLERY_SIZE]
    tp = defect_idx[scores[defect_idx] >= thr]
    rng = np.random.default_rng(0)
    tp_sample = np.sort(rng.choice(tp, size=min(GALLERY_SIZE, len(tp)), replace=False)) if len(tp) else tp
    galleries = {
        "Highest-scoring normal images (false positives are above the threshold)": ("fp", worst_fp),
        "Lowest-scoring defect images (false negatives are below the threshold)": ("fn", worst_fn),
        "Sample of true positives": ("tp", tp_sample),
    }
    gallery_html = ""
    for title, (tag, idx) in galleries.items():
        items = "".join(_gallery_item(model, result, int(i), out, tag) for i in idx)
        gallery_html += f"<h3>{html.escape(title)}</h3><div class='gallery'>{items or '<p>none</p>'}</div>"

    metric_rows = "".join(f"<tr><th>{html.escape(k)}</th>{_cell(k, v)}</tr>" for k, v in scalar.items())
    cols = ("n", "auroc", "f1", "recall", "iou")
    type_rows = "".join(
        f"<tr><th>{html.escape(t)}</th>" + "".join(_cell(f"per_type.{t}.{col}", r[col]) if col in r else "<td></td>"
                                                   for col in cols) + "</tr>"
        for t, r in result.per_type.items()
    )
    size_html = ""
    if "by_size" in m:
        bs = m["by_size"]
        rows = "".join(
            f"<tr><th>{g}</th>{_cell(f'by_size.{g}.n', bs[g]['n'])}{_cell(f'by_size.{g}.f1', bs[g]['f1'])}"
            f"{_cell(f'by_size.{g}.recall', bs[g]['recall'])}</tr>"
            for g in ("small", "large")
        )
        size_html = (f"<h2>Small vs large defects</h2><p>Small: ground-truth area below "
                     f"{bs['small_area_fraction'] * 100:.1f} % of the image; F1 against all normal test images.</p>"
                     f"<table><tr><th>group</th><th>n</th><th>F1</th><th>recall</th></tr>{rows}</table>")
    fig_html = "".join(f"<img src='{f}' alt='{f}'>" for f in figs)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hyads evaluation report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{text-align:left}}.gallery{{display:flex;flex-wrap:wrap;gap:8px}}figure{{margin:0}}
figure img{{width:380px}}figcaption{{font-size:12px;max-width:380px}}.plots img{{margin-right:8px}}
</style></head><body>
<h1>hyads evaluation report</h1>
<p>Data: {html.escape(str(result.metrics.get('data', '')))} — backbone {html.escape(model.config.backbone)},
sampler {html.escape(model.config.sampler)}, bank {model.fit_info_.get('bank_size')} patches, threshold
{thr:.4f} ({html.escape(model.calibration_.method)}).
Pictures: the image, then the heat map (0.5 = threshold) with the predicted mask in white and the ground truth in
green.</p>
<h2>Summary</h2><table>{metric_rows}</table>
<div class="plots">{fig_html}</div>
<h2>Per defect type</h2>
<table><tr><th>type</th><th>n</th><th>AUROC</th><th>F1</th><th>recall</th><th>IoU</th></tr>{type_rows}</table>
{size_html}
<h2>Galleries</h2>{gallery_html}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out

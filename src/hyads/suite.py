"""Fit + evaluate on every shared dataset that applies, and one Markdown table of the results.

docs/RESULTS.md quotes this table; each dataset also gets its own report folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .data.datasets import load_dataset
from .evaluation import evaluate
from .pipeline import HyADS
from .report.html import fmt, write_report
from .utils import clean_json

COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "image_f1_max", "iou", "dice")


def discover(data: Path) -> list[tuple[str, Path | None, str]]:
    """(name, folder or None, note) for each dataset found under the shared data folder."""
    found: list[tuple[str, Path | None, str]] = []
    mvtec = data / "mvtec_ad"
    if mvtec.is_dir():
        for cat in sorted(p for p in mvtec.iterdir() if (p / "train" / "good").is_dir()):
            found.append((f"mvtec_ad/{cat.name}", cat, "MVTec AD test split"))
    if (data / "magnetic_tile").is_dir():
        found.append(("magnetic_tile", data / "magnetic_tile", "MT_Free split 80/20 with the seed"))
    if (data / "neu_seg").is_dir():
        found.append(("neu_seg", None, "skipped: has no defect-free images; scored by the segmentation head "
                                       "instead (`hyads segment`, docs/RESULTS.md)"))
    return found


def run_suite(
    data: Path, out: Path, sampler: str = "reservoir", image_size: int = 256, seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    data, out = Path(data), Path(out)
    rows: dict[str, Any] = {}
    for name, folder, note in discover(data):
        if folder is None:
            rows[name] = {"note": note}
            log(f"{name}: {note}")
            continue
        ds = load_dataset(folder, seed=seed)
        log(ds.summary())
        t0 = time.perf_counter()
        model = HyADS(sampler=sampler, image_size=image_size, seed=seed).fit(ds.train)
        fit_s = time.perf_counter() - t0
        result = evaluate(model, ds)
        result.metrics["data"] = str(folder)
        write_report(model, result, out / name.replace("/", "_"))
        rows[name] = {**{k: result.metrics.get(k) for k in COLUMNS}, "fit_seconds": fit_s,
                      "eval_images_per_second": result.metrics["images_per_second"],
                      "n_train": len(ds.train), "n_test": len(ds.test), "note": note}
        log(f"{name}: image AUROC {fmt(result.metrics['image_auroc'])}")
    header = ["dataset", "train", "test", *COLUMNS, "fit s", "eval img/s", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        if "image_auroc" not in r:
            lines.append(f"| {name} | | | " + " | " * len(COLUMNS) + f" | | {r['note']} |")
            continue
        cells = [name, str(r["n_train"]), str(r["n_test"]), *[fmt(r[c]) if r[c] is not None else "" for c in COLUMNS],
                 f"{r['fit_seconds']:.1f}", f"{r['eval_images_per_second']:.1f}", r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(f"sampler {sampler}, image size {image_size}, seed {seed}\n\n" + table)
    (out / "summary.json").write_text(json.dumps(clean_json(rows), indent=2))
    return rows

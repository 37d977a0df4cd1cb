"""Markdown tables from the JSON files of benchmarks/runtimes.sh: per runtime / batch / kNN engine, each round's
pipeline img/s (one call per batch), stream img/s (one call over all images), bare feature-extractor img/s,
their ratios, decode ms, kNN ms and share; then the ratios between
runtimes (ONNX fp32 / torch, INT8 / fp32) per round, from the same rounds.

    .venv/bin/python benchmarks/runtimes_table.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

NAMES = {"torch": "torch eager", "onnx": "ONNX fp32", "onnx-int8": "ONNX INT8"}


def main(out_dir: str) -> None:
    runs: dict[tuple[str, str, int], dict[int, dict]] = defaultdict(dict)
    for f in sorted(Path(out_dir).glob("*.json")):
        m = re.fullmatch(r"(?:(\w+)-)?(torch|onnx|onnx-int8)-b(\d+)-r(\d+)", f.stem)
        if not m:
            continue
        engine = (m.group(1) or "auto").replace("default", "auto")
        runs[(m.group(2), engine, int(m.group(3)))][int(m.group(4))] = json.loads(f.read_text())

    def col(rows: dict[int, dict], fmt: str, get) -> str:
        return ", ".join(format(get(rows[r]), fmt) for r in sorted(rows))

    print("| runtime | batch | kNN engine | pipeline img/s (rounds) | bare extractor img/s | pipeline / backbone "
          "| stream img/s | stream / backbone | decode ms | kNN ms | kNN share % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (rt, eng, b), rows in sorted(runs.items(), key=lambda k: (list(NAMES).index(k[0][0]), k[0][2], k[0][1])):
        figures = [col(rows, ".1f", lambda r: r["pipeline_images_per_second"]),
                   col(rows, ".1f", lambda r: r["bare_backbone_images_per_second"]),
                   col(rows, ".2f", lambda r: r["pipeline_over_backbone"]),
                   col(rows, ".1f", lambda r: r.get("stream_images_per_second", float("nan"))),
                   col(rows, ".2f", lambda r: r.get("stream_over_backbone", float("nan"))),
                   col(rows, ".2f", lambda r: r["stage_ms_per_image"]["decode"]),
                   col(rows, ".2f", lambda r: r["stage_ms_per_image"]["knn"]),
                   col(rows, ".1f", lambda r: 100 * r["knn_share"])]
        print(f"| {NAMES[rt]} | {b} | {eng} | " + " | ".join(figures) + " |")
    print()
    engines = sorted({e for (_, e, _) in runs})
    for eng in engines:
        for b in sorted({b for (_, _, b) in runs}):
            t, o, i = (runs.get((rt, eng, b), {}) for rt in NAMES)

            def ratio(num: dict, den: dict, key: str) -> str:
                return ", ".join(f"{num[r].get(key, float('nan')) / den[r].get(key, float('nan')):.2f}"
                                 for r in sorted(num) if r in den)

            print(f"- {eng}, batch {b}: ONNX fp32 / torch pipeline {ratio(o, t, 'pipeline_images_per_second')}; "
                  f"INT8 / fp32 pipeline {ratio(i, o, 'pipeline_images_per_second')}; "
                  f"ONNX fp32 / torch stream {ratio(o, t, 'stream_images_per_second')}; "
                  f"INT8 / fp32 stream {ratio(i, o, 'stream_images_per_second')}; "
                  f"INT8 / fp32 bare extractor {ratio(i, o, 'bare_backbone_images_per_second')}")
    rss = [r["peak_rss_mib"] for rows in runs.values() for r in rows.values()]
    gf = [r["machine_matmul_gflops"] for rows in runs.values() for r in rows.values()]
    print(f"\npeak RSS {min(rss):.0f}-{max(rss):.0f} MiB; measured matmul {min(gf):.0f}-{max(gf):.0f} GFLOP/s")


if __name__ == "__main__":
    main(sys.argv[1])

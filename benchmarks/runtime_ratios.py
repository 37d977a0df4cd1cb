"""The runtimes' speed ratios measured in ONE process: the model loaded three times (torch, ONNX fp32, ONNX
INT8), and rounds that alternate them, so drift between processes (±15-40 % on this VM, see RESULTS.md) does
not enter the ratios. Per round and runtime: the pipeline with one call per batch, the stream (one call over
all images), and the bare feature extractor; batch 1 and 8; 32 bottle training images.

    .venv/bin/python benchmarks/runtime_ratios.py MODEL_DIR [ROUNDS]

MODEL_DIR needs an ONNX export with an INT8 graph (`hyads export MODEL_DIR --int8`). Prints the medians over
rounds (after one warm-up round) and the ratios the targets name.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hyads import HyADS
from hyads.data import load_dataset
from hyads.pipeline import rgb_batch

RUNTIMES = ("torch", "onnx", "onnx-int8")


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(model_dir: str, rounds: int = 7) -> None:
    torch.set_num_threads(2)
    models = {}
    for rt in RUNTIMES:
        m = HyADS.load(model_dir)
        m.progress = False
        if rt != "torch":
            m.use_runtime(rt, Path(model_dir) / "onnx", threads=2)
        models[rt] = m
    paths = [str(p) for p in load_dataset(models["torch"].fit_info_["dataset"]).train[:32]]
    size = models["torch"].config.image_size
    for batch in (1, 8):
        batches = [paths[i : i + batch] for i in range(0, len(paths), batch)]
        rgbs = [rgb_batch(b, size) for b in batches]
        res: dict[str, dict[str, list[float]]] = {rt: {"pipeline": [], "stream": [], "bare": []} for rt in RUNTIMES}
        for r in range(rounds + 1):
            for rt, m in models.items():
                m.config.batch_size = batch
                with torch.inference_mode():
                    t = {"pipeline": seconds(lambda: [m.anomaly_map(b) for b in batches]),
                         "stream": seconds(lambda: m.anomaly_map(paths)),
                         "bare": seconds(lambda: [m._patches(x) for x in rgbs])}
                if r:  # round 0 warms up
                    for k, v in t.items():
                        res[rt][k].append(len(paths) / v)
        med = {rt: {k: statistics.median(v) for k, v in d.items()} for rt, d in res.items()}
        print(f"\nbatch {batch}: median img/s over {rounds} alternating rounds")
        print("| runtime | pipeline | stream | bare extractor | pipeline / bare | stream / bare |")
        print("|---|---|---|---|---|---|")
        for rt in RUNTIMES:
            d = med[rt]
            print(f"| {rt} | {d['pipeline']:.1f} | {d['stream']:.1f} | {d['bare']:.1f} | "
                  f"{d['pipeline'] / d['bare']:.2f} | {d['stream'] / d['bare']:.2f} |")

        def per_round(a: str, b: str, k: str) -> str:
            ratios = [x / y for x, y in zip(res[a][k], res[b][k])]
            return f"median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"

        for k in ("pipeline", "stream", "bare"):
            print(f"- {k}: ONNX fp32 / torch {per_round('onnx', 'torch', k)}; "
                  f"INT8 / fp32 {per_round('onnx-int8', 'onnx', k)}")
        lo = {rt: min(p / b for p, b in zip(res[rt]["pipeline"], res[rt]["bare"])) for rt in RUNTIMES}
        print("- lowest pipeline / bare of any round: " + ", ".join(f"{rt} {v:.2f}" for rt, v in lo.items()))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7)

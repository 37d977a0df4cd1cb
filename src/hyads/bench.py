"""Per-stage speed benchmark of a fitted model, in one process so ratios are comparable.

Stages: decode+resize, backbone, patch aggregation (fused with the backbone under ONNX), kNN search,
post-processing (upsample + Gaussian + max), texture, AE, fusion, and the segmentation head (its inputs from
the maps already computed, fine branch, head, class maps) when the model has one. Also: the whole pipeline as
users call it - one call per batch ("pipeline": each call decodes its batch, then infers) and one call over all
the images ("stream", as `hyads predict` / `evaluate` on a folder: the next batch decodes while this one is
inferred) - the bare feature extractor alone, this machine's measured fp32 matmul GFLOP/s, the model's FLOPs
per image (so the utilisation is printed), and peak RSS. Warm-up runs are excluded; each figure is the median of
several repetitions.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .features import texture as tex
from .pipeline import HyADS, rgb_batch
from .segmentation import labels_from_probs, predict_probs


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """Measured fp32 GEMM throughput of this machine with torch's BLAS (GFLOP/s, median of reps)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def feature_flops(model: HyADS) -> int:
    """FLOPs of backbone + patch aggregation for one image (torch's flop counter: convs and matmuls)."""
    size = model.config.image_size
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.embedder_(model.backbone_.features(torch.rand(1, 3, size, size)))
    return int(counter.get_total_flops())


def _median_time(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_bench(model: HyADS, images: Sequence[Any], batch: int = 1, reps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time each stage on `images` (cycled to fill batches); returns a JSON-able dict."""
    if "patchcore" not in model.detectors:
        from .errors import HyADSError

        raise HyADSError("bench compares the pipeline with its backbone: the model needs the patchcore detector")
    size = model.config.image_size
    runtime = "torch" if model.runtime is None else Path(model.runtime.path).name
    images = list(images)
    n = max(batch, (len(images) // batch) * batch)
    images = [images[i % len(images)] for i in range(n)]
    batches = [images[i : i + batch] for i in range(0, n, batch)]
    model.progress = False
    model.config.batch_size = batch

    stage: dict[str, list[float]] = {k: [] for k in ("decode", "backbone", "aggregation", "features", "knn", "post",
                                                     "texture", "ae", "fusion", "seg")}
    latencies: list[float] = []

    from .fusion import fuse

    dets = model.detectors
    head = model.onnx_parts.get("seghead", getattr(model, "seghead_", None))

    def one_pass(record: bool) -> None:
        for b in batches:
            t = {"start": time.perf_counter()}
            rgb = rgb_batch(b, size)
            t["decode"] = time.perf_counter()
            maps: dict[str, np.ndarray] = {}
            if "patchcore" in dets:
                if model.runtime is None:
                    with torch.inference_mode():
                        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()
                        taps = model.backbone_.features(x)
                        t["backbone"] = time.perf_counter()
                        p = model.embedder_(taps).permute(0, 2, 3, 1).contiguous().numpy()
                        t["aggregation"] = time.perf_counter()
                else:
                    p = model.runtime(rgb)
                    t["features"] = time.perf_counter()
                bsz, h, w, d = p.shape
                dist = model.bank_.distances(p.reshape(-1, d), h * w).reshape(bsz, 1, h, w)
                t["knn"] = time.perf_counter()
                maps["patchcore"] = model._upsample_smooth(dist)
                t["post"] = time.perf_counter()
            desc = None
            if "texture" in dets:
                desc = tex.batch_descriptors(rgb)
                maps["texture"] = model._texture_maps(rgb, desc)
                t["texture"] = time.perf_counter()
            if "ae" in dets:
                maps["ae"] = model._ae_maps(rgb)
                t["ae"] = time.perf_counter()
            fuse(maps, model.weights_, model.map_stats_).reshape(len(rgb), -1).max(1)
            t["fusion"] = time.perf_counter()
            if head is not None:
                labels_from_probs(predict_probs(head, *model._seg_inputs(rgb, desc, p, maps), (size, size)))
                t["seg"] = time.perf_counter()
            if record:
                names = list(t)
                for prev, cur in zip(names[:-1], names[1:]):
                    stage[cur].append(t[cur] - t[prev])
                if "aggregation" in t:
                    stage["features"].append(t["aggregation"] - t["decode"])
                latencies.append(t[names[-1]] - t["start"])

    for _ in range(warmup):
        one_pass(False)
    totals = []
    for _ in range(reps):
        for v in stage.values():
            v.clear()
        latencies.clear()
        t = time.perf_counter()
        one_pass(True)
        totals.append(time.perf_counter() - t)
    per_image_ms = {k: 1000 * sum(v) / n for k, v in stage.items() if v}
    total_ms = 1000 * statistics.median(totals) / n

    # The whole pipeline as a user calls it (anomaly_map on paths), and the bare feature extractor alone.
    pipeline_s = _median_time(lambda: [model.anomaly_map(b) for b in batches], reps)
    stream_s = _median_time(lambda: model.anomaly_map(images), reps)
    rgb_batches = [rgb_batch(b, size) for b in batches]
    bare_s = _median_time(lambda: [model._patches(r) for r in rgb_batches], reps)
    if model.runtime is None:
        with torch.inference_mode():
            xs = [torch.from_numpy(r).permute(0, 3, 1, 2).contiguous() for r in rgb_batches]
            backbone_s = _median_time(lambda: [model.backbone_.features(x) for x in xs], reps)
    else:
        backbone_s = bare_s

    flops_features = feature_flops(model)
    bank_rows, dim = model.bank_.bank_.shape
    grid = (size // model.backbone_.tap_strides[0]) ** 2
    flops_knn_exact = 2 * grid * bank_rows * dim
    gflops = matmul_gflops()
    img_s = n / pipeline_s
    lat = np.array(latencies) * 1000 / batch if batch > 1 else np.array(latencies) * 1000
    return {
        "runtime": runtime,
        "batch": batch,
        "images": n,
        "threads": torch.get_num_threads(),
        "pipeline_images_per_second": img_s,
        "bare_backbone_images_per_second": n / backbone_s,
        "bare_features_images_per_second": n / bare_s,
        "pipeline_over_backbone": img_s / (n / backbone_s),
        "stream_images_per_second": n / stream_s,
        "stream_over_backbone": backbone_s / stream_s,
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "stage_ms_per_image": per_image_ms,
        "stage_total_ms_per_image": total_ms,
        "knn_share": per_image_ms.get("knn", 0.0) / sum(v for k, v in per_image_ms.items()
                                                         if k not in ("backbone", "aggregation")),
        "bank_rows": int(bank_rows),
        "index": model.bank_.index.kind,
        "knn_engine": model.bank_.index.engine,
        "feature_gflop_per_image": flops_features / 1e9,
        "knn_exact_gflop_per_image": flops_knn_exact / 1e9,
        "machine_matmul_gflops": gflops,
        "feature_utilisation": (flops_features * n / backbone_s / 1e9) / gflops,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }

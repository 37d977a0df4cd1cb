"""ONNX pipeline with faiss on 2 vs 1 OpenMP threads (needs runs/bottle-fast and its ONNX export, see
docs/RESULTS.md "Fast configuration"). Each setting is benchmarked twice with hyads.bench.run_bench.

    .venv/bin/python benchmarks/faiss_threads.py
"""

import faiss
from hyads.persist import load_model
from hyads.bench import run_bench
from hyads.data import load_dataset
ds = load_dataset("../shared/data/mvtec_ad/bottle")
m = load_model("runs/bottle-fast"); m.progress = False
m.use_runtime("onnx", "runs/bottle-fast/onnx", threads=2)
for th in (2, 1, 2, 1):
    faiss.omp_set_num_threads(th)
    for b in (1, 8):
        r = run_bench(m, ds.train[:32], batch=b, reps=5)
        st = r["stage_ms_per_image"]
        print("faiss threads", th, "batch", b, "pipe/backbone", round(r["pipeline_over_backbone"], 3), "knn share", round(r["knn_share"], 3), "knn ms", round(st["knn"], 2), flush=True)

"""kNN stage of a fitted model inside the pipeline (hyads.bench.run_bench), for several rerank fractions and
faiss OpenMP thread counts, batch 1 and 8, two rounds (rows alternate so drift hits all of them).

    .venv/bin/python benchmarks/knn_rerank.py MODEL_DIR [RUNTIME]

RUNTIME: torch | onnx | onnx-int8 (default; needs `hyads export MODEL_DIR --int8`).
"""

from __future__ import annotations

import sys

import faiss

from hyads.bench import run_bench
from hyads.data import load_dataset
from hyads.persist import load_model


def main(model_dir: str, runtime: str = "onnx-int8") -> None:
    ds = load_dataset("../shared/data/mvtec_ad/bottle")
    m = load_model(model_dir)
    m.progress = False
    if runtime != "torch":
        m.use_runtime(runtime, f"{model_dir}/onnx", threads=2)
    for _ in range(2):
        for threads in (2, 1):
            for rerank in (0.05, 0.03, 0.0):
                faiss.omp_set_num_threads(threads)
                m.bank_.rerank, m.bank_._index = rerank, None  # rebuilt with this fraction on first use
                for batch in (1, 8):
                    r = run_bench(m, ds.train[:32], batch=batch, reps=5)
                    st = r["stage_ms_per_image"]
                    print(f"faiss threads {threads} rerank {rerank:.2f} batch {batch}: pipeline / backbone "
                          f"{r['pipeline_over_backbone']:.3f}, kNN {st['knn']:.2f} ms, kNN share "
                          f"{100 * r['knn_share']:.1f} %, features {st['features']:.2f} ms", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

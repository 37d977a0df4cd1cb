#!/usr/bin/env bash
# Every runtime at batch 1 and 8, one `hyads bench` process per run, REPS rounds (rows alternate so drift hits
# all of them); prints one line per run and writes each run's JSON under OUT_DIR. POLICIES lists OpenMP wait
# policies to alternate ("default" = OMP_WAIT_POLICY unset; e.g. POLICIES="default PASSIVE"); ENGINES lists
# kNN engines to alternate (`hyads bench --knn-engine`; e.g. ENGINES="scan faiss").
#
#     [REPS=3] [POLICIES=default] [ENGINES=auto] bash benchmarks/runtimes.sh MODEL_DIR [OUT_DIR]
#
# MODEL_DIR needs an ONNX export with an INT8 graph (`hyads export MODEL_DIR --int8`).
set -euo pipefail
model=${1:?MODEL_DIR}
out=${2:-runs/runtimes}
mkdir -p "$out"
for rep in $(seq 1 "${REPS:-3}"); do
  for runtime in torch onnx onnx-int8; do
    for batch in 1 8; do
      for policy in ${POLICIES:-default}; do
        for engine in ${ENGINES:-auto}; do
          tag=""
          [ "$policy" = default ] || tag="$policy-"
          [ "$engine" = auto ] || tag="$tag$engine-"
          f="$out/$tag$runtime-b$batch-r$rep.json"
          if [ "$policy" = default ]; then
            env -u OMP_WAIT_POLICY .venv/bin/hyads bench "$model" --runtime "$runtime" --batch "$batch" --threads 2 \
              --knn-engine "$engine" --out "$f" > /dev/null 2>&1
          else
            OMP_WAIT_POLICY="$policy" .venv/bin/hyads bench "$model" --runtime "$runtime" --batch "$batch" --threads 2 \
              --knn-engine "$engine" --out "$f" > /dev/null 2>&1
          fi
          .venv/bin/python - "$f" "$policy" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
st = r["stage_ms_per_image"]
print(f"{sys.argv[2]:8s} {r.get('knn_engine', 'faiss'):5s} {r['runtime']:18s} b{r['batch']}  "
      f"pipeline {r['pipeline_images_per_second']:6.1f} img/s  "
      f"stream {r.get('stream_images_per_second', 0):6.1f}  "
      f"bare {r['bare_backbone_images_per_second']:6.1f}  ratio {r['pipeline_over_backbone']:.2f}  "
      f"decode {st['decode']:4.2f} ms  features {st.get('features', 0.0):5.2f} ms  knn {st['knn']:4.2f} ms  "
      f"knn share {100 * r['knn_share']:4.1f} %  "
      f"p50/p95 {r['latency_ms_p50']:.1f}/{r['latency_ms_p95']:.1f} ms  matmul {r['machine_matmul_gflops']:.0f} GFLOP/s  "
      f"rss {r['peak_rss_mib']:.0f} MiB", flush=True)
PY
        done
      done
    done
  done
done

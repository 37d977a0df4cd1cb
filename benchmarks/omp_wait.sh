#!/usr/bin/env bash
# OpenMP wait policy and the batch-1 pipeline: torch and faiss each bundle their own libgomp, and after a
# parallel region each pool's threads spin for a while, stealing the 2 cores from the next stage. Runs
# `hyads bench` for every runtime at batch 1 and 8 with the default policy and with OMP_WAIT_POLICY=PASSIVE,
# alternating, and prints one line per run.
#
#     [REPS=2] bash benchmarks/omp_wait.sh MODEL_DIR [OUT_DIR]
#
# MODEL_DIR needs an ONNX export with an INT8 graph (`hyads export MODEL_DIR --int8`).
set -euo pipefail
model=${1:?MODEL_DIR}
out=${2:-runs/omp_wait}
mkdir -p "$out"
for rep in $(seq 1 "${REPS:-2}"); do
  for runtime in torch onnx onnx-int8; do
    for batch in 1 8; do
      for policy in default PASSIVE; do
        f="$out/$policy-$runtime-b$batch-r$rep.json"
        if [ "$policy" = default ]; then
          env -u OMP_WAIT_POLICY .venv/bin/hyads bench "$model" --runtime "$runtime" --batch "$batch" --threads 2 --out "$f" > /dev/null 2>&1
        else
          OMP_WAIT_POLICY=PASSIVE .venv/bin/hyads bench "$model" --runtime "$runtime" --batch "$batch" --threads 2 --out "$f" > /dev/null 2>&1
        fi
        .venv/bin/python - "$f" "$policy" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
st = r["stage_ms_per_image"]
feat = st.get("features", 0.0)
print(f"{sys.argv[2]:8s} {r['runtime']:18s} b{r['batch']}  pipeline {r['pipeline_images_per_second']:6.1f} img/s  "
      f"bare {r['bare_backbone_images_per_second']:6.1f}  ratio {r['pipeline_over_backbone']:.2f}  "
      f"in-loop features {feat:5.2f} ms  knn {st['knn']:4.2f} ms  knn share {100 * r['knn_share']:4.1f} %", flush=True)
PY
      done
    done
  done
done

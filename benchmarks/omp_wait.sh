#!/usr/bin/env bash
# OpenMP wait policy and the batch-1 pipeline: torch and faiss each bundle their own libgomp, and after a
# parallel region each pool's threads spin for a while, stealing the 2 cores from the next stage. Runs
# `hyads bench` for every runtime at batch 1 and 8 with the default policy and with OMP_WAIT_POLICY=PASSIVE,
# alternating, and prints one line per run (benchmarks/runtimes.sh with both policies).
#
#     [REPS=2] bash benchmarks/omp_wait.sh MODEL_DIR [OUT_DIR]
#
# MODEL_DIR needs an ONNX export with an INT8 graph (`hyads export MODEL_DIR --int8`).
set -euo pipefail
POLICIES="default PASSIVE" REPS="${REPS:-2}" exec bash "$(dirname "$0")/runtimes.sh" "${1:?MODEL_DIR}" "${2:-runs/omp_wait}"

#!/usr/bin/env bash
# The GPU figures, in one go on a CUDA machine: CUDA-only tests, bench-train (fp32 and bf16), bench-ease on
# the GPU, and the accuracy experiments at the reference budget (PROFILE=gpu in bench/results.sh).
# Usage: bash bench/gpu.sh [check] [train] [graph] [infer] [ease] [exp DATASET...]
# Needs python3 with torch (CUDA), pydantic, pyarrow, pandas, scipy, psutil, tqdm; PY overrides python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 RECSYS_DATA_DIR=${RECSYS_DATA_DIR:-../shared/data}
while (($#)); do
  step=$1; shift
  case "$step" in
    check) "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
           "$PY" -m pytest -q -p no:cacheprovider tests/model 2>&1 | tail -5 ;;
    train) "$PY" -m bench.train_epoch --epochs 3
           "$PY" -m bench.train_epoch --epochs 3 --bf16 --skip-reference ;;
    graph) "$PY" -m bench.train_epoch --epochs 3 --cuda-graph
           "$PY" -m bench.train_epoch --epochs 3 --cuda-graph --bf16 --skip-reference ;;
    infer) "$PY" -m bench.infer --users 1000000 --device cuda --memory-budget-mb 8192 --workdir /tmp/bench-infer \
             --parallel-shards 1
           "$PY" -m bench.infer --users 1000000 --device cuda --memory-budget-mb 8192 --workdir /tmp/bench-infer
           "$PY" -m bench.infer --users 1000000 --device cuda --memory-budget-mb 8192 --workdir /tmp/bench-infer \
             --parallel-shards 8
           "$PY" -m bench.infer --users 1000000 --device cuda --memory-budget-mb 8192 --workdir /tmp/bench-infer \
             --precision bf16 ;;
    profile) "$PY" -m bench.train_epoch --epochs 2 --bf16 --skip-reference --profile --no-record ;;
    ease) "$PY" -m bench.ease_fit --dataset gowalla --device cuda ;;
    exp) sets=(); while (($#)) && [[ ! $1 =~ ^(check|train|graph|infer|ease|profile)$ ]]; do sets+=("$1"); shift; done
         PROFILE=gpu RECSYS="$PY -m pipeline.cli.main" bash bench/results.sh "${sets[@]}" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done

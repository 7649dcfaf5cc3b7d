#!/usr/bin/env bash
# Reproduces docs/results.md: the experiment on each real data set, then the concatenated report.
# Budgets are set per data set to what a 2-core CPU can do; on a GPU raise --epochs to 200 (the reference).
# Usage: bash bench/results.sh [dataset ...]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
RECSYS=${RECSYS:-.venv/bin/recsys}
OUT=${OUT:-out/results}
ALL=(ml-latest-small ml-1m-implicit-ge4 gowalla amazon-cds)
sets=("${@:-${ALL[@]}}")
for ds in "${sets[@]}"; do
  case "$ds" in
    ml-latest-small)
      args=(--models popularity,ease,multivae,multivae-pia,recvae,recvae-pia --seeds 5 --epochs 60
            --recvae-epochs 10 --patience 8) ;;
    ml-1m-implicit-ge4)
      # about 2 s per Multi-VAE epoch on one CPU core: 3 seeds and 30 epochs fit the session's budget
      args=(--models popularity,ease,multivae,multivae-pia,recvae,recvae-pia --seeds 3 --epochs 30
            --recvae-epochs 10 --patience 5) ;;
    gowalla|amazon-cds)
      # 41k / 36k items: about 45 s per Multi-VAE epoch on 2 CPU cores, EASE needs a 41k x 41k inverse.
      args=(--models popularity,multivae,multivae-pia --seeds 1 --epochs 4 --patience 2 --pia-grid 0.1) ;;
    *) echo "unknown data set $ds" >&2; exit 2 ;;
  esac
  echo "== $ds: ${args[*]}"
  "$RECSYS" experiment --dataset "$ds" --out "$OUT/$ds" --no-progress "${args[@]}"
done
.venv/bin/python bench/collect_results.py "$OUT" docs/results.md

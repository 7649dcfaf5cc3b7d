#!/usr/bin/env bash
# Issue 28's re-run of gowalla and amazon-cds with the current defaults (the `progress` β regime, EDLAE), sized
# for one short GPU lease: every model group runs in its own process on the one GPU (the ten of two
# sets kept an H200's SMs 96% busy on average: nvidia-smi dmon every 10 s, 2026-12-04), and every process is
# stopped at DEADLINE seconds. Each process checkpoints every fit and writes results after each seed, so a stopped
# run keeps what it finished (and `--resume` in the same OUT continues it).
#   cf:      popularity, EASE (l2 = 100: seed 0's validation choice on both sets), EDLAE (its default grid, searched
#            on seed 0's validation users), seeds 0-2
#   mvae:    Multi-VAE and Multi-VAE + PIA, seed 0, λ_A in {0.1, 1} on validation users, up to 200 epochs, patience 20
#   mvae-s12: the same on seeds 1-2 with λ_A = 1 (seed 0's validation choice on both sets in the earlier runs)
#   recvae / recvae-pia: seed 0, up to RECVAE_EPOCHS (60) epochs, patience 20, λ_A = 0.1 (seed 0's earlier choice)
# On one H200 (2026-12-04): 490 s finished all but seed 2's Multi-VAE + PIA on both sets; the same command
# again (DEADLINE=230) finished those in 47 s. RecVAE is the slowest group (360-460 s per fit with ten processes).
# Usage: [PY=python3] [OUT=out/results] [DEADLINE=500] [DEVICE=cuda] bash bench/gpu_sparse_sets.sh [dataset ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-out/results}
DEADLINE=${DEADLINE:-500}
DEVICE=${DEVICE:-cuda}
RECVAE_EPOCHS=${RECVAE_EPOCHS:-60}
[[ $DEADLINE =~ ^[0-9]+$ && $RECVAE_EPOCHS =~ ^[0-9]+$ ]] || { echo "DEADLINE and RECVAE_EPOCHS must be integers" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 RECSYS_DATA_DIR=${RECSYS_DATA_DIR:-../shared/data}
sets=("$@"); ((${#sets[@]})) || sets=(gowalla amazon-cds)
mkdir -p "$OUT"

launch() {  # launch NAME THREADS ARGS...: one `recsys experiment` in the background, its log beside its folder
  local name=$1 threads=$2; shift 2
  OMP_NUM_THREADS=$threads timeout "$DEADLINE" "$PY" -m pipeline.cli.main -v experiment --device "$DEVICE" --no-progress \
    --resume --out "$OUT/$name" "$@" >> "$OUT/$name.log" 2>&1 &  # appends: a resumed run keeps the first log
}

for ds in "${sets[@]}"; do
  launch "$ds-cf" 4 --dataset "$ds" --models popularity,ease,edlae --seeds 3 --ease-grid 100
  launch "$ds-mvae" 1 --dataset "$ds" --models multivae,multivae-pia --seeds 1 --epochs 200 --patience 20 \
    --pia-grid 0.1,1
  launch "$ds-mvae-s12" 1 --dataset "$ds" --models multivae,multivae-pia --seeds 2 --first-seed 1 --epochs 200 \
    --patience 20 --pia-grid 1
  launch "$ds-recvae" 1 --dataset "$ds" --models recvae --seeds 1 --recvae-epochs "$RECVAE_EPOCHS" --patience 20
  launch "$ds-recvae-pia" 1 --dataset "$ds" --models recvae-pia --seeds 1 --recvae-epochs "$RECVAE_EPOCHS" \
    --patience 20 --pia-grid 0.1
done
start=$SECONDS
wait
echo "all runs ended after $((SECONDS - start)) s (deadline $DEADLINE s each)"
for f in "$OUT"/*.log; do echo "== $f"; tail -n 3 "$f"; done

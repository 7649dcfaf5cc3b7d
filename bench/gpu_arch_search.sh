#!/usr/bin/env bash
# Issue 28: the autoencoders' width, latent size and dropout searched on validation users (`recsys experiment
# --arch-grid`), sized for one short GPU lease. Every process shares the one GPU.
#   phase 1 (--tune-only: no test user is scored): each value of a set's grid in its own process, on seed 0's
#            validation users: RecVAE + PIA (λ_A 0.1, seed 0's earlier choice) on gowalla and amazon-cds; Multi-VAE
#            and Multi-VAE + PIA (λ_A 1) on ml-1m-implicit-ge4.
#   pick:    per (set, model) the value with the best validation NDCG@100 (OUT/chosen-SET-MODEL.json holds the table).
#   phase 2: the picked value over seeds. Seed 0 of RecVAE + PIA resumes the winner's phase-1 folder, whose fit
#            phase 1 kept (--keep-fits): it is loaded and its test users scored, not fit again. Seeds 1-2, and RecVAE
#            (at RecVAE + PIA's value: the twin is not searched, to fit the lease) on seeds 0-2, are fit anew, one
#            process each; Multi-VAE and Multi-VAE + PIA seeds 0-4 at their own values. Test users are scored here only.
# On one H200 (2026-12-04), eight RecVAE processes sharing it: the default width finished a fit on gowalla and
# amazon-cds within 370 s, the wider values did not (give P1_DEADLINE >= 900 for this grid); ml-1m's five Multi-VAE
# processes finished phase 1 in < 240 s and phase 2 (ten fits) in ~35 s. `-v` logs one line per epoch, so a stopped
# fit shows how far it got.
# Every process has a deadline and checkpoints each fit; running the script again in the same OUT resumes (phase 1
# values already searched are not fit again). PHASE=2 skips phase 1's launches (its results are read).
# Usage: [PY=python3] [OUT=out/arch] [P1_DEADLINE=240] [P2_DEADLINE=320] [PHASE=all|2] bash bench/gpu_arch_search.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-out/arch}
P1_DEADLINE=${P1_DEADLINE:-240}
P2_DEADLINE=${P2_DEADLINE:-320}
PHASE=${PHASE:-all}
ML1M=${ML1M:-1}  # 0: the sparse sets only
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA <<< "${EXTRA:-}"  # appended to every run's options (a dry run: EXTRA="--epochs 2 --recvae-epochs 2")
[[ $P1_DEADLINE =~ ^[0-9]+$ && $P2_DEADLINE =~ ^[0-9]+$ && $PHASE =~ ^(all|2)$ ]] || {
  echo "P1_DEADLINE and P2_DEADLINE must be integers, PHASE all or 2" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 RECSYS_DATA_DIR=${RECSYS_DATA_DIR:-../shared/data}
mkdir -p "$OUT"

SPARSE=(gowalla amazon-cds)
# RecVAE's default (600-200, dropout 0.5) first, then wider and wider-with-less-dropout
RECVAE_GRID=("dropout=0.5" "hidden_dim=1200,latent_dim=400" "hidden_dim=2000,latent_dim=600"
             "hidden_dim=1200,latent_dim=400,dropout=0.3")
MVAE_GRID=("dropout=0.5" "hidden_dims=[1200],latent_dim=400" "hidden_dims=[1200],latent_dim=400,dropout=0.3"
           "beta_max=0.5" "hidden_dims=[2000],latent_dim=600")
RECVAE_OPTS=(--recvae-epochs 45 --patience 10 --pia-grid 0.1)
MVAE_OPTS=(--epochs 200 --patience 20 --pia-grid 1)

pids=()
launch() {  # launch DEADLINE NAME ARGS...: one `recsys experiment` in the background, its log beside its folder
  local deadline=$1 name=$2; shift 2
  OMP_NUM_THREADS=1 timeout "$deadline" "$PY" -m pipeline.cli.main -v experiment --device "$DEVICE" --no-progress \
    --resume --out "$OUT/$name" "$@" "${EXTRA[@]}" >> "$OUT/$name.log" 2>&1 &
  pids+=($!)
}
wait_all() { ((${#pids[@]})) && wait "${pids[@]}"; pids=(); }

pick() {  # pick TABLE_JSON MODEL RUN_FOLDER...: the arch_grid value with the best validation NDCG@100 as CLI text
  "$PY" - "$@" <<'EOF'
import json, sys
from pathlib import Path
table, model, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for f in folders:
    p = Path(f) / "results.json"
    if p.exists():
        rows += [r | {"run": f} for r in json.loads(p.read_text()).get("tuning", {}).get(model, [])]
if not rows:
    sys.exit(f"no finished search of {model} in {folders}")
best = max(rows, key=lambda r: r["val_ndcg@100"])
Path(table).write_text(json.dumps({"model": model, "chosen": best, "rows": rows}, indent=1))
print(",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in best["value"].items() if k != "lambda_a"))
EOF
}

nvidia-smi dmon -s u -d 10 > "$OUT/dmon.log" 2>&1 &
dmon=$!
start=$SECONDS
if [[ $PHASE == all ]]; then
  for ds in "${SPARSE[@]}"; do
    for i in "${!RECVAE_GRID[@]}"; do
      launch "$P1_DEADLINE" "p1-$ds-recvae-pia-$i" --dataset "$ds" --models recvae-pia --seeds 1 --tune-only \
        --keep-fits "${RECVAE_OPTS[@]}" --arch-grid "${RECVAE_GRID[$i]}"
    done
  done
  if [[ $ML1M == 1 ]]; then
    for i in "${!MVAE_GRID[@]}"; do
      launch "$P1_DEADLINE" "p1-ml-1m-multivae-$i" --dataset ml-1m-implicit-ge4 --models multivae,multivae-pia \
        --seeds 1 --tune-only --keep-fits "${MVAE_OPTS[@]}" --arch-grid "${MVAE_GRID[$i]}"
    done
  fi
  wait_all
  echo "phase 1 ended after $((SECONDS - start)) s"
fi

# phase 2: seed 0 resumes the winner's own phase-1 folder (its kept fit is loaded and scored, not fit again); the
# other seeds fit the winner anew
for ds in "${SPARSE[@]}"; do
  runs=(); for i in "${!RECVAE_GRID[@]}"; do runs+=("$OUT/p1-$ds-recvae-pia-$i"); done
  arch=$(pick "$OUT/chosen-$ds-recvae-pia.json" recvae-pia "${runs[@]}") || continue
  i=$(grep -o '"run": "[^"]*"' "$OUT/chosen-$ds-recvae-pia.json" | head -1 | sed 's/.*-//; s/"//')
  echo "$ds recvae-pia chosen on validation: $arch (grid value $i)"
  launch "$P2_DEADLINE" "p1-$ds-recvae-pia-$i" --dataset "$ds" --models recvae-pia --seeds 1 --keep-fits \
    "${RECVAE_OPTS[@]}" --arch-grid "${RECVAE_GRID[$i]}"
  for seed in 1 2; do
    launch "$P2_DEADLINE" "p2-$ds-s$seed" --dataset "$ds" --models recvae-pia,recvae --seeds 1 --first-seed "$seed" \
      "${RECVAE_OPTS[@]}" --arch-grid "$arch"
  done
  launch "$P2_DEADLINE" "p2-$ds-recvae-s0" --dataset "$ds" --models recvae --seeds 1 "${RECVAE_OPTS[@]}" --arch-grid "$arch"
done
if [[ $ML1M == 1 ]]; then
  for model in multivae multivae-pia; do
    runs=(); for i in "${!MVAE_GRID[@]}"; do runs+=("$OUT/p1-ml-1m-multivae-$i"); done
    arch=$(pick "$OUT/chosen-ml-1m-$model.json" "$model" "${runs[@]}") || continue
    echo "ml-1m $model chosen on validation: $arch"
    for seed in 0 1 2 3 4; do
      launch "$P2_DEADLINE" "p2-ml-1m-$model-s$seed" --dataset ml-1m-implicit-ge4 --models "$model" --seeds 1 \
        --first-seed "$seed" "${MVAE_OPTS[@]}" --arch-grid "$arch"
    done
  done
fi
wait_all
kill "$dmon" 2>/dev/null
echo "all runs ended after $((SECONDS - start)) s"
for f in "$OUT"/p*.log; do echo "== $f"; grep -E "seed [0-9]:|chosen|Error|error" "$f" | tail -n 3; done

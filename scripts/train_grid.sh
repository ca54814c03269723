#!/usr/bin/env bash
# scripts/train_grid.sh TASK PROFILE OUT SMOKE_DATA_FILE FAKE_SIZE: what reproduce_mnist.sh and reproduce_sylvester.sh
# share. Runs the grid of experiment=<TASK>_<PROFILE> (nfvi/conf/train/experiment/) into OUT/runs through Hydra's
# joblib launcher (NFVI_JOBS jobs side by side, one torch thread each; default 2, paper: 1) with resume=true, then
# writes its tables into OUT/tables. The smoke profile uses dataset=fake (FAKE_SIZE images) when
# $NFVI_DATA/SMOKE_DATA_FILE is missing. Environment: NFVI_DATA, SEEDS (e.g. "0,1,2"; default 0), NFVI_TRAIN_ARGS
# (extra overrides). Exits 1 when a run did not finish (the tables then hold those that did).
set -euo pipefail
TASK="$1"; PROFILE="$2"; OUT="$3"; SMOKE_DATA_FILE="$4"; FAKE_SIZE="$5"
read -r -a EXTRA <<< "${NFVI_TRAIN_ARGS:-}"
DATASET=()
if [ "$PROFILE" = smoke ] && [ ! -f "${NFVI_DATA:-./data}/$SMOKE_DATA_FILE" ]; then
  echo "reproduce_$TASK: no ${NFVI_DATA:-./data}/$SMOKE_DATA_FILE; the smoke profile uses dataset=fake instead" >&2
  DATASET=(dataset=fake "dataset.fake_size=$FAKE_SIZE")
fi
JOBS="${NFVI_JOBS:-$([ "$PROFILE" = paper ] && echo 1 || echo 2)}"
LAUNCHER=()
if [ "$JOBS" -gt 1 ]; then LAUNCHER=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" threads=1); fi
echo "== reproduce_$TASK: experiment=${TASK}_$PROFILE ${DATASET[*]} seeds ${SEEDS:-0}, $JOBS job(s) at a time -> $OUT"
mkdir -p "$OUT/runs"
status=0
nfvi train -m "experiment=${TASK}_$PROFILE" ${DATASET[@]+"${DATASET[@]}"} "seed=${SEEDS:-0}" resume=true \
  "hydra.sweep.dir=$OUT/runs" ${LAUNCHER[@]+"${LAUNCHER[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} || status=$?
expected=$(find "$OUT/runs" -mindepth 2 -maxdepth 2 -name .hydra | wc -l)
found=$(find "$OUT/runs" -mindepth 2 -maxdepth 2 -name results.json | wc -l)
if [ "$found" -lt "$expected" ] || [ "$status" -ne 0 ]; then
  echo "reproduce_$TASK: $found of $expected runs finished (sweep exit status $status); tabulating those" >&2
  status=1
fi
nfvi report "search=[$OUT/runs]" "out_dir=$OUT/tables" tasks=[vae]
echo "== reproduce_$TASK: tables in $OUT/tables"
exit "$status"

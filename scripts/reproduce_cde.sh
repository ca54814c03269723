#!/usr/bin/env bash
# Conditional density estimation on the DDN benchmark's UCI sets (docs/cde.md), then the table.
#   bash scripts/reproduce_cde.sh PROFILE [OUT_DIR]      (uses `nfvi` from PATH)
# The grids are experiment=cde_baselines_$PROFILE (gaussian, mdn) and experiment=cde_$PROFILE (planar, radial), in
# nfvi/conf/cde/experiment/: smoke fish only (the generated sine set without the data), 2 seeds, 5 epochs (< 1 minute);
# quick the 4 benchmark sets x {gaussian, mdn, planar K=4, radial K=4}, 5 seeds; paper all 7 sets, K in {4, 8}.
# Writes into OUT_DIR (default outputs/reproduce/<profile>/cde)/{baselines,flows}/<run>/ and the table into
# OUT_DIR/tables/. Safe to re-run: each run folder is overwritten. Single-threaded jobs, NFVI_JOBS (default 2) at a
# time through Hydra's joblib launcher.
set -euo pipefail
PROFILE="${1:-quick}"
cd "$(dirname "$0")/.."
case "$PROFILE" in
  smoke|quick|paper) ;;
  *) echo "reproduce_cde: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, paper" >&2; exit 2 ;;
esac
OUT="${2:-outputs/reproduce/$PROFILE/cde}"
if ! command -v nfvi >/dev/null; then
  echo "reproduce_cde.sh: nfvi is not on PATH; run 'make install' and put .venv/bin on PATH" >&2
  exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATASET=()
if [ "$PROFILE" = smoke ] && [ ! -f "${NFVI_DATA:-./data}/uci/qsar_fish_toxicity.csv" ]; then
  echo "reproduce_cde: no ${NFVI_DATA:-./data}/uci/qsar_fish_toxicity.csv; the smoke profile uses dataset=sine instead" >&2
  DATASET=(dataset=sine)
fi
JOBS="${NFVI_JOBS:-2}"
LAUNCHER=()
if [ "$JOBS" -gt 1 ]; then LAUNCHER=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS"); fi
nfvi cde -m "experiment=cde_baselines_$PROFILE" ${DATASET[@]+"${DATASET[@]}"} resume=true "hydra.sweep.dir=$OUT/baselines" \
  ${LAUNCHER[@]+"${LAUNCHER[@]}"}
nfvi cde -m "experiment=cde_$PROFILE" ${DATASET[@]+"${DATASET[@]}"} resume=true "hydra.sweep.dir=$OUT/flows" ${LAUNCHER[@]+"${LAUNCHER[@]}"}
nfvi report "search=[$OUT]" "out_dir=$OUT/tables" "tasks=[cde]"

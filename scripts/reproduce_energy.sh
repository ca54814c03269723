#!/usr/bin/env bash
# The paper's 2-D experiments (Sec. 6.1, Table 1, Fig. 3) at one profile: the grid of experiment=energy_$PROFILE
# (nfvi/conf/energy/experiment/: U1..U4 x planar/radial/NICE x K), then Figure 3 and the tables.
#   bash scripts/reproduce_energy.sh PROFILE [OUT_DIR [EXTRA_OVERRIDES...]]      (uses `nfvi` from PATH)
#   e.g. bash scripts/reproduce_energy.sh quick outputs/energy_raw wall=0     (the raw, improper U2-U4)
#        bash scripts/reproduce_energy.sh quick outputs/energy_seeds seed=0,1,2
# Runs land in OUT_DIR/<target>_<flow>_K<length>_seed<seed>/ (default OUT_DIR: outputs/reproduce/<profile>/energy),
# tables and figures in OUT_DIR/tables/. Safe to re-run: finished runs are skipped (resume=true).
# NFVI_JOBS (default 2) jobs side by side through Hydra's joblib launcher, one torch thread each; 1: the basic launcher.
set -euo pipefail
PROFILE="${1:-quick}"
OUT="${2:-outputs/reproduce/$PROFILE/energy}"
shift $(( $# < 2 ? $# : 2 ))
case "$PROFILE" in
  smoke|quick|paper) ;;
  *) echo "reproduce_energy: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, paper" >&2; exit 2 ;;
esac
JOBS="${NFVI_JOBS:-2}"
LAUNCHER=()
if [ "$JOBS" -gt 1 ]; then LAUNCHER=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS"); fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # tiny problems, jobs side by side
mkdir -p "$OUT"
status=0
nfvi energy -m "experiment=energy_$PROFILE" "$@" resume=true "hydra.sweep.dir=$OUT" ${LAUNCHER[@]+"${LAUNCHER[@]}"} || status=$?
# A failed job (e.g. a NaN) does not stop the others: compare the jobs' folders with the finished ones.
expected=$(find "$OUT" -mindepth 2 -maxdepth 2 -name .hydra | wc -l)
found=$(find "$OUT" -mindepth 2 -maxdepth 2 -name results.json | wc -l)
nfvi report "search=[$OUT]" "out_dir=$OUT/tables" tasks=[energy]
if [ "$found" -lt "$expected" ] || [ "$status" -ne 0 ]; then
  echo "reproduce_energy: $found of $expected runs finished under $OUT (sweep exit status $status); re-run to retry the others" >&2
  exit 1
fi

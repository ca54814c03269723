#!/usr/bin/env bash
# The paper's 2-D experiments (Sec. 6.1, Table 1, Fig. 3): U1..U4 x planar/radial/NICE x K, then Figure 3 and tables.
#   bash scripts/reproduce_energy.sh PROFILE [OUT_DIR [EXTRA_OVERRIDES...]]      (uses `nfvi` from PATH)
#   e.g. bash scripts/reproduce_energy.sh quick outputs/energy_raw wall=0     (the raw, improper U2-U4)
#        bash scripts/reproduce_energy.sh quick outputs/energy_seeds seed=0,1,2
# PROFILE (wall times measured on 2 idle CPU cores; the record is in docs/energy.md):
#   smoke  K in {2, 8},     300 Adam updates (lr 1e-2, cosine), beta over 100 updates      ~40 seconds
#   quick  K in {2, 8, 32}, 4000 Adam updates (lr 1e-2, cosine), beta over 1000 updates    ~6 minutes
#   paper  K in {2, 8, 32}, 500,000 RMSprop updates (lr 1e-5, momentum 0.9), beta_t = min(1, 0.01 + t/10000)
#          (the paper's schedule; about 7 hours on 2 idle cores, estimated)
# Runs land in OUT_DIR/<target>_<flow>_K<length>_seed<seed>/ (default OUT_DIR: outputs/reproduce/<profile>/energy),
# tables and figures in OUT_DIR/tables/. Safe to re-run: runs whose results.json exists are skipped (resume=true).
# NFVI_JOBS (default 2) parallel jobs through Hydra's joblib launcher; 1 uses the basic launcher.
set -euo pipefail
PROFILE="${1:-quick}"
OUT="${2:-outputs/reproduce/$PROFILE/energy}"
shift $(( $# < 2 ? $# : 2 ))
EXTRA=("$@")
JOBS="${NFVI_JOBS:-2}"
case "$PROFILE" in
  smoke) LENGTHS=2,8;   SCHEDULE=(trainer.steps=300 trainer.anneal_steps=100 trainer.log_every=50 eval.samples=20000 eval.grid=200) ;;
  quick) LENGTHS=2,8,32; SCHEDULE=(trainer.steps=4000 trainer.anneal_steps=1000) ;;
  paper) LENGTHS=2,8,32; SCHEDULE=(optim=rmsprop trainer.steps=500000 trainer.anneal_steps=10000 trainer.lr_decay=none
                                   trainer.log_every=1000) ;;
  *) echo "reproduce_energy: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, paper" >&2; exit 2 ;;
esac
LAUNCHER=()
if [ "$JOBS" -gt 1 ]; then
  LAUNCHER=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
fi
# One thread per job: the problems are tiny and the jobs run side by side.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
echo "== energy ($PROFILE): ${SCHEDULE[*]} -> $OUT"
status=0
nfvi energy -m target=U1,U2,U3,U4 flow=planar,radial,nice "flow.length=$LENGTHS" "${SCHEDULE[@]}" ${EXTRA[@]+"${EXTRA[@]}"} resume=true \
  "hydra.sweep.dir=$OUT" 'hydra.sweep.subdir=${target}_${flow.kind}_K${flow.length}_seed${seed}' ${LAUNCHER[@]+"${LAUNCHER[@]}"} || status=$?
# A failed job (e.g. a NaN) does not stop the others; count what finished and say what is missing.
expected=$(( 4 * 3 * $(echo "$LENGTHS" | tr ',' '\n' | wc -l) ))
for override in ${EXTRA[@]+"${EXTRA[@]}"}; do  # a swept extra key (seed=0,1,2) multiplies the count
  case "$override" in *,*) expected=$(( expected * $(echo "${override#*=}" | tr ',' '\n' | wc -l) )) ;; esac
done
found=$(find "$OUT" -mindepth 2 -maxdepth 2 -name results.json | wc -l)
nfvi report "search=[$OUT]" "out_dir=$OUT/tables" tasks=[energy]
if [ "$found" -lt "$expected" ] || [ "$status" -ne 0 ]; then
  echo "reproduce_energy: $found of $expected runs finished under $OUT (sweep exit status $status); re-run to retry the others" >&2
  exit 1
fi

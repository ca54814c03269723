#!/usr/bin/env bash
# scripts/reproduce_mnist.sh PROFILE [OUT]: the paper's MNIST experiment (Sec. 6.2, Table 2, Figure 4) at one profile,
# the grid of experiment=mnist_$PROFILE (nfvi/conf/train/experiment/):
#   smoke  300 updates of {K=0, planar K=2, NICE K=2}; S=100 on 500 test images (dataset=fake without mnist.npz)
#   quick  K=0 and planar/NICE K in {10, 40, 80}, 20,000 Adam updates each; S=200 on 2,000 test images (~50 min)
#   long   K=0, planar K in {10, 20, 40, 80}, NICE K in {10, 40, 80}, 80,000 updates each; S=200 on all test images,
#          and planar K=80 again with S=5000 (nfvi evaluate)
#   paper  the paper's schedule (500,000 RMSprop updates, K=0 and planar/NICE K in {10, 20, 40, 80}; wants a GPU)
# Runs land in OUT/runs/<flow>_K<length>_seed<seed>/ (default OUT: outputs/reproduce/<profile>/mnist), tables and
# Figure 4 in OUT/tables/. Safe to re-run: resume=true skips finished runs and continues interrupted ones from their
# checkpoints (Ctrl-C: each job saves its checkpoint).
# Environment: NFVI_DATA (data folder), SEEDS (e.g. "0,1,2"; default 0), NFVI_TRAIN_ARGS (extra overrides, e.g.
# "trainer.steps=3000" or "device=cuda:1"), NFVI_JOBS (jobs side by side through joblib, one torch thread each;
# default 2, paper: 1).
set -euo pipefail
PROFILE="${1:-quick}"
cd "$(dirname "$0")/.."
OUT="${2:-outputs/reproduce/$PROFILE/mnist}"
case "$PROFILE" in
  smoke|quick|long|paper) ;;
  *) echo "reproduce_mnist: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, long, paper" >&2; exit 2 ;;
esac
status=0
bash scripts/train_grid.sh mnist "$PROFILE" "$OUT" mnist.npz 2000 || status=$?
if [ "$PROFILE" = long ]; then
  # planar K=80 once more with S=5000 importance samples (evaluations/S5000_*.json; resume=true skips a done one):
  # how far the paper's S=200 is from a tighter estimate. The report shows it as its own setting.
  for run in "$OUT"/runs/planar_K80_seed*; do
    [ -f "$run/results.json" ] || continue
    nfvi evaluate "run_dir=$run" eval.num_samples=5000 resume=true || status=1
  done
  nfvi report "search=[$OUT/runs]" "out_dir=$OUT/tables" tasks=[vae]
fi
exit "$status"

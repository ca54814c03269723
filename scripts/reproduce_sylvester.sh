#!/usr/bin/env bash
# scripts/reproduce_sylvester.sh PROFILE [OUT]: the Sylvester-flows protocol (van den Berg et al. 2018, Table 1: gated-conv
# VAE, z=64, Adamax, KL warm-up, early stopping) at one profile, the grid of experiment=sylvester_$PROFILE
# (nfvi/conf/train/experiment/), one job per posterior (posterior=snf_*: none, planar, IAF, O-, H-, T-SNF; K=4):
#   smoke  none/planar/O-SNF, 10 updates of batch 20; S=10 on 20 test images (dataset=fake without binarized_mnist.npz)
#   quick  all six posteriors on mnist_static, 600 updates each; S=100 on 500 test images (~1 h on 2 CPU cores)
#   paper  the paper's schedule (up to 1,000,000 updates with early stopping, S=5000) on mnist_static and omniglot
#          (wants a GPU)
# Runs land in OUT/runs/<dataset>_<posterior>_seed<seed>/ (default OUT: outputs/reproduce/<profile>/sylvester), Table 1
# in OUT/tables/. Safe to re-run: resume=true skips finished runs and continues interrupted ones from their
# checkpoints (Ctrl-C: each job saves its checkpoint).
# Environment: NFVI_DATA (data folder), SEEDS (e.g. "0,1,2"; default 0), NFVI_TRAIN_ARGS (extra overrides, e.g.
# "trainer.steps=3000" or "device=cuda:1"), NFVI_JOBS (jobs side by side through joblib, one torch thread each;
# default 2, paper: 1).
set -euo pipefail
PROFILE="${1:-quick}"
cd "$(dirname "$0")/.."
OUT="${2:-outputs/reproduce/$PROFILE/sylvester}"
case "$PROFILE" in
  smoke|quick|paper) ;;
  *) echo "reproduce_sylvester: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, paper" >&2; exit 2 ;;
esac
exec bash scripts/train_grid.sh sylvester "$PROFILE" "$OUT" binarized_mnist.npz 200

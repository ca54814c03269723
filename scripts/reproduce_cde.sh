#!/usr/bin/env bash
# Conditional density estimation on the DDN benchmark's UCI sets (docs/cde.md), then the table.
#
#   scripts/reproduce_cde.sh smoke   # fish only (the generated sine set without the data), 2 seeds, 5 epochs (< 1 minute)
#   scripts/reproduce_cde.sh quick   # the 4 benchmark sets x {gaussian, mdn, planar K=4, radial K=4}, 5 seeds
#   scripts/reproduce_cde.sh paper   # all 7 sets x {gaussian, mdn, planar, radial} x K in {4, 8}, 5 seeds
#
# Uses `nfvi` from PATH and NFVI_DATA (default ../shared/data if present). Writes into
# OUT_DIR (2nd argument; default outputs/reproduce/<profile>/cde)/{baselines,flows}/<run>/ and the table into OUT_DIR/tables/.
# Safe to re-run: each run folder is overwritten. Single-threaded (OMP_NUM_THREADS=1 unless set).
set -euo pipefail
PROFILE="${1:-quick}"
cd "$(dirname "$0")/.."
if ! command -v nfvi >/dev/null; then
  echo "reproduce_cde.sh: nfvi is not on PATH; run 'make install' and put .venv/bin on PATH" >&2
  exit 2
fi
if [ -z "${NFVI_DATA:-}" ] && [ -d ../shared/data ]; then
  export NFVI_DATA="$(cd ../shared/data && pwd)"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

SEEDS="[0,1,2,3,4]"
LENGTHS=4
EXTRA=()
case "$PROFILE" in
  smoke) DATASETS=fish; SEEDS="[0,1]"; BASELINES=gaussian; FLOWS=radial; EXTRA=(max_epochs=5 patience=5)
         if [ ! -f "${NFVI_DATA:-./data}/uci/qsar_fish_toxicity.csv" ]; then  # as reproduce_mnist.sh falls back to fake
           echo "reproduce_cde: no ${NFVI_DATA:-./data}/uci/qsar_fish_toxicity.csv; the smoke profile uses dataset=sine instead" >&2
           DATASETS=sine
         fi ;;
  quick) DATASETS=fish,concrete,energy,skillcraft; BASELINES=gaussian,mdn; FLOWS=planar,radial ;;
  paper) DATASETS=fish,concrete,energy,skillcraft,parkinsons,temperature,air; BASELINES=gaussian,mdn
         FLOWS=planar,radial; LENGTHS=4,8 ;;
  *) echo "usage: $0 smoke|quick|paper" >&2; exit 2 ;;
esac
OUT="${2:-outputs/reproduce/$PROFILE/cde}"

set -x
nfvi cde -m "dataset=$DATASETS" "model=$BASELINES" "seeds=$SEEDS" "${EXTRA[@]}" resume=true \
  "hydra.sweep.dir=$OUT/baselines" 'hydra.sweep.subdir=${dataset}_${model}'
nfvi cde -m "dataset=$DATASETS" model=flow "flow=$FLOWS" "flow.length=$LENGTHS" "seeds=$SEEDS" "${EXTRA[@]}" resume=true \
  "hydra.sweep.dir=$OUT/flows" 'hydra.sweep.subdir=${dataset}_${flow.kind}_K${flow.length}'
nfvi report "search=[$OUT]" "out_dir=$OUT/tables" "tasks=[cde]"

#!/usr/bin/env bash
# scripts/reproduce_mnist.sh PROFILE [OUT]: the paper's MNIST experiment (Sec. 6.2, Table 2, Figure 4) at one profile.
#
#   smoke  CI-sized (about a minute on 2 CPU cores): real MNIST if $NFVI_DATA/mnist.npz exists, else dataset=fake;
#          300 updates of {K=0, planar K=2, NICE K=2}; -ln p(x) with S=100 on 500 test images.
#   quick  about 50 minutes on 2 CPU cores: K=0 and planar/NICE with K in {10, 40, 80}, 20,000 Adam updates each
#          (conf/experiment/mnist_quick.yaml; docs/mnist.md says why); S=200 on 2,000 test images.
#   paper  the paper's schedule (conf/experiment/paper_mnist.yaml): 500,000 RMSprop updates at lr 1e-5 for
#          K=0 and planar/NICE K in {10, 20, 40, 80}, S=200 on all 10,000 test images; device=auto picks a GPU.
#
# Runs land in OUT/runs/<flow>_K<length>_seed<seed>/ (default OUT: outputs/reproduce/<profile>/mnist), their logs in
# OUT/logs/, tables and Figure 4 in OUT/tables/. Safe to re-run: every run passes resume=true, so a finished run is
# skipped ("nothing to do") and an interrupted one continues from its checkpoint.
# Environment: NFVI_DATA (data folder), SEEDS (e.g. "0,1,2"; default 0), NFVI_TRAIN_ARGS (extra overrides for
# every run, e.g. "trainer.steps=3000" to shorten a profile, or "device=cuda:1").
set -euo pipefail
PROFILE="${1:-quick}"
cd "$(dirname "$0")/.."
OUT="${2:-outputs/reproduce/$PROFILE/mnist}"
SEEDS="${SEEDS:-0}"
DATA="${NFVI_DATA:-./data}"
read -r -a EXTRA <<< "${NFVI_TRAIN_ARGS:-}"

if ! command -v nfvi > /dev/null; then
  echo "reproduce_mnist: nfvi is not on PATH (run make install, then use .venv/bin or make reproduce)" >&2
  exit 2
fi

# The runs of a profile, as lanes of <flow>:<K>. Lanes run side by side on the CPU profiles (one core and one torch
# thread each) and each lane runs its list in order; the lists are balanced by measured run times (benchmarks/
# mnist_record.md): a NICE layer reads the encoder's features through an MLP and takes about twice a planar layer.
# K=0 is the same model whatever the flow kind, so it runs once (flow=none).
DATASET=(dataset=mnist)
case "$PROFILE" in
  smoke)
    EXPERIMENT=mnist_smoke; LANES=("planar:2 none:0" "nice:2")
    if [ ! -f "$DATA/mnist.npz" ]; then
      echo "reproduce_mnist: no $DATA/mnist.npz; the smoke profile uses dataset=fake instead" >&2
      DATASET=(dataset=fake dataset.fake_size=2000)
    fi
    ;;
  quick) EXPERIMENT=mnist_quick; LANES=("nice:80 planar:40 planar:10" "planar:80 nice:40 nice:10 none:0") ;;
  paper) EXPERIMENT=paper_mnist; LANES=("none:0 planar:10 planar:20 planar:40 planar:80 nice:10 nice:20 nice:40 nice:80") ;;
  *) echo "reproduce_mnist: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, paper" >&2; exit 2 ;;
esac
THREADS=()
if [ "${#LANES[@]}" -gt 1 ]; then THREADS=(threads=1); fi  # CPU lanes side by side: one thread each

lane() {  # lane <name> <flow:K ...>: one nfvi train per run and seed, in order; returns non-zero if any failed
  local name="$1" status=0 run flow k seed
  shift
  for run in "$@"; do
    flow="${run%%:*}"; k="${run##*:}"
    for seed in ${SEEDS//,/ }; do
      nfvi train "experiment=$EXPERIMENT" "${DATASET[@]}" "flow=$flow" "flow.length=$k" "seed=$seed" resume=true \
        ${THREADS[@]+"${THREADS[@]}"} "hydra.run.dir=$OUT/runs/${flow}_K${k}_seed${seed}" \
        ${EXTRA[@]+"${EXTRA[@]}"} || status=1
    done
  done > "$OUT/logs/$name.log" 2>&1
  return $status
}

echo "== reproduce_mnist: profile $PROFILE, ${DATASET[*]}, seeds $SEEDS -> $OUT"
mkdir -p "$OUT/runs" "$OUT/logs"
pids=()
for i in "${!LANES[@]}"; do
  echo "   lane $i: ${LANES[$i]}"
  # shellcheck disable=SC2086  # a lane is a space-separated list
  lane "lane$i" ${LANES[$i]} &
  pids+=($!)
done
# On Ctrl-C or SIGTERM, each running nfvi train gets SIGTERM: it saves its checkpoint and stops (re-run to continue).
stop() { for p in "${pids[@]}"; do pkill -TERM -P "$p"; kill -TERM "$p"; done 2> /dev/null; wait; exit 130; }
trap stop INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - INT TERM
grep -h "nfvi.train.*test -ELBO" "$OUT"/logs/lane*.log || true
if [ "$status" -ne 0 ]; then
  echo "reproduce_mnist: some runs failed (see $OUT/logs/); tabulating the others" >&2
fi
nfvi report "search=[$OUT/runs]" "out_dir=$OUT/tables" tasks=[vae]
echo "== reproduce_mnist: tables and Figure 4 in $OUT/tables"
exit "$status"

#!/usr/bin/env bash
# make reproduce PROFILE=smoke|quick|long|paper: every experiment of the paper at one profile, then tables and figures.
#   smoke: CI-sized (a few minutes); quick: about two hours on 2 CPU cores; paper: the paper's schedules (wants a GPU);
#   long: MNIST only (experiment=mnist_long, 80,000 updates per run; hours on 2 CPU cores, resumable).
# Each experiment script runs the grid of experiment=<task>_$PROFILE (nfvi/conf/<command>/experiment/).
# Runs land in outputs/reproduce/<profile>/<experiment>/; tables and figures in outputs/reproduce/<profile>/tables/,
# and (when results/ holds run records) the same tables with our records beside these runs in .../tables_with_records/.
# Safe to re-run: each experiment script skips runs that are already finished. An experiment that fails does not
# stop the others; the script then exits 1 after writing the tables of what did finish.
set -euo pipefail
PROFILE="${1:-quick}"
case "$PROFILE" in
  smoke|quick|paper) TASKS=(energy mnist cifar10 cde sylvester) ;;
  long) TASKS=(mnist) ;;
  *) echo "reproduce: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, long, paper" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT="outputs/reproduce/$PROFILE"
mkdir -p "$ROOT"
echo "== nfvi reproduce: profile $PROFILE (data: ${NFVI_DATA:-./data}) -> $ROOT"
failed=()
for experiment in "${TASKS[@]}"; do
  echo "== $experiment"
  start=$(date +%s)
  if bash "scripts/reproduce_${experiment}.sh" "$PROFILE" "$ROOT/$experiment"; then
    echo "== $experiment done in $(( $(date +%s) - start )) s"
  else
    echo "== $experiment FAILED after $(( $(date +%s) - start )) s" >&2
    failed+=("$experiment")
  fi
done
nfvi report "search=[$ROOT]" "out_dir=$ROOT/tables"
echo "== tables and figures: $ROOT/tables"
if [ -n "$(find results -name results.json -print -quit 2>/dev/null)" ]; then
  # the same tables with the repository's run records (results/) beside these runs: a row of each is labelled
  # source=results or source=$ROOT, never merged (docs/results.md, "Run records")
  nfvi report "search=[results,$ROOT]" "out_dir=$ROOT/tables_with_records" || failed+=("report beside results/")
  echo "== beside the repository's records: $ROOT/tables_with_records"
fi
echo "== to keep a finished run as a record: python -m nfvi.records $ROOT/<experiment>/runs/<run> (docs/results.md)"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "reproduce: failed: ${failed[*]} (see the lines above; re-run to retry, finished runs are kept)" >&2
  exit 1
fi

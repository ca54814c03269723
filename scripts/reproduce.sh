#!/usr/bin/env bash
# make reproduce PROFILE=smoke|quick|paper: every experiment of the paper at one profile, then tables and figures.
#   smoke: CI-sized (minutes); quick: about an hour on 2 CPU cores; paper: the paper's schedules (wants a GPU).
# Runs land in outputs/reproduce/<profile>/<experiment>/; tables and figures in outputs/reproduce/<profile>/tables/.
# Safe to re-run: each experiment script skips runs whose results.json already exists.
set -euo pipefail
PROFILE="${1:-quick}"
case "$PROFILE" in
  smoke|quick|paper) ;;
  *) echo "reproduce: PROFILE=$PROFILE is not allowed; choose one of: smoke, quick, paper" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT="outputs/reproduce/$PROFILE"
mkdir -p "$ROOT"
echo "== nfvi reproduce: profile $PROFILE (data: ${NFVI_DATA:-./data}) -> $ROOT"
for experiment in energy mnist cde; do
  echo "== $experiment"
  start=$(date +%s)
  bash "scripts/reproduce_${experiment}.sh" "$PROFILE" "$ROOT/$experiment"
  echo "== $experiment done in $(( $(date +%s) - start )) s"
done
nfvi report "search=[$ROOT]" "out_dir=$ROOT/tables"
echo "== tables and figures: $ROOT/tables"

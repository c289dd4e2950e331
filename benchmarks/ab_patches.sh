#!/usr/bin/env bash
# A/B of library changes kept as patches in benchmarks/patches/, against the default path, in one
# invocation: base, then each patch applied alone, then base again (the spread between the two
# base arms is the drift of the run). Each arm is one bench.py run without baselines, data path or
# peers; its JSON goes to benchmarks/results/ab_<arm>.json (--out=DIR to change).
#
#   bash benchmarks/ab_patches.sh [--out=DIR] [--workloads=W1,W5,WFO,W20] PATCH...
#   bash benchmarks/ab_patches.sh fusion_emitters_on conv_width_im2col
#
# It applies each patch to the working tree and restores metajax/ with `git checkout` afterwards,
# so it refuses to run while metajax/ has uncommitted changes.
set -euo pipefail
cd "$(dirname "$0")/.."

out=benchmarks/results
workloads=W1,W5,WFO,W20
patches=()
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#--out=}" ;;
    --workloads=*) workloads="${arg#--workloads=}" ;;
    -*) echo "unknown flag $arg" >&2; exit 2 ;;
    *) patches+=("$arg") ;;
  esac
done
for p in "${patches[@]}"; do
  [ -f "benchmarks/patches/$p.patch" ] || { echo "no benchmarks/patches/$p.patch" >&2; exit 2; }
done
if [ -n "$(git status --porcelain -- metajax/)" ]; then  # modified or untracked
  echo "metajax/ has uncommitted changes; commit or stash them first" >&2
  exit 2
fi
mkdir -p "$out"

restore() {  # the patched tree back to HEAD, new files of a patch included
  git checkout -q -- metajax/
  git clean -q -f -- metajax/
}
trap restore EXIT

run() {  # $1 arm name, $2 patch name or "-"
  [ "$2" != "-" ] && git apply "benchmarks/patches/$2.patch"
  echo "== $1 $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
  python benchmarks/bench.py --reps=5 --warmup=2 --workloads="$workloads" --nobaseline --nodata \
    --torch_python= --json="$out/ab_$1.json" | tail -n 12
  restore
}

run base1 -
for p in "${patches[@]}"; do run "$p" "$p"; done
run base2 -

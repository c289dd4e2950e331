#!/usr/bin/env bash
# The accelerator check in one call, for a machine without network (see benchmarks/README.md):
# installs the wheels carried in .whl/ (those the machine lacks, e.g. higher) into a scratch
# folder, then runs benchmarks/gpu_check.py under a wall-clock limit, its JSON into $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
deps="${TMPDIR:-/tmp}/metajax_gpu_deps"
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-deps --no-index --target="$deps" .whl/*.whl
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout "${GPU_CHECK_LIMIT_S:-480}" python benchmarks/gpu_check.py \
  --json="${OUT:-${TMPDIR:-/tmp}}/gpu_check.json" "$@"

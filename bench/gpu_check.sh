#!/usr/bin/env bash
# The GPU check on a bare machine (docs/OPERATIONS.md): run from a copy of the repository that holds
# gpu_bundle/ (python -m tools.gpu_bundle builds it here). Its JSON is written after every stage.
#   bash bench/gpu_check.sh [OUT.json] [more bench/gpu_check.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
shift || true
export PYTHONPATH="$PWD/gpu_bundle/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout 480 "${PYTHON:-python3}" bench/gpu_check.py --data_path gpu_bundle/data --out "$out" "$@"

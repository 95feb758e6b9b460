#!/usr/bin/env bash
# The test command (README, .ci/run): set up ./.venv, then run the whole suite on CPU.
# Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export KD_MLX_CMMLU="${KD_MLX_CMMLU:-$(cd .. && pwd)/shared/cmmlu}"
python -m pytest -q "$@"

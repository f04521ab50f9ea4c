#!/usr/bin/env bash
# Makes the virtual environment .venv-python (once) with what the Python tests and
# bench/compare_torch.py need (python/requirements-test.txt: PyTorch, transformers, pytest), then
# builds and installs the moekit package into it with `pip install .`, as a user would.
# Safe to run again: pip installs only what is missing or changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${MOEKIT_VENV:-.venv-python}
python=${MOEKIT_PYTHON:-python3}

if [[ ! -x $venv/bin/python ]]; then
  echo "python_env: creating $venv with $($python --version 2>&1)"
  if ! "$python" -m venv "$venv"; then
    echo "python_env: '$python -m venv' failed; install Python 3.9+ with its venv module (Debian: python3-venv)" >&2
    exit 1
  fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "python_env: installing python/requirements-test.txt (PyTorch is large: about a minute the first time)"
"$venv/bin/python" -m pip install --quiet -r python/requirements-test.txt
echo "python_env: pip install . (builds the extension with CMake)"
"$venv/bin/python" -m pip install --quiet .
"$venv/bin/python" -c "import moekit, moekit.torch; print('python_env: moekit', moekit.__version__, 'ready in $venv')"

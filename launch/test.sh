#!/usr/bin/env bash
# Set up .venv (with the test and eval extras, at the versions of launch/constraints.txt) and run
# the test suite; eval (lm-eval) so tests/test_harness.py runs instead of skipping. Extra arguments
# go to pytest.
set -euo pipefail
EXTRAS=test,eval
source "$(dirname "$0")/setup_env.sh"
# DeepSpeed compiles a small CPU op on first use; keep it cached across test runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
exec "$VENV/bin/python" -m pytest -q "$@"

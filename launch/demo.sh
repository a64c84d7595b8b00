#!/usr/bin/env bash
# The tiny growth job on the embedded default data (World English Bible), end to end:
# set up .venv, grow 6 blocks right to left, show the run.
set -euo pipefail
EXTRAS=demo
source "$(dirname "$0")/setup_env.sh"
RUN="${RUN:-runs/demo}"
if [ -f "$RUN/grow.yaml" ]; then
  grow train configs/tiny.yaml --out "$RUN" --resume "$@"
else
  grow train configs/tiny.yaml --out "$RUN" "$@"
fi
grow status "$RUN"

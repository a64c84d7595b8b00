#!/usr/bin/env bash
# The README's ablation table: set up .venv, then `grow ablate` the tiny config on the embedded
# Bible (every arm on the tiny demo's token budget), writing runs/ablation/ablation.{md,json,png}.
# A second call continues a killed ablation. Extra arguments go to grow ablate, e.g.
#   bash launch/ablate.sh --only grow,joint        or        bash launch/ablate.sh --budget 4000000
# or bash launch/ablate.sh --minutes 30 (the budget that fits the whole ablation in 30 minutes here).
set -euo pipefail
EXTRAS=demo
source "$(dirname "$0")/setup_env.sh"
OUT="${OUT:-runs/ablation}"
grow ablate configs/tiny.yaml --out "$OUT" "$@"

#!/usr/bin/env bash
# The README's ablation table: set up .venv, then `grow ablate` the tiny config on the embedded
# Bible, every arm on one token budget chosen so that the whole ablation takes about 30 minutes on
# this machine (MINUTES), two arms at a time (JOBS), writing runs/ablation/ablation.{md,json,png}.
# A second call continues a killed ablation. Extra arguments go to grow ablate, e.g.
#   bash launch/ablate.sh --only grow,joint
#   bash launch/ablate.sh --budget 2211840        (a fixed budget instead: the demo's, per arm)
set -euo pipefail
EXTRAS=demo
source "$(dirname "$0")/setup_env.sh"
OUT="${OUT:-runs/ablation}"
size=(--minutes "${MINUTES:-30}")
for arg in "$@"; do
    case "$arg" in --budget|--budget=*|--minutes|--minutes=*) size=() ;; esac
done
grow ablate configs/tiny.yaml --out "$OUT" --jobs "${JOBS:-2}" "${size[@]}" "$@"

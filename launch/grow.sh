#!/usr/bin/env bash
# Run `grow train` under the DeepSpeed launcher on this machine's GPUs or on several nodes.
#
#   bash launch/grow.sh configs/llama2-7b.yaml --out runs/7b                     # all local GPUs, ZeRO-2
#   NUM_GPUS=4 DS_CONFIG=ds_configs/zero3.json bash launch/grow.sh CONFIG --out RUN
#   HOSTFILE=launch/hostfile.example bash launch/grow.sh CONFIG --out RUN --resume   # several nodes
#
# Everything after the config goes to `grow train` (--out, --resume, --set ...). Without a GPU,
# DS_ACCELERATOR=cpu runs the same code on CPU processes (gloo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DS_CONFIG="${DS_CONFIG:-$ROOT/ds_configs/zero2.json}"
[ -f "${1:-}" ] || { echo "usage: bash launch/grow.sh CONFIG --out RUN [grow train options]" >&2; exit 2; }
launcher=(deepspeed)
[ -x "$ROOT/.venv/bin/deepspeed" ] && launcher=("$ROOT/.venv/bin/deepspeed")
if [ -n "${HOSTFILE:-}" ]; then
  launcher+=(--hostfile "$HOSTFILE")
  [ -n "${MASTER_ADDR:-}" ] && launcher+=(--master_addr "$MASTER_ADDR")
elif [ -n "${NUM_GPUS:-}" ]; then
  launcher+=(--num_gpus "$NUM_GPUS")
fi
launcher+=(--master_port "${MASTER_PORT:-29500}")
exec "${launcher[@]}" --module grow train "$@" --deepspeed "$DS_CONFIG"

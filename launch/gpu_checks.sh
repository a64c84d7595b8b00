#!/usr/bin/env bash
# Every check that needs a GPU, in one go, each with its own log under DIR (default gpu-checks/):
#   bash launch/gpu_checks.sh [DIR]
# Run it in an environment where grow is installed (bash launch/setup_env.sh, or PYTHONPATH=.)
# with one CUDA GPU. The README's "Measured on a GPU" section quotes these logs.
#   pytest_gpu        pytest -m gpu (bf16 CUDA stages with bitsandbytes' CUDA 4-bit kernels, export)
#   plan_vs_measured  bench/plan_vs_measured.py: grow plan's memory against the measured CUDA peak
#   throughput        bench/throughput.py: ms/step, tokens/s and MFU of every stage at the 125M shape
#   zero2, zero3      one-process DeepSpeed ZeRO-2 and ZeRO-3 over NCCL on the tiny config, then export
set -u
DIR="${1:-gpu-checks}"
mkdir -p "$DIR"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, transformers, peft, bitsandbytes, grow; print('torch', torch.__version__, torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__, '| grow', grow.__version__)"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to DIR/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name: $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start)) s"
    tail -n "${TAIL:-25}" "$DIR/$name.log"
}

TINY=(--set train.device=cuda --set train.precision=bf16 --set quant.compute_dtype=bf16 --set train.steps=10
      --set curriculum.final_steps=10 --set train.log_every=5 --set train.eval_batches=1)
step pytest_gpu 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step plan_vs_measured 300 "$PY" bench/plan_vs_measured.py configs/125m.yaml --blocks 4 --stages 2 --steps 5 --batch 8
step throughput 420 "$PY" bench/throughput.py configs/125m.yaml --steps 20 --json "$DIR/throughput.json"
for z in 2 3; do
    rm -rf "/tmp/gpu-checks-zero$z"
    step "zero$z" 300 bash -c "$PY -m grow train configs/tiny.yaml --out /tmp/gpu-checks-zero$z --deepspeed ds_configs/zero$z.json ${TINY[*]} && $PY -m grow export /tmp/gpu-checks-zero$z --out /tmp/gpu-checks-zero$z.hf && $PY -m grow eval /tmp/gpu-checks-zero$z --levels"
done

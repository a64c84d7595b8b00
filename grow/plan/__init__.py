"""``grow plan``: memory, FLOPs and wall time of every stage, by arithmetic alone.

The planner reads the same ``GrowConfig`` that ``grow train`` reads and builds nothing: no
module, no tensor, no device. Every byte count is a closed formula over the shape, so the
70B shape plans in milliseconds. Model-state formulas (parameters, the NF4 suffix, LoRA,
AdamW state) are exact and tests/test_plan.py checks them against real modules; the
activation and workspace terms are estimates and are labelled as such.

Read in this order; each module's docstring holds the formulas its code computes:

    counts    parameters, NF4, LoRA and AdamW bytes, activations and FLOPs per component
    parallel  how model states are laid out over GPUs: plain PyTorch or DeepSpeed ZeRO 0-3, offload
    planner   one stage's (and the comparison setups') per-GPU total: ``plan`` -> ``Plan``
    fitting   ``fit`` (``grow plan --fit``): the largest micro-batch that fits, or what would
    text      ``render``: the human-readable plan
"""

from grow.plan.counts import (
    ADAM_BYTES,
    ADAM_STEP_BYTES,
    BLOCK_TENSORS,
    CODE_4BIT,
    CODE_8BIT,
    DTYPE_BYTES,
    NESTED_BLOCKSIZE,
    TFLOP,
    Linear,
    adamw_state_bytes,
    block_forward_flops,
    block_linears,
    block_params,
    ceil_div,
    ends_params,
    frozen_block_activation_bytes,
    frozen_block_bytes,
    linear_params,
    lora_forward_flops,
    lora_params,
    lora_tensors,
    masked_positions,
    nf4_linear_bytes,
    plan_vocab,
    rope_bytes,
    time_params,
    trained_block_activation_bytes,
    trained_block_bytes,
)
from grow.plan.fitting import MAX_GPUS, ZERO2_OFFLOAD, ZERO3, ZERO3_OFFLOAD, Fit, fit
from grow.plan.parallel import (
    Parallel,
    States,
    parse_deepspeed,
    read_deepspeed,
    trainable_states,
)
from grow.plan.planner import Plan, StagePlan, plan
from grow.plan.text import COLUMNS, render

__all__ = [
    "ADAM_BYTES", "ADAM_STEP_BYTES", "BLOCK_TENSORS", "CODE_4BIT", "CODE_8BIT", "COLUMNS", "DTYPE_BYTES",
    "MAX_GPUS", "NESTED_BLOCKSIZE", "TFLOP", "ZERO2_OFFLOAD", "ZERO3", "ZERO3_OFFLOAD",
    "Fit", "Linear", "Parallel", "Plan", "StagePlan", "States",
    "adamw_state_bytes", "block_forward_flops", "block_linears", "block_params", "ceil_div", "ends_params",
    "fit", "frozen_block_activation_bytes", "frozen_block_bytes", "linear_params", "lora_forward_flops",
    "lora_params", "lora_tensors", "masked_positions", "nf4_linear_bytes", "parse_deepspeed", "plan",
    "plan_vocab", "read_deepspeed", "render", "rope_bytes", "time_params", "trainable_states",
    "trained_block_activation_bytes", "trained_block_bytes",
]

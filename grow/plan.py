"""``grow plan``: memory, FLOPs and wall time of every stage, by arithmetic alone.

The planner reads the same ``GrowConfig`` that ``grow train`` reads and builds nothing: no
module, no tensor, no device. Every byte count is a closed formula over the shape, so the
70B shape plans in milliseconds. Model-state formulas (parameters, the NF4 suffix, LoRA,
AdamW state) are exact and tests/test_plan.py checks them against real modules; the
activation and workspace terms are estimates and are labelled as such.

Notation: L blocks, width h, q heads n_h, key/value width kv = n_kv * head_dim, SwiGLU
width I, vocabulary V, micro-batch B, sequence length T, mask ratio r_k, s = L - k suffix
blocks, N GPUs, a = activation bytes (2 for precision bf16, 4 for fp32).

Parameters (exact)
    linears of a block   P_lin = h*h (q) + 2*h*kv (k, v) + h*h (o) + 3*h*I (gate, up, down)
    block                P_b   = P_lin + 2*h                              (two RMSNorm weights)
    ends                 V*h (embedding) + h (final norm) + V*h (untied head)
    trained block bytes  4*P_b + 4*sum(in + out) over its linears (spectral norm's u and v
                         buffers) + 4*2 (the 0-dim gamma buffers of o_proj and down_proj,
                         present when stability.gamma != 1) -- all fp32
    rope tables          4*head_dim (inv_freq and original_inv_freq, fp32), counted with the ends

NF4 linear (exact; what one bitsandbytes ``Linear4bit`` holds after ``.to(device)``), for
n = in*out weights and blocksize b:
    packed weight        ceil(n/2) bytes (uint8, two 4-bit codes per byte)
    absmax               ceil(n/b) constants: 1 byte each with double quantization, else fp32
    double quantization  + 4*ceil(ceil(n/b)/256) (fp32 second-level absmax, blocksize 256)
                         + 4*256 (its 8-bit code table) + 4 (the fp32 offset)
    code table           + 4*16 (the NF4/FP4 value table)
  Counted: every tensor the layer's ``quant_state`` holds (the code tables included: on
  this bitsandbytes every layer owns its copies). Not counted: the JSON blob of packed
  metadata that ``state_dict()`` adds for serialization; it does not exist in memory.
  A frozen suffix block is its seven NF4 linears + its two RMSNorm weights in fp32; with
  quant.enabled false it is 4*P_b (frozen weights stay in the training dtype, fp32).

LoRA (exact): per target linear A (r x in) + B (out x r), fp32. Every frozen block carries
one adapter; the stage's spec says which train (the lora.blocks nearest the trained block).

AdamW (exact for torch.optim.AdamW): exp_avg + exp_avg_sq in fp32 = 8 bytes per parameter,
plus a 4-byte ``step`` tensor per parameter tensor (it lives on the host; counted anyway).

Model states after ZeRO, per GPU, for a trainable set of n parameters:
    plain PyTorch (no --deepspeed)     weights 4n, grads 4n, AdamW 8n; nothing partitioned
    DeepSpeed fp32                     weights 4n, grads 4n, optimizer 8n
    DeepSpeed bf16/fp16                weights 2n, grads 2n, optimizer 12n (fp32 master +
                                       m + v: DeepSpeed keeps the master in the optimizer)
    ZeRO-1 divides the optimizer by N, ZeRO-2 also the grads, ZeRO-3 also the weights;
    offload_optimizer moves the optimizer (and master) to the host, offload_param (ZeRO-3)
    the weights. LoRA adapters stay fp32 (4n + 4n + 8n) and are partitioned the same way.
    Frozen weights (the NF4 suffix, frozen adapters, frozen ends in quant.ends_dtype,
    the final norm in fp32 as grow.quant.cast_ends leaves it) are replicated on every GPU
    under ZeRO-0/1/2. ZeRO-3 partitions every module parameter, frozen ones included: each
    GPU holds ceil(numel/N) of every packed 4-bit weight, norm, frozen adapter and frozen end
    (measured in tests/test_deepspeed.py); bitsandbytes' quantization state (absmax, code
    tables) is not a parameter and stays replicated. What each stage trains comes from its
    ``StageSpec`` (grow.curriculum): any curriculum is planned by the same arithmetic.

Activations (estimate; per token, in elements of a bytes, assuming fused SDPA/flash
attention -- no T x T score matrix -- whose log-sum-exp adds 4*n_h bytes per block):
    trained block        6h + 2kv + 4I   (block input, attention norm output, q, k, v,
                                          attention output, MLP input, MLP norm output,
                                          gate, silu(gate), up, silu(gate)*up)
    frozen block         4h + 2kv + 3I   (what input-gradients need: bitsandbytes' 4-bit
                                          matmul keeps only its weight, not its input)
      + trainable LoRA   the inputs of targeted linears (+h for q/k/v, +h for gate/up,
                                          +I for down_proj) and r per target (A x)
    suffix, no checkpointing   the sum over the s suffix blocks
    suffix, checkpointed       h per suffix block (boundary hidden states) + one frozen
                               block's activations recomputed in backward (the largest),
                               less its input, which is one of the boundary states
    logits               grow applies the head only at masked positions, m = ceil(r_k*T)
                         per sequence: B*m*(V*(a + 4) + 2h*a) -- head output, its fp32
                         log-softmax for the loss, the gathered hidden states and their norm
  Everything is multiplied by B*T (logits by B*m). Gradients of activations in flight,
  the CUDA context, allocator fragmentation and ZeRO communication buckets are not counted.

Workspace (estimate): the trained block's effective weights W/sigma(W) (a*P_lin; with
bf16 autocast that is the cast copy the matmul keeps), a bf16 copy of the head under bf16
autocast unless it is already bf16 (2*V*h), one dequantized suffix linear
(quant.compute_dtype), and under ZeRO-3 the largest trainable module gathered in full.
With quant off and bf16 autocast, each frozen fp32 suffix linear's bf16 cast is kept for
its input-gradient (2*P_lin per block without checkpointing, one block with it).

FLOPs per token (of the T tokens in a sequence):
    block forward        F = 2*P_lin + 4*T*h          (QK^T and AV: 2*T*h each, bidirectional)
    LoRA forward         F_a = sum over targets of 2*r*(in + out)
    head forward         F_h = 2*h*V*r_k              (masked positions only)
    stage k              forward F + s*(F + F_a) + F_h
                         backward 2F (trained block: input + weight grads) + s*F (input
                         grads through the frozen suffix) + 2*F_a per trainable adapter,
                         F_a per frozen one + (2 F_h at stage L, else F_h)
                         + s*(F + F_a) recomputation when the suffix is checkpointed
    wall time            sum over stages of steps_k * batch_size * T * FLOPs_k / (N * throughput)

What fits (``fit``, ``grow plan --fit``): every term above is non-decreasing in B, so a bisection
over B = 1..batch_size/N finds the largest micro-batch at which every stage fits; the answer is its
largest divisor of batch_size/N, with accumulation batch_size/(B*N). When B = 1 does not fit,
each single change (suffix checkpointing, ZeRO-3, offload, more GPUs under ZeRO-3) is planned
and named if it fits.

Comparison rows use the same formulas: full joint training (every block and the ends
trainable in the training dtype, activations of L trained blocks, logits at r_1, the peak),
and QLoRA everywhere (all L blocks NF4 with trainable adapters, ends frozen).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grow.config import GrowConfig, LoraConfig, ModelConfig, QuantConfig, StabilityConfig
from grow.curriculum import StageSpec, stage_specs
from grow.errors import UserError
from grow.units import format_bytes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
ADAM_STEP_BYTES = 4  # torch.optim.AdamW's per-tensor ``step``, fp32
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes absmax constants in blocks of 256
CODE_4BIT = 16  # entries of the NF4/FP4 table
CODE_8BIT = 256  # entries of the dynamic 8-bit table of the nested quantization
BLOCK_TENSORS = 9  # seven linears + two RMSNorm weights
TFLOP = 1e12


def _stability(cfg: GrowConfig) -> StabilityConfig:
    """The stability kit of the blocks the run trains (off for blocks from a checkpoint)."""
    from grow.convert import block_stability  # imports torch; the planner imports it only here

    return block_stability(cfg)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- shapes and counts


@dataclass(frozen=True, slots=True)
class Linear:
    name: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def block_linears(m: ModelConfig) -> list[Linear]:
    """The seven linears of a block, in ``grow.model.BLOCK_LINEARS`` order."""
    h, kv, inter = m.hidden_size, m.num_kv_heads * m.head_dim, m.intermediate_size
    return [
        Linear("q_proj", h, m.num_heads * m.head_dim),
        Linear("k_proj", h, kv),
        Linear("v_proj", h, kv),
        Linear("o_proj", m.num_heads * m.head_dim, h),
        Linear("gate_proj", h, inter),
        Linear("up_proj", h, inter),
        Linear("down_proj", inter, h),
    ]


def linear_params(m: ModelConfig) -> int:
    return sum(lin.params for lin in block_linears(m))


def block_params(m: ModelConfig) -> int:
    """Parameters of one block: seven linears and two RMSNorm weights (no biases)."""
    return linear_params(m) + 2 * m.hidden_size


def time_params(cfg: GrowConfig) -> int:
    """A block's time embedding (curriculum.conditioning: embedding): one linear from the
    sinusoidal features of t into the residual stream."""
    from grow.model import TIME_FEATURES

    return TIME_FEATURES * cfg.model.hidden_size if cfg.curriculum.conditioning == "embedding" else 0


def ends_params(m: ModelConfig, vocab: int) -> dict[str, int]:
    """Embedding, final norm and (untied) head."""
    return {"embed": vocab * m.hidden_size, "norm": m.hidden_size, "head": vocab * m.hidden_size}


def rope_bytes(m: ModelConfig) -> int:
    """The rotary tables GrowModel keeps as buffers: inv_freq and original_inv_freq, fp32."""
    return 2 * (m.head_dim // 2) * 4


def trained_block_bytes(m: ModelConfig, stability: StabilityConfig) -> int:
    """Parameters and buffers of the block being trained, with its stability parametrizations.

    fp32 weights (spectral norm stores them as ``parametrizations.weight.original``), the
    power-iteration vectors u (out) and v (in) of each linear, and the residual gain's 0-dim
    gamma on o_proj and down_proj.
    """
    total = 4 * block_params(m)
    if stability.spectral_norm:
        total += 4 * sum(lin.in_features + lin.out_features for lin in block_linears(m))
    if stability.gamma != 1.0:
        total += 4 * 2
    return total


def nf4_linear_bytes(in_features: int, out_features: int, quant: QuantConfig) -> int:
    """Bytes of one bitsandbytes ``Linear4bit`` weight and its quant_state (see module doc)."""
    n = in_features * out_features
    blocks = _ceil_div(n, quant.blocksize)
    total = _ceil_div(n, 2) + 4 * CODE_4BIT
    if quant.double_quant:
        total += blocks + 4 * _ceil_div(blocks, NESTED_BLOCKSIZE) + 4 * CODE_8BIT + 4
    else:
        total += 4 * blocks
    return total


def frozen_block_bytes(m: ModelConfig, quant: QuantConfig, shards: int = 1) -> int:
    """One frozen suffix block without its adapter on one GPU: NF4 linears + fp32 norms, or all fp32.

    ``shards`` = N under ZeRO-3, which partitions every parameter (the packed 4-bit weights and
    the norms) but not bitsandbytes' quantization state.
    """
    norms = 2 * 4 * _ceil_div(m.hidden_size, shards)
    if not quant.enabled:
        return sum(4 * _ceil_div(lin.params, shards) for lin in block_linears(m)) + norms
    total = norms
    for lin in block_linears(m):
        packed = _ceil_div(lin.params, 2)
        state = nf4_linear_bytes(lin.in_features, lin.out_features, quant) - packed
        total += _ceil_div(packed, shards) + state
    return total


def lora_params(m: ModelConfig, lora: LoraConfig) -> int:
    """Parameters of one block's adapter: A (r x in) + B (out x r) on every target linear."""
    return sum(lora.rank * (lin.in_features + lin.out_features)
               for lin in block_linears(m) if lin.name in lora.targets)


def lora_tensors(lora: LoraConfig) -> int:
    return 2 * len(lora.targets)


def adamw_state_bytes(params: int, tensors: int) -> int:
    """torch.optim.AdamW state: fp32 exp_avg and exp_avg_sq per parameter, a step per tensor."""
    return ADAM_BYTES * params + ADAM_STEP_BYTES * tensors


def plan_vocab(cfg: GrowConfig) -> int:
    """Rows of the embedding and head as ``grow train`` will build them."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "train":
        return cfg.data.vocab_size
    raise UserError(
        "model.vocab_size: grow plan needs it when data.tokenizer names an existing tokenizer "
        f"({cfg.data.tokenizer!r}); set it to the tokenizer's size"
    )


# --------------------------------------------------------------------------- parallelism


@dataclass(frozen=True, slots=True)
class Parallel:
    """How model states are laid out over the GPUs."""

    gpus: int = 1
    deepspeed: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    half: bool = False
    """DeepSpeed bf16/fp16: 16-bit weights and grads, fp32 master in the optimizer."""
    micro_batch: int | None = None
    """train_micro_batch_size_per_gpu from the DeepSpeed JSON, when it is a number."""

    def describe(self) -> str:
        if not self.deepspeed:
            what = "plain PyTorch, nothing partitioned" + (" (data-parallel replicas)" if self.gpus > 1 else "")
        else:
            what = f"DeepSpeed ZeRO-{self.zero_stage}, {'16-bit weights + fp32 master' if self.half else 'fp32'}"
            if self.offload_optimizer:
                what += ", optimizer offloaded to host"
            if self.offload_param:
                what += ", parameters offloaded to host"
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}, {what}"


def read_deepspeed(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON as a dict, or a one-line error naming --deepspeed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--deepspeed: no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--deepspeed: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"--deepspeed: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def parse_deepspeed(data: dict[str, Any], gpus: int, precision: str) -> Parallel:
    """ZeRO stage, offload and 16-bit mode of a DeepSpeed config ("auto" follows train.precision)."""
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError("--deepspeed: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")

    def offloaded(key: str) -> bool:
        section = zero.get(key)
        if section is None:
            return False
        if not isinstance(section, dict):
            raise UserError(f"--deepspeed: zero_optimization.{key} must be an object")
        device = section.get("device", "none")
        if device not in ("none", "cpu", "nvme", None):
            raise UserError(f"--deepspeed: zero_optimization.{key}.device must be none, cpu or nvme, got {device!r}")
        return device in ("cpu", "nvme")

    offload_optimizer = offloaded("offload_optimizer")
    offload_param = offloaded("offload_param")
    if offload_param and stage != 3:
        raise UserError("--deepspeed: zero_optimization.offload_param needs stage 3")

    def enabled(key: str) -> bool:
        section = data.get(key, {})
        if not isinstance(section, dict):
            raise UserError(f"--deepspeed: {key} must be an object")
        value = section.get("enabled", False)
        if value == "auto":
            return key == "bf16" and precision == "bf16"
        if not isinstance(value, bool):
            raise UserError(f"--deepspeed: {key}.enabled must be true, false or \"auto\", got {value!r}")
        return value

    micro = data.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != "auto" and (isinstance(micro, bool) or not isinstance(micro, int) or micro <= 0):
        raise UserError(f"--deepspeed: train_micro_batch_size_per_gpu must be a positive integer or \"auto\", got {micro!r}")
    return Parallel(
        gpus=gpus, deepspeed=True, zero_stage=stage, offload_optimizer=offload_optimizer,
        offload_param=offload_param, half=enabled("bf16") or enabled("fp16"),
        micro_batch=micro if isinstance(micro, int) else None,
    )


@dataclass(slots=True)
class States:
    """Per-GPU bytes of a set of parameters; ``host`` is what offload put in CPU memory."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    host: int = 0

    @property
    def gpu(self) -> int:
        return self.params + self.grads + self.optimizer


def trainable_states(params: int, tensors: int, par: Parallel, *, always_fp32: bool = False) -> States:
    """Weights, grads and optimizer state of n trainable parameters on one GPU (module doc)."""
    if not par.deepspeed:
        return States(4 * params, 4 * params, adamw_state_bytes(params, tensors))
    half = par.half and not always_fp32
    weight = 2 if half else 4
    p, g, o = weight * params, weight * params, (12 if half else ADAM_BYTES) * params
    n = par.gpus
    if par.zero_stage >= 1:
        o = _ceil_div(o, n)
    if par.zero_stage >= 2:
        g = _ceil_div(g, n)
    if par.zero_stage >= 3:
        p = _ceil_div(p, n)
    host = 0
    if par.offload_optimizer:
        host, o = host + o, 0
    if par.offload_param:
        host, p = host + p, 0
    return States(p, g, o, host)


# --------------------------------------------------------------------------- activations and FLOPs


def trained_block_activation_bytes(m: ModelConfig, a: int) -> int:
    """Bytes per token the trained block keeps for backward (estimate, module doc)."""
    h, kv, inter = m.hidden_size, m.num_kv_heads * m.head_dim, m.intermediate_size
    return a * (6 * h + 2 * kv + 4 * inter) + 4 * m.num_heads


def frozen_block_activation_bytes(m: ModelConfig, a: int, lora: LoraConfig | None) -> int:
    """Bytes per token a frozen block keeps for input-gradients; ``lora`` = its trainable adapter."""
    h, kv, inter = m.hidden_size, m.num_kv_heads * m.head_dim, m.intermediate_size
    elements = 4 * h + 2 * kv + 3 * inter
    if lora is not None:
        targets = set(lora.targets)
        elements += h * bool(targets & {"q_proj", "k_proj", "v_proj"})
        elements += h * bool(targets & {"gate_proj", "up_proj"})
        elements += inter * ("down_proj" in targets)
        elements += lora.rank * len(targets)
    return a * elements + 4 * m.num_heads


def block_forward_flops(m: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one block: 2 per weight + attention's 4*T*h."""
    return 2 * linear_params(m) + 4 * seq_len * m.hidden_size


def lora_forward_flops(m: ModelConfig, lora: LoraConfig) -> int:
    return 2 * lora_params(m, lora)


def masked_positions(ratio: float, seq_len: int) -> int:
    """Positions grow applies the head to: the nested mask hides ceil(r*T) tokens."""
    return min(seq_len, math.ceil(ratio * seq_len - 1e-9))


# --------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class StagePlan:
    """One stage (or a comparison setup): per-GPU bytes, FLOPs and tokens."""

    name: str
    block: int | None
    ratio: float
    steps: int
    tokens: int
    trainable_params: int
    block_state: States
    ends_state: States
    suffix: int
    lora_state: States
    workspace: int
    activations: int
    activations_ckpt: int
    logits: int
    grad_ckpt: bool
    flops_per_token: float
    gpu_memory: int
    extra: dict[str, Any] = field(default_factory=dict)
    ema: int = 0
    """train.ema: the fp32 average of every trainable parameter (4 bytes each), beside them."""

    @property
    def model_states(self) -> int:
        return self.block_state.gpu + self.ends_state.gpu + self.suffix + self.lora_state.gpu + self.ema

    @property
    def selected_activations(self) -> int:
        return self.activations_ckpt if self.grad_ckpt else self.activations

    @property
    def total(self) -> int:
        return self.model_states + self.workspace + self.selected_activations + self.logits

    @property
    def host(self) -> int:
        return self.block_state.host + self.ends_state.host + self.lora_state.host

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "block": self.block, "ratio": self.ratio, "steps": self.steps,
            "tokens": self.tokens, "trainable_params": self.trainable_params,
            "bytes": {
                "block": asdict(self.block_state) | {"total": self.block_state.gpu},
                "ends": asdict(self.ends_state) | {"total": self.ends_state.gpu},
                "suffix": self.suffix,
                "lora": asdict(self.lora_state) | {"total": self.lora_state.gpu},
                "ema": self.ema,
                "model_states": self.model_states,
                "workspace": self.workspace,
                "activations_no_ckpt": self.activations,
                "activations_ckpt": self.activations_ckpt,
                "logits": self.logits,
                "total": self.total,
                "host_offload": self.host,
            },
            "grad_ckpt": self.grad_ckpt,
            "fits": self.fits,
            "flops_per_token": self.flops_per_token,
            **self.extra,
        }


@dataclass(slots=True)
class Plan:
    cfg: GrowConfig
    vocab: int
    par: Parallel
    gpu_memory: int
    micro_batch: int
    seq_len: int
    grad_ckpt: bool
    throughput: float | None
    stages: list[StagePlan]
    full: StagePlan
    qlora: StagePlan
    assumptions: list[str]

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        """Every stage fits in one GPU's memory."""
        return all(s.fits for s in self.stages)

    @property
    def accumulation(self) -> int | None:
        """Gradient accumulation steps that make train.batch_size; None when micro-batch x GPUs does not divide it."""
        per_step = self.micro_batch * self.par.gpus
        batch = self.cfg.train.batch_size
        return batch // per_step if batch % per_step == 0 else None

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def total_flops(self) -> float:
        return sum(s.tokens * s.flops_per_token for s in self.stages)

    def seconds(self, flops: float) -> float | None:
        if self.throughput is None:
            return None
        return flops / (self.throughput * TFLOP * self.par.gpus)

    def to_dict(self) -> dict[str, Any]:
        m = self.cfg.model
        peak = self.peak
        full_flops = self.total_tokens * self.full.flops_per_token
        qlora_flops = self.total_tokens * self.qlora.flops_per_token
        return {
            "shape": {
                "num_blocks": m.num_blocks, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                "intermediate_size": m.intermediate_size, "vocab_size": self.vocab,
                "block_params": block_params(m), "ends_params": sum(ends_params(m, self.vocab).values()),
                "total_params": m.num_blocks * block_params(m) + sum(ends_params(m, self.vocab).values()),
            },
            "setup": {
                "gpus": self.par.gpus, "gpu_memory": self.gpu_memory, "deepspeed": self.par.deepspeed,
                "zero_stage": self.par.zero_stage, "offload_optimizer": self.par.offload_optimizer,
                "offload_param": self.par.offload_param, "half_precision_weights": self.par.half,
                "precision": self.cfg.train.precision, "micro_batch": self.micro_batch, "seq_len": self.seq_len,
                "batch_size": self.cfg.train.batch_size, "accumulation": self.accumulation, "grad_ckpt": self.grad_ckpt,
                "quant": self.cfg.quant.enabled, "lora": self.cfg.lora.enabled,
                "throughput_tflops": self.throughput,
            },
            "assumptions": self.assumptions,
            "stages": [s.to_dict() for s in self.stages],
            "peak": {"stage": peak.name, "block": peak.block, "total": peak.total, "fits": peak.fits},
            "fits": self.fits,
            "totals": {
                "tokens": self.total_tokens, "flops": self.total_flops,
                "seconds": self.seconds(self.total_flops),
            },
            "compare": {
                # Both at the growth's total token count, for the trade in compute.
                "full": self.full.to_dict() | {"tokens": self.total_tokens, "flops": full_flops,
                                               "seconds": self.seconds(full_flops)},
                "qlora": self.qlora.to_dict() | {"tokens": self.total_tokens, "flops": qlora_flops,
                                                 "seconds": self.seconds(qlora_flops)},
            },
        }


def plan(
    cfg: GrowConfig,
    *,
    gpus: int = 1,
    gpu_memory: int = 80 * 2**30,
    deepspeed: dict[str, Any] | None = None,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    grad_ckpt: bool | None = None,
    throughput: float | None = None,
    specs: list[StageSpec] | None = None,
) -> Plan:
    """Plan every stage of ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes (see module doc).

    ``micro_batch`` defaults to train.micro_batch_size, else the DeepSpeed JSON's
    train_micro_batch_size_per_gpu, else train.batch_size / gpus (what ``grow train`` runs).
    ``specs`` lists the stages in run order (default: the config's curriculum, ``stage_specs``).
    """
    if gpus <= 0:
        raise UserError(f"--gpus: expected a positive number of GPUs, got {gpus}")
    if gpu_memory <= 0:
        raise UserError("--gpu-memory: expected a positive size")
    if micro_batch is not None and micro_batch <= 0:
        raise UserError(f"--micro-batch: expected a positive integer, got {micro_batch}")
    if seq_len is not None and seq_len <= 0:
        raise UserError(f"--seq-len: expected a positive integer, got {seq_len}")
    if seq_len is not None and seq_len > cfg.model.max_position_embeddings:
        raise UserError(f"--seq-len: {seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    if throughput is not None and not throughput > 0:
        raise UserError(f"--throughput: expected TFLOPS per GPU > 0, got {throughput}")
    par = parse_deepspeed(deepspeed, gpus, cfg.train.precision) if deepspeed is not None else Parallel(gpus=gpus)
    vocab = plan_vocab(cfg)
    T = seq_len or cfg.data.seq_len
    if micro_batch is None:
        ours = cfg.train.micro_batch_size
        if ours is not None and par.micro_batch is not None and ours != par.micro_batch:
            # grow train refuses the same disagreement (grow.ds.resolve_config).
            raise UserError(f"--deepspeed: train_micro_batch_size_per_gpu={par.micro_batch} conflicts with "
                            f"train.micro_batch_size={ours}; make them equal or write \"auto\"")
        micro_batch = ours or par.micro_batch or _ceil_div(cfg.train.batch_size, gpus)
    ckpt = cfg.train.checkpoint_suffix if grad_ckpt is None else grad_ckpt
    setup = _Setup(cfg, vocab, par, gpu_memory, micro_batch, T, ckpt)
    ratios = cfg.ratios()
    stages = [setup.stage(spec) for spec in (stage_specs(cfg) if specs is None else specs)]
    return Plan(
        cfg=cfg, vocab=vocab, par=par, gpu_memory=gpu_memory, micro_batch=micro_batch, seq_len=T,
        grad_ckpt=ckpt, throughput=throughput, stages=stages, full=setup.full(ratios), qlora=setup.qlora(ratios),
        assumptions=_assumptions(cfg, par),
    )


def _assumptions(cfg: GrowConfig, par: Parallel) -> list[str]:
    notes = [
        ("ZeRO-3 partitions the frozen parameters too (packed 4-bit weights, norms, frozen adapters and "
         "ends; measured); bitsandbytes' quantization state stays replicated on every GPU"
         if par.zero_stage == 3 else "frozen weights (NF4 suffix, frozen adapters, frozen ends) are replicated on every GPU"),
        "activations and workspace are estimates (fused SDPA attention, no T x T scores); CUDA context, "
        "allocator fragmentation and communication buckets are not counted",
        "LoRA adapters are fp32 (weights 4 + grads 4 + AdamW 8 bytes per parameter)",
    ]
    if cfg.train.ema:
        notes.append("train.ema: an fp32 average of every trainable parameter (4 bytes each), counted in "
                     "each stage's total")
    if par.deepspeed and par.half:
        notes.append("DeepSpeed 16-bit: trainable weights and grads 2 bytes, optimizer 12 bytes (fp32 master + m + v)")
    elif par.deepspeed:
        notes.append("DeepSpeed fp32: weights 4, grads 4, optimizer 8 bytes per trainable parameter")
    else:
        notes.append("plain PyTorch AdamW: fp32 master weights 4, grads 4, optimizer 8 bytes per trainable parameter")
    if cfg.model.vocab_size is None:
        notes.append(f"vocabulary = data.vocab_size ({cfg.data.vocab_size}), an upper bound of the trained tokenizer")
    if cfg.model.init_from:
        m = cfg.model
        params = m.num_blocks * block_params(m) + sum(ends_params(m, plan_vocab(cfg)).values())
        notes.append(f"stage 1 (convert) loads {m.init_from} once into CPU memory in its stored dtype "
                     f"({format_bytes(2 * params)} in bf16, {format_bytes(4 * params)} in fp32); later stages read it "
                     "back one tensor at a time; converted blocks train without spectral norm or residual gain")
    return notes


@dataclass(slots=True)
class _Setup:
    """Everything shared by the stages of one plan."""

    cfg: GrowConfig
    vocab: int
    par: Parallel
    gpu_memory: int
    B: int
    T: int
    ckpt: bool

    @property
    def a(self) -> int:
        return 2 if self.cfg.train.precision == "bf16" else 4

    @property
    def autocast_bf16(self) -> bool:
        """Weights in fp32 that bf16 autocast copies (plain PyTorch; DeepSpeed 16-bit already is)."""
        return self.cfg.train.precision == "bf16" and not self.par.half

    def _soft_tokens(self) -> int:
        """duo: the noisy one-hot and its softmax, fp32 (B, T, V) each, before the embedding matmul."""
        return 8 * self.B * self.T * self.vocab if self.cfg.objective.corruption == "duo" else 0

    def _logits(self, ratio: float) -> int:
        m, h = masked_positions(ratio, self.T), self.cfg.model.hidden_size
        return self.B * m * (self.vocab * (self.a + 4) + 2 * h * self.a)

    def _head_copy(self, trainable: bool) -> int:
        if self.cfg.train.precision != "bf16":
            return 0
        stored = ("bf16" if self.par.half else "fp32") if trainable else self.cfg.quant.ends_dtype
        return 0 if stored == "bf16" else 2 * self.vocab * self.cfg.model.hidden_size

    def _dequant(self, frozen_blocks: int) -> int:
        q = self.cfg.quant
        if not q.enabled or frozen_blocks == 0:
            return 0
        return max(lin.params for lin in block_linears(self.cfg.model)) * DTYPE_BYTES[q.compute_dtype]

    def _frozen_casts(self) -> int:
        """Per frozen fp32 block under bf16 autocast: the bf16 weight copies kept for input-grads."""
        if self.cfg.quant.enabled or not self.autocast_bf16:
            return 0
        return 2 * linear_params(self.cfg.model)

    def _weight_copies(self) -> int:
        """The trained block's effective weights that its matmuls keep for backward.

        Parametrized linears (spectral norm, residual gain) produce a fresh weight every
        forward, kept in the activation dtype; under bf16 autocast the others are cast copies.
        """
        stab, lins = _stability(self.cfg), block_linears(self.cfg.model)
        total = 0
        for lin in lins:
            parametrized = stab.spectral_norm or (stab.gamma != 1.0 and lin.name in ("o_proj", "down_proj"))
            if parametrized:
                total += lin.params * self.a
            elif self.autocast_bf16:
                total += lin.params * 2
        return total

    def _gather(self, modules: list[int]) -> int:
        """ZeRO-3: the largest trainable module is gathered whole for its forward/backward."""
        if self.par.zero_stage != 3 or not modules:
            return 0
        return max(modules) * (2 if self.par.half else 4)

    @property
    def _frozen_shards(self) -> int:
        """Over how many GPUs frozen parameters are partitioned: N under ZeRO-3, else 1."""
        return self.par.gpus if self.par.zero_stage == 3 else 1

    def _ends_frozen(self) -> int:
        e = ends_params(self.cfg.model, self.vocab)
        return (DTYPE_BYTES[self.cfg.quant.ends_dtype] * (e["embed"] + e["head"]) + 4 * e["norm"]
                + rope_bytes(self.cfg.model))

    def _suffix_activations(self, per_block: list[int]) -> tuple[int, int]:
        """(without, with) checkpointing of frozen blocks with per-token bytes ``per_block``."""
        if not per_block:
            return 0, 0
        tokens, h = self.B * self.T, self.cfg.model.hidden_size
        casts = self._frozen_casts()
        full = tokens * sum(per_block) + casts * len(per_block)
        # The recomputed block's own input is one of the boundary states already counted.
        ckpt = tokens * (len(per_block) * h * self.a + max(per_block) - h * self.a) + casts
        return full, ckpt

    def stage(self, spec: StageSpec) -> StagePlan:
        """Per-GPU bytes and FLOPs of one stage: the one place the per-stage arithmetic lives.

        Everything comes from the spec (``grow.curriculum``): n blocks trained in full
        precision, s frozen blocks (NF4 + adapters), the adapters that train, the ends, and the
        noise (the head's memory at the heaviest level the stage draws, its FLOPs at the mean).
        Frozen blocks before the first trainable parameter (a frozen prefix grown left to
        right) keep no activations and need no backward: autograd records nothing there.
        """
        cfg, m = self.cfg, self.cfg.model
        n, s, trains_ends = len(spec.train), len(spec.frozen), spec.trains_ends
        lora, tokens = cfg.lora, self.B * self.T
        P_b, t_b = block_params(m), time_params(cfg)
        # The trained blocks: their states, plus spectral-norm/gain buffers replicated beside them.
        block_state = trainable_states(n * (P_b + t_b), n * (BLOCK_TENSORS + (1 if t_b else 0)), self.par)
        block_state.params += n * (trained_block_bytes(m, _stability(cfg)) - 4 * P_b)
        e = ends_params(m, self.vocab)
        if trains_ends:
            ends_state = trainable_states(sum(e.values()), 3, self.par)
            ends_state.params += rope_bytes(m)
        else:
            ends_state = States(params=_ceil_div(self._ends_frozen(), self._frozen_shards))
        # Every block slot owns a time embedding from the start; the untrained ones are frozen fp32.
        suffix = (s * frozen_block_bytes(m, cfg.quant, self._frozen_shards)
                  + (m.num_blocks - n) * _ceil_div(4 * t_b, self._frozen_shards))
        # Adapters: every frozen block has one; the spec's adapters train.
        adapted = s if lora.enabled else 0
        trainable_adapters = len(spec.adapters) if lora.enabled else 0
        frozen_adapters = adapted - trainable_adapters
        n_lora = lora_params(m, lora)
        lora_state = trainable_states(trainable_adapters * n_lora, trainable_adapters * lora_tensors(lora), self.par,
                                      always_fp32=True)
        lora_state.params += frozen_adapters * _ceil_div(4 * n_lora, self._frozen_shards)
        # Which frozen blocks sit after the first trainable parameter (they carry gradients).
        grad_from = 0 if trains_ends else min([*spec.train, *(spec.adapters if lora.enabled else ())], default=0)
        live = [k for k in spec.frozen if k > grad_from]
        # Workspace (estimate).
        workspace = (n * self._weight_copies() + self._head_copy(trains_ends) + self._dequant(s)
                     + self._gather([P_b] + ([e["embed"], e["head"]] if trains_ends else [])))
        # Activations (estimate).
        trained = tokens * n * trained_block_activation_bytes(m, self.a)
        per_block = [frozen_block_activation_bytes(m, self.a, lora if k in spec.adapters and lora.enabled else None)
                     for k in live]
        suffix_full, suffix_ckpt = self._suffix_activations(per_block)
        # FLOPs per token.
        F, F_a = block_forward_flops(m, self.T), lora_forward_flops(m, lora)
        # Replacement noise (uniform, duo) takes its loss on every token: the head runs everywhere.
        every = cfg.objective.corruption in ("uniform", "duo")
        F_h = 2 * m.hidden_size * self.vocab * masked_positions(1.0 if every else spec.noise.representative,
                                                                self.T) / self.T
        adapted_live = len(live) if lora.enabled else 0
        forward = (n + s) * F + adapted * F_a + F_h
        backward = (2 * n * F + len(live) * F + 2 * trainable_adapters * F_a
                    + (adapted_live - trainable_adapters) * F_a + (2 if trains_ends else 1) * F_h)
        recompute = (len(live) * F + adapted_live * F_a) if self.ckpt else 0
        trainable = n * (P_b + t_b) + (sum(e.values()) if trains_ends else 0) + trainable_adapters * n_lora
        return StagePlan(
            name=spec.name, block=spec.train[0] if len(spec.train) == 1 else None, ratio=spec.noise.hi,
            steps=spec.steps, tokens=spec.steps * cfg.train.batch_size * self.T, trainable_params=trainable,
            block_state=block_state, ends_state=ends_state, suffix=suffix, lora_state=lora_state,
            workspace=workspace, activations=trained + suffix_full, activations_ckpt=trained + suffix_ckpt,
            logits=self._logits(1.0 if every else spec.noise.hi) + self._soft_tokens(), grad_ckpt=self.ckpt,
            flops_per_token=forward + backward + recompute,
            gpu_memory=self.gpu_memory,
            extra={"label": spec.label, "trains": list(spec.train), "frozen_blocks": s, "adapters": adapted,
                   "trainable_adapters": trainable_adapters},
            ema=4 * trainable if cfg.train.ema else 0,
        )

    def full(self, ratios: list[float]) -> StagePlan:
        """Joint training of all L blocks and the ends: every weight trainable."""
        m = self.cfg.model
        L, P_b = m.num_blocks, block_params(m)
        e = ends_params(m, self.vocab)
        n = L * P_b + sum(e.values())
        state = trainable_states(n, BLOCK_TENSORS * L + 3, self.par)
        state.params += rope_bytes(m)
        # bf16 autocast caches a bf16 copy of every fp32 weight it casts, for the whole forward.
        casts = 2 * (L * linear_params(m) + e["head"]) if self.autocast_bf16 else 0
        workspace = casts + self._gather([P_b, e["embed"], e["head"]])
        tokens, per_block = self.B * self.T, trained_block_activation_bytes(m, self.a)
        acts = tokens * L * per_block
        acts_ckpt = tokens * ((L - 1) * m.hidden_size * self.a + per_block)
        F = block_forward_flops(m, self.T)
        r_mean = sum(ratios) / len(ratios)
        F_h = 2 * m.hidden_size * self.vocab * r_mean
        flops = 3 * (L * F + F_h) + (L * F if self.ckpt else 0)
        return StagePlan(
            name="full joint training", block=None, ratio=ratios[0], steps=0, tokens=0, trainable_params=n,
            block_state=state, ends_state=States(), suffix=0, lora_state=States(), workspace=workspace,
            activations=acts, activations_ckpt=acts_ckpt, logits=self._logits(ratios[0]), grad_ckpt=self.ckpt,
            flops_per_token=flops, gpu_memory=self.gpu_memory,
        )

    def qlora(self, ratios: list[float]) -> StagePlan:
        """All L blocks in NF4 with a trainable adapter each; ends frozen; nothing else trains."""
        cfg, m = self.cfg, self.cfg.model
        L = m.num_blocks
        quant = QuantConfig(**{**asdict(cfg.quant), "enabled": True})
        n_lora = lora_params(m, cfg.lora)
        lora_state = trainable_states(L * n_lora, L * lora_tensors(cfg.lora), self.par, always_fp32=True)
        dequant = max(lin.params for lin in block_linears(m)) * DTYPE_BYTES[quant.compute_dtype]
        workspace = dequant + self._head_copy(False)
        per_block = [frozen_block_activation_bytes(m, self.a, cfg.lora)] * L
        tokens = self.B * self.T
        acts = tokens * sum(per_block)
        acts_ckpt = tokens * ((L - 1) * m.hidden_size * self.a + per_block[0])
        F, F_a = block_forward_flops(m, self.T), lora_forward_flops(m, cfg.lora)
        r_mean = sum(ratios) / len(ratios)
        F_h = 2 * m.hidden_size * self.vocab * r_mean
        flops = (L * (F + F_a) + F_h) + (L * (F + 2 * F_a) + F_h) + (L * (F + F_a) if self.ckpt else 0)
        return StagePlan(
            name="QLoRA everywhere", block=None, ratio=ratios[0], steps=0, tokens=0, trainable_params=L * n_lora,
            block_state=States(), ends_state=States(params=_ceil_div(self._ends_frozen(), self._frozen_shards)),
            suffix=L * frozen_block_bytes(m, quant, self._frozen_shards), lora_state=lora_state, workspace=workspace,
            activations=acts, activations_ckpt=acts_ckpt, logits=self._logits(ratios[0]), grad_ckpt=self.ckpt,
            flops_per_token=flops, gpu_memory=self.gpu_memory,
        )


# --------------------------------------------------------------------------- what fits

# What `grow plan --fit` tries, one at a time, when not even micro-batch 1 fits. The DeepSpeed
# settings are those of the shipped ds_configs/ files it names.
ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}
ZERO2_OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": "auto"}}
ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}, "bf16": {"enabled": "auto"}}
MAX_GPUS = 1024


@dataclass(slots=True)
class Fit:
    """The answer of ``grow plan --fit``: the micro-batch to run, or why none fits."""

    micro_batch: int | None
    """Largest micro-batch per GPU that fits at every stage and divides train.batch_size / GPUs."""
    accumulation: int | None
    """Gradient accumulation steps that keep train.batch_size with that micro-batch."""
    largest: int
    """Largest micro-batch per GPU that fits at every stage, divisor or not (0: not even 1)."""
    plan: Plan
    """The plan at ``micro_batch`` (at micro-batch 1 when nothing fits)."""
    helps: list[str] = field(default_factory=list)
    """When nothing fits: each single change that makes micro-batch 1 fit (checked, not guessed)."""

    def summary(self) -> str:
        """One line: the micro-batch and accumulation to set, or what nothing fitting needs."""
        p, batch = self.plan, self.plan.cfg.train.batch_size
        gpus = f"{p.par.gpus} GPU{'s' if p.par.gpus > 1 else ''}"
        if self.micro_batch is None:
            peak = p.peak
            text = (f"fit: nothing fits even at micro-batch 1 on {gpus} of {_bytes(p.gpu_memory)}: "
                    f"{peak.name} needs {_bytes(peak.total)} per GPU")
            if self.helps:
                return text + "; it would fit with " + ", or ".join(self.helps)
            return (text + f"; neither train.checkpoint_suffix, ZeRO-3, optimizer offload nor up to {MAX_GPUS} "
                    "GPUs under ZeRO-3 makes it fit: shorten data.seq_len or use GPUs with more memory")
        text = (f"fit: micro-batch {self.micro_batch} per GPU x {gpus} x gradient accumulation {self.accumulation} "
                f"= train.batch_size {batch}; every stage fits (peak: {p.peak.name} at "
                f"{_bytes(p.peak.total)} of {_bytes(p.gpu_memory)}); set train.micro_batch_size={self.micro_batch}")
        if self.largest > self.micro_batch:
            text += (f" (micro-batch {self.largest} fits too, but does not divide the {batch // p.par.gpus} "
                     "sequences per GPU)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "accumulation": self.accumulation, "largest": self.largest,
                "fits": self.micro_batch is not None, "helps": self.helps, "summary": self.summary()}


def fit(
    cfg: GrowConfig,
    *,
    gpus: int = 1,
    gpu_memory: int = 80 * 2**30,
    deepspeed: dict[str, Any] | None = None,
    seq_len: int | None = None,
    grad_ckpt: bool | None = None,
    throughput: float | None = None,
    specs: list[StageSpec] | None = None,
) -> Fit:
    """The largest micro-batch per GPU at which every stage fits, and the accumulation that keeps
    train.batch_size (the global batch); or, when not even micro-batch 1 fits, the single changes
    (suffix checkpointing, ZeRO-3, offload, more GPUs) that would make it fit.

    Memory grows with the micro-batch at every stage, so a bisection over 1..batch/gpus finds
    the largest that fits; the micro-batch chosen is its largest divisor of batch/gpus.
    """
    batch = cfg.train.batch_size
    if gpus > 0 and batch % gpus:
        raise UserError(f"--gpus: train.batch_size={batch} is not divisible by {gpus} GPUs; "
                        "each GPU takes an equal share of the global batch")

    def at(micro: int, **change: Any) -> Plan:
        kwargs = dict(gpus=gpus, gpu_memory=gpu_memory, deepspeed=deepspeed, seq_len=seq_len,
                      grad_ckpt=grad_ckpt, throughput=throughput, specs=specs)
        return plan(cfg, micro_batch=micro, **(kwargs | change))

    one = at(1)
    if not one.fits:
        return Fit(None, None, 0, one, _what_would_fit(one, at))
    per_gpu = batch // gpus
    lo, hi = 1, per_gpu  # lo fits; find the largest that does
    if at(hi).fits:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).fits:
            lo = mid
        else:
            hi = mid
    micro = max(d for d in range(1, lo + 1) if per_gpu % d == 0)
    return Fit(micro, per_gpu // micro, lo, at(micro))


def _what_would_fit(one: Plan, at: Callable[..., Plan]) -> list[str]:
    """The single changes that make micro-batch 1 fit, each checked with the planner."""
    par, batch, helps = one.par, one.cfg.train.batch_size, []
    if not one.grad_ckpt and at(1, grad_ckpt=True).fits:
        helps.append("train.checkpoint_suffix=true")
    if par.zero_stage < 3 and par.gpus > 1 and at(1, deepspeed=ZERO3).fits:
        helps.append("ZeRO-3 (--deepspeed ds_configs/zero3.json)")
    if not par.offload_optimizer:
        if par.zero_stage < 3 and at(1, deepspeed=ZERO2_OFFLOAD).fits:
            helps.append("the optimizer offloaded to the host (--deepspeed ds_configs/zero2_offload.json)")
        elif par.zero_stage == 3 and at(1, deepspeed=ZERO3_OFFLOAD).fits:
            helps.append("ZeRO-3 with zero_optimization.offload_optimizer and offload_param on cpu")
    ds = ZERO3 if par.zero_stage < 3 else None  # None: keep the user's own ZeRO-3 JSON
    n = par.gpus * 2
    while n <= MAX_GPUS:
        if batch % n == 0:
            more = at(1, gpus=n, **({"deepspeed": ds} if ds else {}))
            if more.fits:
                helps.append(f"--gpus {n} under ZeRO-3" + (" (--deepspeed ds_configs/zero3.json)" if ds else ""))
                break
        n *= 2
    return helps


# --------------------------------------------------------------------------- rendering


def _bytes(n: float) -> str:
    text = format_bytes(n)
    if "e+" in text:  # format_bytes' 3 significant digits print 1000..1023 of a unit as 1e+03
        value, unit = text.split()
        return f"{float(value):.0f} {unit}"
    return text


def _params(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


COLUMNS = ("stage", "r_max", "trainable", "weights", "grads", "optim", "ends", "suffix", "LoRA", "work",
           "act", "act-ckpt", "logits", "total", "fits", "GFLOP/tok")


def _row(s: StagePlan, label: str) -> list[str]:
    b = s.block_state
    return [
        label, f"{s.ratio:.3f}", _params(s.trainable_params), _bytes(b.params), _bytes(b.grads),
        _bytes(b.optimizer), _bytes(s.ends_state.gpu), _bytes(s.suffix),
        _bytes(s.lora_state.gpu), _bytes(s.workspace), _bytes(s.activations),
        _bytes(s.activations_ckpt), _bytes(s.logits), _bytes(s.total),
        "yes" if s.fits else "NO", f"{s.flops_per_token / 1e9:.3g}",
    ]


def _suffix_text(cfg: GrowConfig) -> str:
    q, lora = cfg.quant, cfg.lora
    text = (f"{q.quant_type.upper()}, blocksize {q.blocksize}, double quant {'on' if q.double_quant else 'off'}"
            if q.enabled else "fp32 (quant off)")
    if not lora.enabled:
        return text + "; LoRA off"
    where = f"the {lora.blocks} nearest blocks" if lora.blocks else "every suffix block"
    return text + f"; LoRA r={lora.rank} on {', '.join(lora.targets)}, trainable on {where}"


def _batch_text(p: Plan) -> str:
    batch = p.cfg.train.batch_size
    if p.accumulation is None:
        return f"micro-batch x {p.par.gpus} GPU(s) does not divide train.batch_size {batch}"
    return f"x {p.par.gpus} GPU(s) x {p.accumulation} accumulation steps = train.batch_size {batch}"


def render(p: Plan) -> str:
    """The human-readable plan: header, one row per stage, peak, totals and the comparison."""
    cfg, m = p.cfg, p.cfg.model
    e = sum(ends_params(m, p.vocab).values())
    total_params = m.num_blocks * block_params(m) + e
    lines = [
        f"grow plan: {m.num_blocks} blocks x {_params(block_params(m))} params + ends {_params(e)} = "
        f"{_params(total_params)} params",
        f"  shape: hidden {m.hidden_size}, heads {m.num_heads} (kv {m.num_kv_heads}, head_dim {m.head_dim}), "
        f"intermediate {m.intermediate_size}, vocab {p.vocab}",
        f"  setup: {p.par.describe()}, {_bytes(p.gpu_memory)} each; precision {cfg.train.precision}; "
        f"micro-batch {p.micro_batch} x seq {p.seq_len} per GPU ({_batch_text(p)})",
        f"  suffix: {_suffix_text(cfg)}; gradient checkpointing of the suffix: {'on' if p.grad_ckpt else 'off'}",
        "  assumptions:",
        *(textwrap.fill(note, width=110, initial_indent="    - ", subsequent_indent="      ")
          for note in p.assumptions),
        textwrap.fill(
            "columns: bytes per GPU; weights/grads/optim = the trained block after ZeRO (weights include "
            "spectral-norm buffers); ends = embedding + norm + head with their grads and optimizer when trained; "
            "LoRA = adapters with grads and optimizer; work = workspace (estimate); act / act-ckpt = activations "
            f"without / with checkpointing of the suffix (estimate); total uses {'act-ckpt' if p.grad_ckpt else 'act'}"
            "; GFLOP/tok = forward + backward" + (" + recompute" if p.grad_ckpt else "") + " per token",
            width=112, initial_indent="  ", subsequent_indent="    "),
        "",
    ]
    rows = [list(COLUMNS)] + [_row(s, s.name) for s in p.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    peak = p.peak
    lines += [
        "",
        f"peak: {peak.name} at {_bytes(peak.total)} of {_bytes(p.gpu_memory)} -- "
        + ("every stage fits" if p.fits
           else f"{sum(not s.fits for s in p.stages)} of {len(p.stages)} stages do NOT fit"),
    ]
    host = max(s.host for s in p.stages)
    if host:
        lines.append(f"host memory for offloaded states (peak stage, per GPU): {_bytes(host)}")
    total = f"total: {p.total_tokens:,} tokens, {p.total_flops:.3g} FLOPs"
    seconds = p.seconds(p.total_flops)
    if seconds is not None:
        total += f", about {_duration(seconds)} at {p.throughput:g} TFLOPS x {p.par.gpus} GPU(s)"
    else:
        total += " (pass --throughput TFLOPS for a wall time)"
    lines += [total, "", "compare (same GPUs, ZeRO setup and micro-batch; logits at r_1):"]
    for other in (p.full, p.qlora):
        flops = p.total_tokens * other.flops_per_token
        sec = p.seconds(flops)
        lines.append(
            f"  {other.name:<20} trainable {_params(other.trainable_params):>6}, model states "
            f"{_bytes(other.model_states)}, work {_bytes(other.workspace)}, act "
            f"{_bytes(other.selected_activations)}, logits {_bytes(other.logits)} -> total "
            f"{_bytes(other.total)}, fits: {'yes' if other.fits else 'NO'}; "
            f"{other.flops_per_token / 1e9:.3g} GFLOP/tok" + (f", {_duration(sec)} for the same tokens" if sec else "")
        )
    lines.append(
        f"  {'grow (this plan)':<20} peak {_bytes(peak.total)}, fits: "
        f"{'yes' if p.fits else 'NO'}; "
        f"{p.total_flops / max(1, p.total_tokens) / 1e9:.3g} GFLOP/tok on average"
        + (f", {_duration(seconds)}" if seconds else "")
    )
    return "\n".join(lines)

"""Bytes and FLOPs of each part of a stage: closed formulas over the shape (``grow plan``).

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

Activations (estimate; bytes per token, assuming fused SDPA/flash attention -- no T x T score
matrix -- whose log-sum-exp adds 4*n_h bytes per block; h_q = n_h * head_dim; f = bytes of the
residual stream, the final norm's dtype: 4 over fp32 master weights, also under bf16 autocast,
2 when the model itself is 16-bit under DeepSpeed):
    trained block        counted from what autograd saves (measured on CPU, tests/test_plan.py):
                         2*(4h + f*h + 4)    the RMSNorms' fp32 inputs, normalized inputs (for
                                             the norm weights' gradients) and rsqrt
                         + a*(2 h_q + 2kv) + 4 n_h   q, k, v and output of fused SDPA, LSE
                         + 4I*a              gate, silu(gate), up, silu(gate)*up
                         + 5h*a (one autocast copy of the input per q/k/v/gate/up) under bf16
                           autocast over fp32 weights, else 2h*a (the two norm outputs)
    frozen block         counted the same way:
                         4*(2h + 2)          the two RMSNorms' fp32 inputs and rsqrt
                         + a*(2 h_q + 2kv) + 4 n_h   q, k, v and output of fused SDPA, LSE
                         + 3I*f (NF4) or 3I*a (frozen in full precision): gate, silu(gate),
                                             up -- bitsandbytes' 4-bit linear returns the dtype
                                             of its input (the fp32 norm output under bf16
                                             autocast) and keeps only its weight for backward
      + trainable LoRA   the inputs of targeted linears, in the compute dtype: under bf16
                         autocast over fp32 weights one cast copy per target (h each for
                         q/k/v/gate/up), else one shared h for q/k/v and one for gate/up;
                         +I for down_proj; none for o_proj (its input is the attention output,
                         kept already); and r per target (A x)
    suffix, no checkpointing   the sum over the s suffix blocks
    suffix, checkpointed       h*f per suffix block (boundary hidden states) + one frozen
                               block's activations recomputed in backward (the largest),
                               less its input, which is one of the boundary states
    logits               grow applies the head only at masked positions, m = ceil(r_k*T)
                         per sequence: B*m*(V*(a + 4) + 2h*a) -- head output, its fp32
                         log-softmax for the loss, the gathered hidden states and their norm
  Everything is multiplied by B*T (logits by B*m). Gradients of activations in flight,
  the CUDA context, allocator fragmentation and ZeRO communication buckets are not counted.

FLOPs per token (of the T tokens in a sequence):
    block forward        F = 2*P_lin + 4*T*h          (QK^T and AV: 2*T*h each, bidirectional)
    LoRA forward         F_a = sum over targets of 2*r*(in + out)
    head forward         F_h = 2*h*V*r_k              (masked positions only; every position
                                                       for replacement noise)
    duo soft tokens      F_s = 2*h*V                  (softmax of the noisy one-hot times the
                                                       embedding table; backward only at stage L)
    stage k              forward F + s*(F + F_a) + F_h (+ F_s)
                         backward 2F (trained block: input + weight grads) + s*F (input
                         grads through the frozen suffix) + 2*F_a per trainable adapter,
                         F_a per frozen one + (2 F_h at stage L, else F_h) (+ F_s at stage L)
                         + s*(F + F_a) recomputation when the suffix is checkpointed
    wall time            sum over stages of steps_k * batch_size * T * FLOPs_k / (N * throughput)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grow.config import GrowConfig, LoraConfig, ModelConfig, QuantConfig, StabilityConfig
from grow.errors import UserError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
ADAM_STEP_BYTES = 4  # torch.optim.AdamW's per-tensor ``step``, fp32
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes absmax constants in blocks of 256
CODE_4BIT = 16  # entries of the NF4/FP4 table
CODE_8BIT = 256  # entries of the dynamic 8-bit table of the nested quantization
BLOCK_TENSORS = 9  # seven linears + two RMSNorm weights
TFLOP = 1e12


def ceil_div(a: int, b: int) -> int:
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
    blocks = ceil_div(n, quant.blocksize)
    total = ceil_div(n, 2) + 4 * CODE_4BIT
    if quant.double_quant:
        total += blocks + 4 * ceil_div(blocks, NESTED_BLOCKSIZE) + 4 * CODE_8BIT + 4
    else:
        total += 4 * blocks
    return total


def frozen_block_bytes(m: ModelConfig, quant: QuantConfig, shards: int = 1) -> int:
    """One frozen suffix block without its adapter on one GPU: NF4 linears + fp32 norms, or all fp32.

    ``shards`` = N under ZeRO-3, which partitions every parameter (the packed 4-bit weights and
    the norms) but not bitsandbytes' quantization state.
    """
    norms = 2 * 4 * ceil_div(m.hidden_size, shards)
    if not quant.enabled:
        return sum(4 * ceil_div(lin.params, shards) for lin in block_linears(m)) + norms
    total = norms
    for lin in block_linears(m):
        packed = ceil_div(lin.params, 2)
        state = nf4_linear_bytes(lin.in_features, lin.out_features, quant) - packed
        total += ceil_div(packed, shards) + state
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


# --------------------------------------------------------------------------- activations and FLOPs


def trained_block_activation_bytes(m: ModelConfig, a: int, *, residual: int = 4) -> int:
    """Bytes per token the trained block keeps for backward (module doc; measured in tests/test_plan.py)."""
    h, kv, inter = m.hidden_size, m.num_kv_heads * m.head_dim, m.intermediate_size
    h_q = m.num_heads * m.head_dim
    # RMSNorm (x2): the fp32 input, the normalized input (for the norm weight's gradient), rsqrt.
    total = 2 * (4 * h + residual * h + 4)
    # Fused SDPA: q, k, v as it receives them, its output (also o_proj's input), fp32 LSE.
    total += a * (2 * h_q + 2 * kv) + 4 * m.num_heads
    # gate, silu(gate), up and their product (down_proj's input), in the compute dtype.
    total += a * 4 * inter
    # The inputs of q/k/v and gate/up: under bf16 autocast over fp32 weights one cast copy per
    # linear, else the two norm outputs.
    total += a * h * (5 if residual != a else 2)
    return total


def frozen_block_activation_bytes(m: ModelConfig, a: int, lora: LoraConfig | None, *, residual: int = 4,
                                  quantized: bool = True) -> int:
    """Bytes per token a frozen block keeps for input-gradients; ``lora`` = its trainable adapter.

    ``a`` is the compute dtype's size, ``residual`` the residual stream's (the dtype of the final
    norm: 4 over fp32 master weights, 2 only when the model itself is 16-bit, DeepSpeed bf16).
    Counted from what autograd saves (tests/test_plan.py measures it; see the module doc).
    """
    h, kv, inter = m.hidden_size, m.num_kv_heads * m.head_dim, m.intermediate_size
    h_q = m.num_heads * m.head_dim
    # RMSNorm (x2) keeps its input in fp32 and the fp32 rsqrt per token.
    total = 2 * 4 * (h + 1)
    # Attention: q, k, v as SDPA receives them (autocast casts them to the compute dtype), its
    # output, and the fused kernel's fp32 log-sum-exp per head.
    total += a * (2 * h_q + 2 * kv) + 4 * m.num_heads
    # gate, silu(gate), up: a bitsandbytes 4-bit linear returns the dtype of its input (the norm
    # output, in the residual dtype); a plain linear under autocast returns the compute dtype.
    total += 3 * inter * (residual if quantized else a)
    if lora is not None:
        targets = set(lora.targets)
        qkv, gate_up = targets & {"q_proj", "k_proj", "v_proj"}, targets & {"gate_proj", "up_proj"}
        if residual != a:
            # Autocast casts the fp32 norm output once per linear it feeds: one copy per adapter.
            total += a * h * (len(qkv) + len(gate_up))
        else:
            total += a * h * (bool(qkv) + bool(gate_up))
        # down_proj's adapter keeps its input in the compute dtype; o_proj's is the attention
        # output, kept already; every adapter keeps A x (rank r) for B's weight gradient.
        total += a * inter * ("down_proj" in targets) + a * lora.rank * len(targets)
    return total


def block_forward_flops(m: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one block: 2 per weight + attention's 4*T*h."""
    return 2 * linear_params(m) + 4 * seq_len * m.hidden_size


def lora_forward_flops(m: ModelConfig, lora: LoraConfig) -> int:
    return 2 * lora_params(m, lora)


def masked_positions(ratio: float, seq_len: int) -> int:
    """Positions grow applies the head to: the nested mask hides ceil(r*T) tokens."""
    return min(seq_len, math.ceil(ratio * seq_len - 1e-9))


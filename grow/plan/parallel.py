"""How model states are laid out over the GPUs: plain PyTorch, or DeepSpeed ZeRO 0-3 with offload.

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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grow.errors import UserError
from grow.plan.counts import ADAM_BYTES, adamw_state_bytes, ceil_div


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
        o = ceil_div(o, n)
    if par.zero_stage >= 2:
        g = ceil_div(g, n)
    if par.zero_stage >= 3:
        p = ceil_div(p, n)
    host = 0
    if par.offload_optimizer:
        host, o = host + o, 0
    if par.offload_param:
        host, p = host + p, 0
    return States(p, g, o, host)


"""DeepSpeed ZeRO backend: one engine per stage, over exactly the parameters that train.

Launch: ``deepspeed --num_gpus 8 -m grow train CONFIG --out RUN --deepspeed ds_configs/zero2.json``.
The DeepSpeed JSON may say ``"auto"`` for anything grow's config already decides (batch
sizes, accumulation, clipping, optimizer hyper-parameters, precision); an explicit value
that disagrees with grow's config is an error naming both. The LR schedule is always grow's
(warmup + cosine), handed to DeepSpeed as a client scheduler.

What ZeRO does with the frozen 4-bit suffix: ZeRO-1/2 partition only optimizer state (and
gradients) of the trainable parameters; the suffix is replicated on every rank. ZeRO-3
converts every parameter of the module into a partitioned ZeRO parameter -- the packed
uint8 4-bit weights included -- and gathers each layer's weights for its forward; the
bitsandbytes quantization state (absmax, code tables) is not a parameter and stays
replicated. ``tests/test_deepspeed.py`` measures both.

deepspeed is imported lazily: without ``--deepspeed`` grow runs plain PyTorch in one
process and does not need it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from grow.config import GrowConfig
from grow.engine import LossFn, check_finite, lr_lambda
from grow.errors import UserError
from grow.model import power_iteration

AUTO = "auto"


def deepspeed_lib():
    try:
        import deepspeed
    except ImportError:
        raise UserError("--deepspeed: needs the deepspeed package (pip install 'grow[deepspeed]')") from None
    return deepspeed


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT op builder can read it.

    DeepSpeed 0.19 parses each entry as numbers and dies with a traceback on arch-specific
    targets such as "9.0a", which CUDA images for Hopper set (seen on an H200: FusedAdam's
    build, the optimizer of ds_configs/zero2.json and zero3.json). The plain "9.0" target builds
    the same fused optimizer, so the letter is dropped; "+PTX" is kept.
    """
    out = []
    for entry in re.split(r"[;\s]+", value.strip()):
        match = re.fullmatch(r"(\d+\.\d+)[a-z]?(\+PTX)?", entry)
        if entry:
            out.append(match.group(1) + (match.group(2) or "") if match else entry)
    return ";".join(dict.fromkeys(out))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group the launcher set up; (rank, world size)."""
    deepspeed = deepspeed_lib()
    if device.type == "cuda" and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    if "RANK" not in os.environ:
        # Started without the launcher: a one-process group, so `grow train --deepspeed` just works.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _fill(section: dict, key: str, value: Any, ours: str, where: str) -> None:
    """Set ``section[key]`` to ``value`` if absent or "auto"; an explicit different value is an error."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                   and abs(current - value) <= 1e-12 * max(1.0, abs(value))):
        raise UserError(f"--deepspeed: {where}{key}={current!r} conflicts with {ours}={value!r}; "
                        f"make them equal or write \"auto\"")


def resolve_config(path: str | Path, cfg: GrowConfig, world: int) -> dict:
    """Read the DeepSpeed JSON and fill its "auto" values from grow's config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--deepspeed: no such file: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--deepspeed: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"--deepspeed: {path} must hold a JSON object")
    B = cfg.train.batch_size
    micro = cfg.train.micro_batch_size
    if micro is None:
        if B % world:
            raise UserError(f"train.batch_size: {B} is not divisible by the {world} processes of this launch")
        micro = B // world
    if B % (micro * world):
        raise UserError(
            f"train.batch_size: {B} is not divisible by train.micro_batch_size={micro} x {world} processes"
        )
    _fill(ds, "train_batch_size", B, "train.batch_size", "")
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", "")
    _fill(ds, "gradient_accumulation_steps", B // (micro * world), "train.batch_size/(micro_batch_size x world)", "")
    _fill(ds, "gradient_clipping", float(cfg.stability.grad_clip), "stability.grad_clip", "")
    if "scheduler" in ds:
        raise UserError("--deepspeed: remove the \"scheduler\" section; grow's warmup + cosine schedule "
                        "(train.lr, train.warmup_steps, train.min_lr_ratio) is used")
    if "optimizer" in ds:
        opt = ds["optimizer"]
        if opt.get("type", "AdamW").lower() not in ("adamw", "adam"):
            raise UserError(f"--deepspeed: optimizer.type={opt.get('type')!r}; grow trains with AdamW")
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(cfg.train.lr), "train.lr", "optimizer.params.")
        _fill(params, "betas", [float(b) for b in cfg.train.betas], "train.betas", "optimizer.params.")
        _fill(params, "weight_decay", float(cfg.train.weight_decay), "train.weight_decay", "optimizer.params.")
    if ds.get("fp16", {}).get("enabled") is True:
        raise UserError("--deepspeed: fp16 is not supported (loss scaling with a 4-bit suffix); use bf16 via train.precision=bf16")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", cfg.train.precision == "bf16", "train.precision == 'bf16'", "bf16.")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    ds.setdefault("steps_per_print", 10**9)  # grow prints its own metrics line
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedEngine:
    """The stage's trainable parameters under a DeepSpeed engine; same interface as PlainEngine."""

    def __init__(self, model, params: list[torch.nn.Parameter], cfg: GrowConfig, ds_config: dict,
                 total_steps: int) -> None:
        deepspeed = deepspeed_lib()
        self.cfg = cfg
        self.params = params
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.is_main = self.rank == 0
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = ds_config["gradient_accumulation_steps"]
        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                          weight_decay=cfg.train.weight_decay)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_lambda(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def train_step(self, step: int, loss_fn: LossFn) -> float:
        total = torch.zeros((), device=self.engine.device)
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.micro
            with power_iteration(self.engine.module, a == 0):
                loss = loss_fn(step, slice(start, start + self.micro))
            check_finite(loss, step)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        torch.distributed.all_reduce(total)
        return total.item() / (self.accum * self.world)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def barrier(self) -> None:
        torch.distributed.barrier()

    def save_state(self, directory: Path, model, blocks) -> None:
        # Frozen 4-bit suffix and frozen adapters are rebuilt from the stage store on resume.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load_state(self, directory: Path, model, blocks) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {directory / 'deepspeed'}")

    def full_fp32(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The optimizer's fp32 master value of a trainable parameter, whole (a collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        return param if value is None else value

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer, whose state holds this rank's partition."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def close(self) -> None:
        self.engine.destroy()

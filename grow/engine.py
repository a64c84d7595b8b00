"""The optimisation of one stage: optimizer, LR schedule, clipping, precision, the step loop.

A stage hands the engine its trainable parameters and a loss function of the step number;
the engine owns everything that a different backend (DeepSpeed ZeRO) would replace.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grow.config import GrowConfig
from grow.model import power_iteration


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from grow.errors import UserError

        raise UserError("train.device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast(cfg: GrowConfig, device: torch.device):
    """bf16 autocast over fp32 master weights, or nothing for fp32."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


LossFn = Callable[[int, slice], torch.Tensor]
"""loss_fn(step, rows): the mean loss over rows ``rows`` of the global batch of ``step``."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower train.lr or check the data")


@dataclass
class StageLog:
    """What the loop measured: per-step losses and totals."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


class Ema:
    """Exponential moving average of the trained parameters (``train.ema``; MDLM/jif: 0.995).

    After optimizer update n (1-based) every average moves toward its parameter with decay
    min(decay, (1 + n) / (10 + n)): the warm-up keeps a short stage's average from being mostly
    the initial weights (0.995^80 would still give them 2/3 of the weight). The averages live in
    fp32 next to the parameters and are saved in every mid-stage checkpoint with the update count,
    so a resumed stage continues the very same average.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.shadow, self.params):
            avg.lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the averages into the parameters (the stage then measures and commits them)."""
        for avg, p in zip(self.shadow, self.params):
            p.copy_(avg.to(p.dtype))

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": [t.clone() for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for avg, saved in zip(self.shadow, state["shadow"], strict=True):
            avg.copy_(saved)


class PlainEngine:
    """Single-process PyTorch: AdamW + warmup/cosine + global-norm clipping (+ optional EMA)."""

    is_main = True

    def __init__(self, params: list[torch.nn.Parameter], cfg: GrowConfig, total_steps: int, model=None) -> None:
        if not params:
            raise ValueError("a stage must train at least one parameter")
        self.params = params
        self.model = model
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio),
        )
        self.ema = Ema(params, cfg.train.ema_decay) if cfg.train.ema else None

    def train_step(self, step: int, loss_fn: LossFn) -> float:
        """One optimizer step over the whole batch, in micro-batches; returns the mean loss."""
        B = self.cfg.train.batch_size
        micro = self.cfg.train.micro_batch_size or B
        total = 0.0
        for start in range(0, B, micro):
            # The loss is a mean over rows (grow.objective), so the micro/B-weighted sum of
            # micro-batch means is the mean over the batch.
            with power_iteration(self.model, start == 0) if self.model is not None else contextlib.nullcontext():
                loss = loss_fn(step, slice(start, start + micro))
            check_finite(loss, step)
            (loss * (micro / B)).backward()
            total += loss.item() * micro / B
        clip = self.cfg.stability.grad_clip
        torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return total

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def barrier(self) -> None:
        pass

    def save_state(self, directory: Path, model, blocks) -> None:
        from grow.checkpoint import save_trainable

        save_trainable(directory, model, blocks)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        torch.save(state, directory / "optimizer.pt")

    def load_state(self, directory: Path, model, blocks) -> None:
        from grow.checkpoint import load_trainable

        device = self.params[0].device
        load_trainable(directory, model, blocks, device)
        state = torch.load(directory / "optimizer.pt", map_location=device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if "ema" not in state:
                from grow.errors import UserError

                raise UserError(f"train.ema: the checkpoint {directory} was saved without an EMA; resume with "
                                "train.ema=false or re-run the stage with --from-stage")
            self.ema.load_state_dict(state["ema"])


def run_loop(
    engine: PlainEngine,
    loss_fn: LossFn,
    *,
    steps: int,
    tokens_per_step: int,
    label: str,
    log: Callable[[str], None],
    log_every: int,
    metrics_file: Path | None = None,
    start_step: int = 0,
    losses: list[float] | None = None,
    after_step: Callable[[int, list[float]], None] | None = None,
) -> StageLog:
    """Run optimizer steps ``start_step..steps-1``; one metrics line every ``log_every`` steps.

    ``after_step(done, losses)`` runs after every step (checkpointing, preemption).
    """
    is_main = engine.is_main
    record = StageLog(losses=list(losses or []), tokens=start_step * tokens_per_step)
    bar = tqdm(total=steps, initial=start_step, desc=label, unit="step", disable=None if is_main else True,
               leave=False)
    start = window_start = time.perf_counter()
    try:
        for step in range(start_step, steps):
            record.losses.append(engine.train_step(step, loss_fn))
            record.tokens += tokens_per_step
            bar.update(1)
            bar.set_postfix(loss=f"{record.losses[-1]:.3f}")
            done = step + 1
            if is_main and (done % log_every == 0 or done == steps):
                now = time.perf_counter()
                n = min(done % log_every or log_every, done - start_step)
                dt = (now - window_start) / n
                window_start = now
                recent = record.losses[-n:]
                eta = dt * (steps - done)
                line = {
                    "stage": label, "step": done, "steps": steps, "loss": sum(recent) / len(recent),
                    "lr": engine.lr, "ms_per_step": 1000 * dt, "tok_per_s": tokens_per_step / dt,
                }
                log(
                    f"{label} | step {done}/{steps} ({100 * done / steps:.0f}%) | loss {line['loss']:.4f} | "
                    f"lr {engine.lr:.2e} | {1000 * dt:.1f} ms/step | {tokens_per_step / dt:,.0f} tok/s | "
                    f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
                )
                if metrics_file is not None:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(line) + "\n")
            if after_step is not None:
                after_step(done, record.losses)
    finally:
        bar.close()
    record.seconds = time.perf_counter() - start
    return record

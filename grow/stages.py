"""The stage runner: train the stages of a run, in order, committing each one.

The curriculum (``grow.curriculum``) says what every stage is; this module only runs them:

  1. rebuild the stage's network from the committed stages (``grow.assemble``): the blocks it
     trains in full precision (fresh or continued, with spectral norm and residual gain), the
     frozen ones in 4-bit with their LoRA adapters, the ends trainable or anchored;
  2. hand the trainable parameters to the engine (plain PyTorch or DeepSpeed) and the
     stage's objective (``grow.objective``) as the loss of each step;
  3. measure held-out CE, snapshot what trained (fp32, whole -- DeepSpeed's master copy
     under ZeRO), fold the trained blocks on a CPU replica and commit ``stage-NN-LABEL``.

Every stage starts from a model rebuilt from the store, and everything else it needs is a
function of (config, seed, stage): an uninterrupted run and one resumed between stages take
the very same path, and no engine state outlives its stage.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

import grow
from grow.assemble import RunState, assemble, block_prefixes
from grow.checkpoint import (PREEMPT, Preempted, checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint,
                             trained_tensors)
from grow.config import GrowConfig
from grow.convert import block_stability
from grow.corruption import corruption_for
from grow.curriculum import StageSpec, stage_specs
from grow.data import Corpus
from grow.engine import PlainEngine, autocast, resolve_device, run_loop
from grow.errors import UserError
from grow.evaluate import level_report
from grow.memory import peak_bytes, reset_peak, stage_account
from grow.model import GrowModel, add_stability, fold
from grow.objective import MaskedDiffusionLoss, stage_batch
from grow.quant import write_adapters
from grow.store import (Stage, StorageError, check_run_files, list_stages, remove_leftovers, require_run, stage_dir, stage_problem,
                        write_stage)

Log = Callable[[str], None]


def seed_everything(seed: int, stage: int) -> None:
    """Seed Python, NumPy and torch from (run seed, stage), independent of earlier stages."""
    state = int(np.random.SeedSequence([seed, stage]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def versions() -> dict[str, str]:
    import transformers

    return {
        "grow": grow.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# --------------------------------------------------------------------------- what is committed


def committed(run: Path, specs: list[StageSpec], verify: bool = True) -> tuple[list[Stage], str | None]:
    """The committed stages that continue the run (a prefix of ``specs``), and why it stops early.

    A stage counts only when every stage before it counts: a later stage was trained on top
    of the earlier ones, so it means nothing without them. The reason names the first stage
    that breaks the prefix and what is wrong with it.
    """
    stages = list_stages(run, verify=verify)
    prefix: list[Stage] = []
    for spec in specs:
        stage = stages.get(spec.index)
        if stage is None:
            break
        if stage.spec.get("label") != spec.label or stage.spec.get("train") != list(spec.train):
            return prefix, (f"{stage.name} (trained blocks {stage.spec.get('train')}) does not match this config's "
                            f"stage {spec.name} (blocks {list(spec.train)})")
        prefix.append(stage)
    later = sorted(i for i in stages if i > len(prefix))
    if later:
        return prefix, f"{invalid_reason(run, specs[len(prefix)], verify)}, and {stages[later[0]].name} follows it"
    return prefix, None


def invalid_reason(run: Path, spec: StageSpec, verify: bool = True) -> str:
    """What is wrong with stage ``spec`` of ``run`` (its directory missing or invalid)."""
    path = stage_dir(run, spec.name)
    if not path.is_dir():
        return f"{spec.name} is missing"
    return f"{spec.name} is invalid: {stage_problem(path, verify) or 'does not continue the stages before it'}"


def invalid_next(run: Path, specs: list[StageSpec], stages: list[Stage], verify: bool = True) -> str | None:
    """The reason the stage after ``stages`` is not committed although its directory exists."""
    if len(stages) >= len(specs) or not stage_dir(run, specs[len(stages)].name).is_dir():
        return None
    return invalid_reason(run, specs[len(stages)], verify)


def repair_command(run: Path, cfg: GrowConfig, index: int) -> str:
    """The command that re-runs stage ``index`` of ``run`` and the stages after it."""
    ds = f" --deepspeed {cfg.train.deepspeed}" if cfg.train.deepspeed else ""
    return f"grow train {Path(run) / 'grow.yaml'} --out {run} --from-stage {index}{ds}"


def read_run_config(run: Path) -> GrowConfig:
    """The run's config from grow.yaml; one line (the hash problem when there is one) if unreadable."""
    from grow.config import from_dict
    from grow.store import run_problem

    path = Path(run) / "grow.yaml"
    try:
        return from_dict(GrowConfig, yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, UserError, UnicodeDecodeError, TypeError, AttributeError) as exc:
        reason = run_problem(run) or str(exc).splitlines()[0]
        raise UserError(f"RUN: {path} cannot be read: {reason}") from None


def load_run(run: Path, device: torch.device | str = "cpu", *, require_complete: bool = False,
             log: Log | None = None):
    """(config, model, tokenizer, spec) of a run as its newest committed stage left it, in eval mode.

    The model is exactly the one that stage measured: the blocks it trained in full
    precision, the frozen ones in 4-bit with their adapters (per the run's config). grow.yaml
    and the tokenizer are used only when they match their hashes in run.json. A run whose
    committed stages are broken in the middle is refused with the command that repairs it;
    an unfinished run is loaded as far as it goes.
    """
    from grow.data import load_tokenizer

    run = require_run(Path(run))
    check_run_files(run, log)
    cfg = read_run_config(run)
    specs = stage_specs(cfg)
    stages, problem = committed(run, specs)
    if problem:
        raise UserError(f"RUN: {problem}; repair the run with {repair_command(run, cfg, len(stages) + 1)}")
    if not stages:
        raise UserError(f"RUN: {run} has no complete stage; train one with grow train CONFIG --out {run} --resume")
    broken = invalid_next(run, specs, stages)
    if require_complete and len(stages) < len(specs):
        if broken:
            raise UserError(f"RUN: {broken}; re-run it with {repair_command(run, cfg, len(stages) + 1)}")
        raise UserError(f"RUN: {run} has {len(stages)} of {len(specs)} stages; finish it with "
                        f"grow train {run / 'grow.yaml'} --out {run} --resume"
                        + (f" --deepspeed {cfg.train.deepspeed}" if cfg.train.deepspeed else ""))
    if broken and log is not None:
        log(f"warning: {run}: {broken}; using the stages before it (re-run it with "
            f"{repair_command(run, cfg, len(stages) + 1)})")
    spec = specs[len(stages) - 1]
    tokenizer = load_tokenizer(run / "tokenizer")
    model = assemble(cfg, tokenizer, spec, RunState(stages), device, training=False)
    return cfg, model, tokenizer, spec


# --------------------------------------------------------------------------- one stage


class Backend:
    """Plain single-process PyTorch, or DeepSpeed over the processes of a launch."""

    def __init__(self, cfg: GrowConfig) -> None:
        self.cfg = cfg
        self.ds_config = None
        self.rank, self.world = 0, 1
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deepspeed:
            from grow.ds import init_distributed, launched_world_size, resolve_config

            self.ds_config = resolve_config(cfg.train.deepspeed, cfg, launched_world_size())
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            self.rank, self.world = init_distributed(self.device)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--deepspeed: this is a multi-process launch; pass --deepspeed ds_configs/<config>.json")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def engine(self, model: GrowModel, params: list, steps: int):
        if self.ds_config is None:
            return PlainEngine(params, self.cfg, steps, model=model)
        from grow.ds import DeepSpeedEngine

        return DeepSpeedEngine(model, params, self.cfg, self.ds_config, steps)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@dataclass
class StageResult:
    losses: list[float]
    tokens: int
    seconds: float
    heldout_ce: float
    levels: dict
    memory: dict
    snapshot: dict[str, torch.Tensor]  # fp32 CPU copy of everything the stage trained (+ trained blocks' buffers)


def stage_files(model: GrowModel, cfg: GrowConfig, spec: StageSpec, snapshot: dict[str, torch.Tensor],
                state: RunState):
    """(weights, adapters) to commit for a stage, computed on a CPU replica from the snapshot.

    Weights: every block the stage trained, folded (spectral norm and gain become plain
    weights), with its time embedding; the ends when it trained them. Adapters: the whole set
    of the stage's frozen blocks, the trained ones from the snapshot and the others as the
    previous stage stored them (None when the stage has no frozen block with an adapter).
    """
    replica = GrowModel(model.config)
    weights: dict[str, torch.Tensor] = {}
    for k in spec.train:
        layer, time = block_prefixes(k)
        prefix = f"blocks.{k - 1}."
        block = replica.new_block(k).cpu()
        add_stability(block, block_stability(cfg))
        block.load_state_dict({n[len(prefix):]: v for n, v in snapshot.items() if n.startswith(prefix)}, strict=True)
        fold(block)
        weights.update({f"{layer}{n}": v for n, v in block.state_dict().items()})
        weights.update({f"{time}{n[len(f'time_embed.{k - 1}.'):]}": v for n, v in snapshot.items()
                        if n.startswith(f"time_embed.{k - 1}.")})
    if spec.trains_ends:
        weights.update({"model.embed_tokens.weight": snapshot["embed_tokens.weight"],
                        "model.norm.weight": snapshot["norm.weight"], "lm_head.weight": snapshot["lm_head.weight"]})
    if not (cfg.lora.enabled and spec.frozen):
        return weights, None
    from grow.quant import PEFT_PREFIX, peft_key

    frozen = tuple(f"{PEFT_PREFIX}{k - 1}." for k in spec.frozen)
    adapters = {n: v for n, v in state.adapters().items() if n.startswith(frozen)}
    adapters.update({peft_key(n): v for n, v in snapshot.items() if "lora_" in n})
    return weights, adapters


def train_stage(spec: StageSpec, corpus: Corpus, cfg: GrowConfig, backend: Backend, state: RunState, *,
                log: Log, run: Path | None = None) -> tuple[GrowModel, StageResult]:
    """Build stage ``spec``'s network from ``state``, train it, measure it; returns (model, result)."""
    device = backend.device
    seed_everything(cfg.train.seed, spec.index)
    model = assemble(cfg, corpus.tokenizer, spec, state, device, training=True)
    params = list(model.trainable_parameters())
    reset_peak(device)
    engine = backend.engine(model, params, spec.steps)
    objective = MaskedDiffusionLoss(spec, cfg, corpus.mask_token_id)
    B, T = cfg.train.batch_size, corpus.train.shape[1]

    def loss_fn(step: int, rows: slice) -> torch.Tensor:
        batch = stage_batch(corpus.train, spec, cfg, step, rows, device)
        with autocast(cfg, device):
            return objective(model, batch)

    start_step, losses = 0, []
    root = checkpoint_root(run, spec.name) if run is not None else None
    if root is not None and (found := latest_checkpoint(root, log)) is not None:
        start_step, losses = load_checkpoint(found, model, spec.train, engine)
        log(f"{spec.name}: resuming at step {start_step}/{spec.steps} from {found}")

    def after_step(done: int, losses: list[float]) -> None:
        if root is None or done == spec.steps:
            return
        every = cfg.train.checkpoint_every
        saved = None
        if every and done % every == 0:
            saved = save_checkpoint(root, done, model, spec.train, engine, losses, cfg.train.keep_checkpoints)
        if PREEMPT.requested:
            if saved is None:
                saved = save_checkpoint(root, done, model, spec.train, engine, losses, cfg.train.keep_checkpoints)
            raise Preempted(saved, done)

    label = f"{spec.name} {spec.noise.describe()}"
    try:
        record = run_loop(
            engine, loss_fn, steps=spec.steps, tokens_per_step=B * T, label=label, log=log,
            log_every=cfg.train.log_every, metrics_file=run / "metrics.jsonl" if run and backend.is_main else None,
            start_step=start_step, losses=losses, after_step=after_step,
        )
        memory = {**stage_account(model, spec, getattr(engine, "torch_optimizer", engine.optimizer)),
                  **peak_bytes(device), "trainable_adapter_blocks": list(spec.adapters)}
        if getattr(engine, "ema", None) is not None:
            engine.ema.apply()  # the stage measures and commits the averaged weights
        model.eval()
        with autocast(cfg, device):
            own, levels = level_report(model, cfg, spec, corpus.heldout, corpus.mask_token_id, device)
        snapshot = trained_tensors(model, spec.train, master=getattr(engine, "full_fp32", None), dtype=torch.float32)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    return model, StageResult(record.losses, record.tokens, record.seconds, own, levels, memory, snapshot)


# --------------------------------------------------------------------------- the run


def grow_run(cfg: GrowConfig, run: Path, corpus: Corpus, *, log: Log, stop_after: str | None = None,
             backend: Backend | None = None) -> None:
    """Run every stage of the curriculum not yet committed in ``run``, in order, committing each.

    ``stop_after`` names a stage (its index or label) after whose commit the run stops.
    """
    backend = backend or Backend(cfg)
    specs = stage_specs(cfg)
    stages, problem = committed(run, specs)
    if problem:
        raise UserError(f"RUN: {problem}; re-run from it with {repair_command(run, cfg, len(stages) + 1)}")
    if backend.is_main:
        remove_leftovers(run, log)  # temp dirs of an interrupted commit, checkpoints of committed stages
    if stages:
        log(f"resuming: stages 1..{len(stages)} of {len(specs)} are committed in {run}")
    for spec in specs[len(stages):]:
        if spec.converted:  # taken from model.init_from, not trained (grow.convert)
            from grow.convert import commit_conversion

            commit_conversion(cfg, spec, run, corpus, backend, log)
            stages, _ = committed(run, specs, verify=False)
            if stop_after is not None and stop_after in (str(spec.index), spec.label, spec.name):
                break
            continue
        state = RunState(list(stages))
        model, result = train_stage(spec, corpus, cfg, backend, state, log=log, run=run)
        if backend.is_main:
            weights, adapters = stage_files(model, cfg, spec, result.snapshot, state)
            manifest = {
                "steps": spec.steps,
                "tokens_seen": result.tokens,
                "heldout_ce": result.heldout_ce,
                "levels": result.levels,
                "final_train_loss": result.losses[-1],
                "losses": result.losses,
                "train_seconds": result.seconds,
                "memory": result.memory,
                "world_size": backend.world,
                "data": {
                    "source": cfg.data.source,
                    "train_sequences": int(corpus.train.shape[0]),
                    "heldout_sequences": int(corpus.heldout.shape[0]),
                    "position": spec.steps * cfg.train.batch_size,
                },
                "schedule": cfg.ratios(),
                "config": cfg.to_dict(),
                "versions": versions(),
            }
            writers = [lambda d: write_adapters(adapters, cfg.lora, d)] if adapters else []
            try:
                write_stage(run, spec.to_dict(), weights, manifest, max_shard_size=cfg.store.max_shard_size,
                            tokenizer=corpus.tokenizer, extra_writers=writers)
            except StorageError as exc:
                ckpt = latest_checkpoint(checkpoint_root(run, spec.name), log=lambda s: None)
                kept = f"its checkpoint at step {ckpt.name.split('-')[1].lstrip('0') or 0}" if ckpt else "no checkpoint"
                raise StorageError(f"{exc} ({kept}); make room and continue with grow train "
                                   f"{run / 'grow.yaml'} --out {run} --resume") from None
            shutil.rmtree(checkpoint_root(run, spec.name), ignore_errors=True)  # superseded by the stage
            try:  # an empty checkpoints/ too: a resumed run ends with an uninterrupted run's files
                checkpoint_root(run, spec.name).parent.rmdir()
            except OSError:
                pass
            what = "CE on every token" if corruption_for(cfg).replaces_tokens else "masked CE"
            log(f"{spec.name} committed: held-out {what} at {spec.noise.describe()} is "
                f"{result.heldout_ce:.4f} ({result.seconds:.1f} s)")
        backend.barrier()
        del model, result
        stages, _ = committed(run, specs, verify=False)
        if stop_after is not None and stop_after in (str(spec.index), spec.label, spec.name):
            break

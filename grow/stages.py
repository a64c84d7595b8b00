"""Right-to-left growth (design card 4.1): stage L, then L-1, ..., then 1.

Stage k:
  1. freeze blocks k+1..L (and, for k < L, the embedding, final norm and head: the anchor);
  2. prepend a fresh block k, with spectral norm and residual gain attached;
  3. corrupt each batch at r_k with the nested deterministic mask;
  4. train block k (stage L: block L + embedding + norm + head) so that blocks k..L
     reconstruct the masked tokens through the shared head;
  5. measure held-out CE at r_k, snapshot what trained (fp32, whole -- DeepSpeed's master
     copy under ZeRO), fold block k's parametrizations on a CPU replica, commit ``stage-kk``.

Every stage starts from a model rebuilt from the committed stages k+1..L, and everything else
it needs is a function of (config, seed, k): an uninterrupted run and one resumed between
stages take the very same path, and no engine state outlives its stage.
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
from safetensors.torch import load_file

import grow
from grow.checkpoint import (PREEMPT, Preempted, checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint,
                             trained_tensors)
from grow.config import GrowConfig
from grow.data import Corpus, batch_positions
from grow.engine import PlainEngine, autocast, resolve_device, run_loop
from grow.errors import UserError
from grow.evaluate import heldout_ce
from grow.memory import peak_bytes, reset_peak, stage_account
from grow.model import GrowModel, add_stability, fold, hf_config
from grow.noise import TRAIN_SALT, corrupt, mask_scores, masked_ce, nested_mask
from grow.quant import (ADAPTER_WEIGHTS, add_adapter, cast_ends, load_adapter_state, peft_key, quantize_block,
                        set_adapter_trainable, write_adapters)
from grow.store import Stage, list_stages, require_run, write_stage

Log = Callable[[str], None]


@dataclass(frozen=True)
class StageSpec:
    """What stage ``block`` trains and at which noise level."""

    block: int
    ratio: float
    steps: int
    trains_ends: bool  # stage L also trains embedding, final norm and head


def stage_specs(cfg: GrowConfig) -> list[StageSpec]:
    """Stages in the order they run: block L first."""
    ratios = cfg.ratios()
    L = cfg.model.num_blocks
    return [StageSpec(k, ratios[k - 1], cfg.steps_for(k), k == L) for k in range(L, 0, -1)]


def seed_everything(seed: int, block: int) -> None:
    """Seed Python, NumPy and torch from (run seed, block), independent of earlier stages."""
    state = int(np.random.SeedSequence([seed, block]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def special_ids(tokenizer) -> dict[str, int | None]:
    return {
        "mask": tokenizer.mask_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }


def build_model(cfg: GrowConfig, tokenizer) -> GrowModel:
    vocab = cfg.model.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise UserError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return GrowModel(hf_config(cfg.model, vocab, special_ids(tokenizer)))


def prepare_suffix_block(model: GrowModel, block_id: int, cfg: GrowConfig, device: torch.device) -> None:
    """Turn freshly frozen block ``block_id`` into a suffix block: 4-bit, with a LoRA adapter.

    Runs at the start of stage ``block_id - 1`` (and for every stored suffix block on
    restore), always in this order, so fresh and resumed runs build identical models.
    """
    if cfg.quant.enabled:
        quantize_block(model.block(block_id), cfg.quant, device)
    if block_id == model.num_blocks:
        cast_ends(model, cfg.quant)
    if cfg.lora.enabled:
        add_adapter(model, block_id, cfg.lora)


def restore_suffix(model: GrowModel, stages: dict[int, Stage], cfg: GrowConfig, device: torch.device) -> None:
    """Rebuild the state right after the leftmost stored stage: blocks, 4-bit suffix, adapters.

    The stages must be a contiguous suffix j..L. Block j stays in full precision (it is
    quantized when stage j-1 starts); j+1..L are rebuilt from their stored full-precision
    weights and get the adapters stored by stage j.
    """
    L = model.num_blocks
    first = min(stages)
    missing = [k for k in range(first, L + 1) if k not in stages]
    if missing:
        raise UserError(f"RUN: stages {missing} are missing or invalid between block {first} and {L}")
    model.load_ends(stages[L].weights())
    model.freeze_ends(True)
    for block_id in range(L, first - 1, -1):
        model.prepend_block(model.load_block(block_id, stages[block_id].weights()).to(device))
        model.block(block_id).requires_grad_(False)
    for block_id in range(L, first, -1):
        prepare_suffix_block(model, block_id, cfg, device)
    if cfg.lora.enabled and first < L:
        load_adapter_state(model, load_file(stages[first].path / ADAPTER_WEIGHTS, device=str(device)))


def load_run(run: Path, device: torch.device | str = "cpu", *, require_complete: bool = False,
             log: Log | None = None):
    """(config, model, tokenizer) of a run as its newest stage left it, in eval mode.

    The model is exactly the one training used: the leftmost stored block in full
    precision, the suffix in 4-bit with its adapters (per the run's config). A run still
    growing yields the contiguous suffix of stages that ends at block L; stages not joined
    to it (left behind by an interrupted --from-stage, say) are ignored with a warning.
    """
    from grow.config import from_dict
    from grow.data import load_tokenizer

    run = require_run(Path(run))
    cfg = from_dict(GrowConfig, yaml.safe_load((run / "grow.yaml").read_text()))
    L = cfg.model.num_blocks
    stages = list_stages(run, verify=True)
    if not stages:
        raise UserError(f"RUN: {run} has no complete stage; train one with grow train CONFIG --out {run}")
    suffix = []
    for k in range(L, 0, -1):
        if k not in stages:
            break
        suffix.append(k)
    if not suffix:
        raise UserError(f"RUN: {run} has no complete stage for block {L}, which every suffix starts from")
    detached = sorted(set(stages) - set(suffix))
    if detached and log is not None:
        log(f"warning: {run}: stages {detached} are not joined to block {L}; ignored")
    if require_complete and min(suffix) != 1:
        raise UserError(f"RUN: {run} is grown down to block {min(suffix)} only; finish it with grow train --resume")
    tokenizer = load_tokenizer(run / "tokenizer")
    device = torch.device(device)
    model = build_model(cfg, tokenizer).to(device)
    restore_suffix(model, {k: stages[k] for k in suffix}, cfg, device)
    model.eval()
    return cfg, model, tokenizer


def versions() -> dict[str, str]:
    import transformers

    return {
        "grow": grow.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


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
    memory: dict
    snapshot: dict[str, torch.Tensor]  # fp32 CPU copy of everything the stage trained (+ block k buffers)


def snapshot_trained(model: GrowModel, block_id: int, engine) -> dict[str, torch.Tensor]:
    """Everything stage k trained, whole and fp32 on the CPU.

    Under DeepSpeed the values come from the optimizer's fp32 master copy (whole, even under
    ZeRO-3), not from the possibly 16-bit, possibly partitioned module parameters.
    """
    return trained_tensors(model, block_id, master=getattr(engine, "full_fp32", None), dtype=torch.float32)


def stage_files(model: GrowModel, cfg: GrowConfig, spec: StageSpec, snapshot: dict[str, torch.Tensor],
                previous: Stage | None):
    """(weights, adapters) to commit for stage k, computed on a CPU replica from the snapshot."""
    prefix = f"blocks.{spec.block - 1}."
    replica = GrowModel(model.config)
    block = replica.new_block(spec.block).cpu()
    add_stability(block, cfg.stability)
    block.load_state_dict({k[len(prefix):]: v for k, v in snapshot.items() if k.startswith(prefix)
                           and "lora_" not in k}, strict=True)
    fold(block)
    weights = {f"model.layers.{spec.block - 1}.{k}": v for k, v in block.state_dict().items()}
    if spec.trains_ends:
        weights.update({"model.embed_tokens.weight": snapshot["embed_tokens.weight"],
                        "model.norm.weight": snapshot["norm.weight"], "lm_head.weight": snapshot["lm_head.weight"]})
    adapters = None
    if cfg.lora.enabled and not spec.trains_ends:
        # Frozen adapters (outside lora.blocks) are as the previous stage stored them.
        adapters = load_file(previous.path / ADAPTER_WEIGHTS) if previous and (previous.path / ADAPTER_WEIGHTS).exists() else {}
        adapters.update({peft_key(k): v for k, v in snapshot.items() if "lora_" in k})
    return weights, adapters


def train_stage(
    model: GrowModel,
    spec: StageSpec,
    corpus: Corpus,
    cfg: GrowConfig,
    backend: Backend,
    *,
    log: Log,
    run: Path | None = None,
) -> StageResult:
    """Prepend and train block ``spec.block`` on a model holding the stored suffix k+1..L."""
    device = backend.device
    seed_everything(cfg.train.seed, spec.block)
    L = model.num_blocks
    if spec.trains_ends:
        model.init_ends()
    else:
        prepare_suffix_block(model, spec.block + 1, cfg, device)
    model.freeze_suffix(spec.block + 1)
    model.freeze_ends(not spec.trains_ends)
    block = model.new_block(spec.block)
    add_stability(block, cfg.stability)
    model.prepend_block(block)
    block.requires_grad_(True)
    adapters = set_adapter_trainable(model, spec.block, cfg.lora) if cfg.lora.enabled else []
    model.checkpoint_from = spec.block + 1 if cfg.train.checkpoint_suffix else None
    model.train()

    params = list(model.trainable_parameters())
    reset_peak(device)
    engine = backend.engine(model, params, spec.steps)
    mask_id = corpus.mask_token_id
    B, T = cfg.train.batch_size, corpus.train.shape[1]
    next_ratio = cfg.ratios()[spec.block] if spec.block < L else None
    consistency = cfg.stability.consistency_weight if next_ratio is not None else 0.0

    def loss_fn(step: int, rows: slice) -> torch.Tensor:
        sample_ids, epochs = batch_positions(len(corpus.train), step, B, cfg.train.seed, stream=spec.block)
        sample_ids, epochs = sample_ids[rows], epochs[rows]
        ids = corpus.train[torch.from_numpy(sample_ids)].to(device)
        # The mask key ignores the stage, so a sample's masks are nested across stages.
        keys = epochs * len(corpus.train) + sample_ids
        scores = mask_scores(keys, T, cfg.train.seed, TRAIN_SALT)
        mask = nested_mask(scores, spec.ratio).to(device)
        with autocast(cfg, device):
            after_k = model.forward_from(model.embed(corrupt(ids, mask, mask_id)), start=spec.block, end=spec.block)
            hidden = model.forward_from(after_k, start=spec.block + 1)
            # The head only where the loss is: at r=0.15 that is 7x fewer head FLOPs.
            loss = masked_ce(model.head(hidden[mask]), ids[mask])
            if consistency:
                # What the suffix was trained on as its input: the same sample at r_{k+1}
                # (the nested mask), embedded. Block k learns one reverse step in that space.
                lighter = nested_mask(scores, next_ratio).to(device)
                target = model.embed(corrupt(ids, lighter, mask_id)).detach()
                loss = loss + consistency * torch.nn.functional.mse_loss(after_k.float(), target.float())
        return loss

    start_step, losses = 0, []
    root = checkpoint_root(run, spec.block) if run is not None else None
    if root is not None and (found := latest_checkpoint(root, log)) is not None:
        start_step, losses = load_checkpoint(found, model, spec.block, engine)
        log(f"block {spec.block}: resuming at step {start_step}/{spec.steps} from {found}")

    def after_step(done: int, losses: list[float]) -> None:
        if root is None or done == spec.steps:
            return
        every = cfg.train.checkpoint_every
        saved = None
        if every and done % every == 0:
            saved = save_checkpoint(root, done, model, spec.block, engine, losses, cfg.train.keep_checkpoints)
        if PREEMPT.requested:
            if saved is None:
                saved = save_checkpoint(root, done, model, spec.block, engine, losses, cfg.train.keep_checkpoints)
            raise Preempted(saved, done)

    label = f"block {spec.block}/{model.num_blocks} r={spec.ratio:.3f}"
    try:
        record = run_loop(
            engine, loss_fn, steps=spec.steps, tokens_per_step=B * T, label=label, log=log,
            log_every=cfg.train.log_every, metrics_file=run / "metrics.jsonl" if run and backend.is_main else None,
            start_step=start_step, losses=losses, after_step=after_step,
        )
        memory = {**stage_account(model, spec.block, getattr(engine, "torch_optimizer", engine.optimizer)),
                  **peak_bytes(device),
                  "trainable_adapter_blocks": adapters}
        model.eval()
        with autocast(cfg, device):
            ce = heldout_ce(
                lambda x: model(x, start=spec.block), corpus.heldout, spec.ratio, mask_token_id=mask_id,
                seed=cfg.train.seed, batch_size=B, batches=cfg.train.eval_batches, device=device,
            )
        snapshot = snapshot_trained(model, spec.block, engine)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    return StageResult(record.losses, record.tokens, record.seconds, ce, memory, snapshot)


def grow_run(cfg: GrowConfig, run: Path, corpus: Corpus, *, log: Log, stop_after: int | None = None,
             backend: Backend | None = None) -> None:
    """Grow every block not yet stored in ``run``, right to left, committing each stage.

    Each stage starts from a model rebuilt from the committed stages -- the same path a
    resume takes -- so nothing of an earlier stage's engine survives into the next.
    """
    backend = backend or Backend(cfg)
    device = backend.device
    stages = list_stages(run, verify=True)
    if stages:
        log(f"resuming: blocks {min(stages)}..{cfg.model.num_blocks} are stored in {run}")
    for spec in stage_specs(cfg):
        if spec.block in stages:
            continue
        model = build_model(cfg, corpus.tokenizer).to(device)
        if stages:
            restore_suffix(model, stages, cfg, device)
        result = train_stage(model, spec, corpus, cfg, backend, log=log, run=run)
        if backend.is_main:
            weights, adapters = stage_files(model, cfg, spec, result.snapshot, stages.get(spec.block + 1))
            manifest = {
                "ratio": spec.ratio,
                "steps": spec.steps,
                "tokens_seen": result.tokens,
                "heldout_ce": result.heldout_ce,
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
            writers = [lambda d: write_adapters(adapters, cfg.lora, d)] if adapters is not None else []
            write_stage(run, spec.block, weights, manifest, max_shard_size=cfg.store.max_shard_size,
                        tokenizer=corpus.tokenizer, extra_writers=writers)
            shutil.rmtree(checkpoint_root(run, spec.block), ignore_errors=True)  # superseded by the stage
            log(f"stage {spec.block:02d} committed: held-out masked CE at r={spec.ratio:.3f} is "
                f"{result.heldout_ce:.4f} ({result.seconds:.1f} s)")
        backend.barrier()
        del model, result
        stages = list_stages(run, verify=False)
        if stop_after is not None and spec.block == stop_after:
            break

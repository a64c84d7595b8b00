"""Right-to-left growth (design card 4.1): stage L, then L-1, ..., then 1.

Stage k:
  1. freeze blocks k+1..L (and, for k < L, the embedding, final norm and head: the anchor);
  2. prepend a fresh block k, with spectral norm and residual gain attached;
  3. corrupt each batch at r_k with the nested deterministic mask;
  4. train block k (stage L: block L + embedding + norm + head) so that blocks k..L
     reconstruct the masked tokens through the shared head;
  5. fold block k's parametrizations, measure held-out CE at r_k, commit ``stage-kk``.

Everything a stage needs is a function of (config, seed, k) and the stored stages k+1..L,
which is what makes a resume between stages reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import grow
from grow.config import GrowConfig
from grow.data import Corpus, batch_positions
from grow.engine import PlainEngine, autocast, resolve_device, run_loop
from grow.errors import UserError
from grow.evaluate import heldout_ce
from grow.model import GrowModel, add_stability, fold, hf_config
from grow.noise import TRAIN_SALT, corrupt, mask_scores, masked_ce, nested_mask
from grow.store import Stage, list_stages, write_stage

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


def restore_suffix(model: GrowModel, stages: dict[int, Stage]) -> None:
    """Attach the stored blocks (folded, frozen) and ends of a run, rightmost first."""
    L = model.num_blocks
    model.load_ends(stages[L].weights())
    for block_id in range(L, min(stages) - 1, -1):
        model.prepend_block(model.load_block(block_id, stages[block_id].weights()))


def versions() -> dict[str, str]:
    import transformers

    return {
        "grow": grow.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def train_stage(
    model: GrowModel,
    spec: StageSpec,
    corpus: Corpus,
    cfg: GrowConfig,
    device: torch.device,
    *,
    log: Log,
    metrics_file: Path | None = None,
) -> tuple[dict, float]:
    """Prepend and train block ``spec.block``; returns (loop record as dict, held-out CE at r_k)."""
    seed_everything(cfg.train.seed, spec.block)
    if spec.trains_ends:
        model.init_ends()
    model.freeze_suffix(spec.block + 1)
    model.freeze_ends(not spec.trains_ends)
    block = model.new_block(spec.block)
    add_stability(block, cfg.stability)
    model.prepend_block(block)
    model.train()

    params = list(model.trainable_parameters())
    engine = PlainEngine(params, cfg, spec.steps)
    mask_id = corpus.mask_token_id
    B, T = cfg.train.batch_size, corpus.train.shape[1]

    def loss_fn(step: int) -> torch.Tensor:
        sample_ids, epochs = batch_positions(len(corpus.train), step, B, cfg.train.seed, stream=spec.block)
        ids = corpus.train[torch.from_numpy(sample_ids)].to(device)
        # The mask key ignores the stage, so a sample's masks are nested across stages.
        keys = epochs * len(corpus.train) + sample_ids
        mask = nested_mask(mask_scores(keys, T, cfg.train.seed, TRAIN_SALT), spec.ratio).to(device)
        with autocast(cfg, device):
            hidden = model.forward_from(model.embed(corrupt(ids, mask, mask_id)), start=spec.block)
            # The head only where the loss is: at r=0.15 that is 7x fewer head FLOPs.
            logits = model.head(hidden[mask])
        return masked_ce(logits, ids[mask])

    label = f"block {spec.block}/{model.num_blocks} r={spec.ratio:.3f}"
    record = run_loop(
        engine, loss_fn, steps=spec.steps, tokens_per_step=B * T, label=label, log=log,
        log_every=cfg.train.log_every, metrics_file=metrics_file,
    )
    del engine
    fold(block)
    block.requires_grad_(False)
    model.freeze_ends(True)
    model.eval()
    with autocast(cfg, device):
        ce = heldout_ce(
            lambda x: model(x, start=spec.block), corpus.heldout, spec.ratio, mask_token_id=mask_id,
            seed=cfg.train.seed, batch_size=B, batches=cfg.train.eval_batches, device=device,
        )
    return {"losses": record.losses, "tokens": record.tokens, "seconds": record.seconds}, ce


def grow_run(cfg: GrowConfig, run: Path, corpus: Corpus, *, log: Log, stop_after: int | None = None) -> None:
    """Grow every block not yet stored in ``run``, right to left, committing each stage."""
    device = resolve_device(cfg.train.device)
    model = build_model(cfg, corpus.tokenizer).to(device)
    stages = list_stages(run, verify=True)
    if stages:
        restore_suffix(model, stages)
        log(f"resuming: blocks {min(stages)}..{cfg.model.num_blocks} restored from {run}")
        model.to(device)
    for spec in stage_specs(cfg):
        if spec.block in stages:
            continue
        record, ce = train_stage(model, spec, corpus, cfg, device, log=log, metrics_file=run / "metrics.jsonl")
        weights = model.block_state_dict(spec.block)
        if spec.trains_ends:
            weights.update(model.ends_state_dict())
        manifest = {
            "ratio": spec.ratio,
            "steps": spec.steps,
            "tokens_seen": record["tokens"],
            "heldout_ce": ce,
            "final_train_loss": record["losses"][-1],
            "train_seconds": record["seconds"],
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
        write_stage(run, spec.block, weights, manifest, max_shard_size=cfg.store.max_shard_size,
                    tokenizer=corpus.tokenizer)
        log(f"stage {spec.block:02d} committed: held-out masked CE at r={spec.ratio:.3f} is {ce:.4f} "
            f"({record['seconds']:.1f} s)")
        if stop_after is not None and spec.block == stop_after:
            break

"""Objectives: how the batch of a training step becomes the scalar a stage minimises.

The stage runner hands the engine ``loss_fn(step, rows)``; this module builds it from the
stage's spec. A batch is a pure function of (seed, stage, step): the rows come from
``grow.data.batch_positions``, the per-token mask scores from the sample keys (so masks are
nested across levels and stages) and the per-row noise levels from ``noise.row_levels``.

What a corrupted position holds is the run's corruption (``grow.corruption``: [MASK],
Gaussian input noise, a random token, or Duo's argmax of a noisy one-hot read as soft tokens),
and so does the per-token loss (CE; duo: symmetric KL) and any per-row scale (duo). The loss
is the mean over rows of each row's loss; a row's loss depends on ``objective.weighting``
(``row_losses``):

    mean   the mean CE over the row's loss positions (its corrupted tokens, or every token
           for replacement noise). ceil(t T) tokens are corrupted. Drawn with t ~ U(0, 1) this
           is the MDLM/LLaDA bound with t integrated out (``grow.evaluate.mdlm_elbo``, count form).
    llada  every token is masked with probability t (score < t, still nested), t drawn i.i.d.
           per row from the stage's band cut to ``objective.llada_range``; the row's loss is
           sum of masked CE / (t T) -- LLaDA's 1/t weight.
    elbo   the same 1/t-weighted sum with MDLM's low-discrepancy t_i = (u + i) / B over the
           band: the continuous-time ELBO of the linear schedule.

Averaging per row first makes a micro-batch's loss independent of the other rows, so
gradient accumulation and data parallelism compute the same thing even when rows are
corrupted at different levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grow.config import GrowConfig
from grow.corruption import Rows, corruption_for, keys_rows, rows_of
from grow.curriculum import StageSpec, level_paths
from grow.data import batch_positions
from grow.model import GrowModel
from grow.noise import TRAIN_SALT, mask_scores, nested_mask, row_levels

# Smallest t a 1/t-weighted row may draw (MDLM clips t the same way).
T_EPS = 1e-3


@dataclass
class Batch:
    """Rows of one (micro-)batch: clean ids, nested-mask scores, and per row the noise level
    and the blocks (first, last) the row runs through."""

    ids: torch.Tensor
    scores: torch.Tensor
    levels: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    rows: Rows | None = None
    """Sample keys of the rows (keyed replacement tokens / input noise); None = row index."""
    progress: float = 0.0
    """Fraction of the stage done at this step (duo anneals its soft-token temperature on it)."""


def row_plan(spec: StageSpec, cfg: GrowConfig, step: int) -> tuple[torch.Tensor, ...]:
    """Per row of the global batch of ``step``: (level, first block, last block).

    Anchor rows (``spec.anchor_fraction`` of them, spread evenly over the batch) cycle through
    ``spec.anchors`` from step to step; each runs its level's path at its own r_j. The rest
    draw the stage's own noise and run the stage's blocks.
    """
    B = cfg.train.batch_size
    levels = draw_levels(spec, cfg, step)
    first = torch.full((B,), spec.first, dtype=torch.long)
    last = torch.full((B,), spec.last, dtype=torch.long)
    if spec.anchors and spec.anchor_fraction:
        ratios, paths = cfg.ratios(), level_paths(cfg)
        i = torch.arange(B)
        anchor = torch.floor((i + 1) * spec.anchor_fraction) > torch.floor(i * spec.anchor_fraction)
        for j, row in enumerate(anchor.nonzero().flatten().tolist()):
            level = spec.anchors[(step * int(anchor.sum()) + j) % len(spec.anchors)]
            levels[row] = ratios[level - 1]
            first[row], last[row] = paths[level]
    return levels, first, last


def draw_levels(spec: StageSpec, cfg: GrowConfig, step: int) -> torch.Tensor:
    """The stage's own noise level of every row of the global batch of ``step``.

    llada: i.i.d. uniform in the band cut to ``objective.llada_range`` (a pure function of
    (seed, stage, step)); otherwise low-discrepancy over the band (``noise.row_levels``).
    1/t-weighted rows never draw below ``T_EPS``.
    """
    B, o = cfg.train.batch_size, cfg.objective
    lo, hi = spec.noise.lo, spec.noise.hi
    if o.weighting == "llada" and not spec.noise.fixed:
        lo, hi = max(lo, o.llada_range[0]), min(hi, o.llada_range[1])
        lo, hi = (lo, hi) if lo < hi else (spec.noise.lo, spec.noise.hi)  # a band outside the range keeps its own
        u = np.random.default_rng([cfg.train.seed, spec.index, step, 11]).random(B)
        return torch.from_numpy(lo + (hi - lo) * u)
    levels = row_levels(lo, hi, B, cfg.train.seed, spec.index, step)
    return levels.clamp(min=T_EPS) if o.weighting != "mean" else levels


def stage_batch(train, spec: StageSpec, cfg: GrowConfig, step: int, rows: slice, device: torch.device) -> Batch:
    """Rows ``rows`` of the global batch of ``step`` in stage ``spec``."""
    B = cfg.train.batch_size
    sample_ids, epochs = batch_positions(len(train), step, B, cfg.train.seed, stream=spec.index)
    sample_ids, epochs = sample_ids[rows], epochs[rows]
    ids = train.rows(sample_ids).to(device)
    # The mask key ignores the stage, so a sample's masks are nested across stages.
    keys = epochs * len(train) + sample_ids
    scores = mask_scores(keys, ids.shape[1], cfg.train.seed, TRAIN_SALT)
    levels, first, last = (x[rows] for x in row_plan(spec, cfg, step))
    return Batch(ids, scores, levels, first, last, keys_rows(keys, cfg.train.seed, TRAIN_SALT), step / spec.steps)


def per_row_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` (one per masked position, in ``mask.nonzero()`` order) within each row."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def per_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (one per masked position, in ``mask.nonzero()`` order) within each row."""
    return per_row_sum(values, mask) / mask.sum(1).clamp(min=1).to(values.dtype)


def corrupted_positions(scores: torch.Tensor, levels: torch.Tensor, weighting: str) -> torch.Tensor:
    """The nested set corrupted in each row: ceil(t T) lowest scores (mean), or every score
    below t -- Bernoulli(t) per token, the masking the 1/t weight is unbiased for (llada, elbo)."""
    if weighting == "mean":
        return nested_mask(scores, levels)
    return scores < levels.to(scores.dtype).unsqueeze(-1)


def row_losses(ce_sum: torch.Tensor, count: torch.Tensor, levels: torch.Tensor, seq_len: int,
               weighting: str) -> torch.Tensor:
    """Each row's loss from the sum of its CE over its loss positions and their number."""
    if weighting == "mean":
        return ce_sum / count.clamp(min=1).to(ce_sum.dtype)
    return ce_sum / (levels.to(ce_sum.dtype) * seq_len)


class MaskedDiffusionLoss:
    """Masked CE of every row through its blocks, averaged per row, plus optional terms.

    Consistency (card 4.1, ``stability.consistency_weight``): with time as depth, grown right
    to left, the hidden state after block k is pulled (MSE) toward the embedding of the same
    sample corrupted at r_{k+1} -- what the frozen suffix saw as its input while it trained.
    It is added to the stage's own rows, per row, so it too is a mean over rows.
    """

    def __init__(self, spec: StageSpec, cfg: GrowConfig, mask_id: int) -> None:
        self.spec = spec
        self.mask_id = mask_id
        self.corruption = corruption_for(cfg)
        self.weighting = cfg.objective.weighting
        self.consistency = cfg.stability.consistency_weight if spec.consistency_level is not None else 0.0

    def __call__(self, model: GrowModel, batch: Batch) -> torch.Tensor:
        device = batch.ids.device
        B, T = batch.ids.shape
        rows = batch.rows or Rows(tuple(range(B)), 0, TRAIN_SALT)
        vocab = model.config.vocab_size
        corruption = self.corruption
        mask = corrupted_positions(batch.scores, batch.levels, self.weighting).to(device)
        x = corruption.corrupt(batch.ids, mask, rows, self.mask_id, vocab, levels=batch.levels)
        where = corruption.loss_positions(mask)
        soft = corruption.soft_inputs(model, batch.ids, rows, batch.levels, batch.progress)
        scale = corruption.row_scale(batch.levels, vocab)
        t = batch.levels.to(device) if model.time_embed is not None else None
        per_row = torch.zeros(len(x), dtype=torch.float32, device=device)
        for first, last in sorted({(int(a), int(b)) for a, b in zip(batch.first, batch.last)}):
            sel = ((batch.first == first) & (batch.last == last)).to(device)
            ts = t[sel] if t is not None else None
            with rows_of(rows.select(sel.cpu())):
                inputs = model.embed(x[sel]) if soft is None else soft[sel]
            after_first = model.forward_from(inputs, first, first, ts)
            hidden = model.forward_from(after_first, first + 1, last, ts)
            # The head only where the loss is: at r = 0.15 that is 7x fewer head FLOPs.
            losses = corruption.position_losses(model.head(hidden[where[sel]]), batch.ids[sel][where[sel]])
            ce_sum = per_row_sum(losses, where[sel])
            row_loss = row_losses(ce_sum, where[sel].sum(1), batch.levels[sel.cpu()].to(device), T, self.weighting)
            if scale is not None:
                row_loss = row_loss * scale[sel.cpu()].to(device)
            if self.consistency and first == self.spec.first and last == self.spec.last:
                lighter_level = self.spec.consistency_level
                lighter = nested_mask(batch.scores[sel.cpu()], lighter_level).to(device)
                sub = rows.select(sel.cpu())
                with rows_of(sub):
                    target = model.embed(corruption.corrupt(batch.ids[sel], lighter, sub, self.mask_id, vocab,
                                                            levels=torch.full((len(sub.keys),), lighter_level))).detach()
                row_loss = row_loss + self.consistency * (after_first.float() - target.float()).pow(2).mean((1, 2))
            per_row = per_row.index_put((sel.nonzero().flatten(),), row_loss.float())
        return per_row.mean()

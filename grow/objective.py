"""Objectives: how the batch of a training step becomes the scalar a stage minimises.

The stage runner hands the engine ``loss_fn(step, rows)``; this module builds it from the
stage's spec. A batch is a pure function of (seed, stage, step): the rows come from
``grow.data.batch_positions``, the per-token mask scores from the sample keys (so masks are
nested across levels and stages) and the per-row noise levels from ``noise.row_levels``.

The loss is the mean over rows of each row's mean masked cross-entropy (BERT/LLaDA: unmasked
tokens carry no loss). Averaging per row first makes a micro-batch's loss independent of the
other rows, so gradient accumulation and data parallelism compute the same thing even when
rows are masked at different levels. Drawn with t ~ U(0, 1), a row's mean masked CE is the
MDLM/LLaDA bound with t integrated out (``grow.evaluate.mdlm_elbo``, count form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grow.config import GrowConfig
from grow.curriculum import StageSpec, level_paths
from grow.data import batch_positions
from grow.model import GrowModel
from grow.noise import TRAIN_SALT, corrupt, mask_scores, nested_mask, row_levels


@dataclass
class Batch:
    """Rows of one (micro-)batch: clean ids, nested-mask scores, and per row the noise level
    and the blocks (first, last) the row runs through."""

    ids: torch.Tensor
    scores: torch.Tensor
    levels: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor


def row_plan(spec: StageSpec, cfg: GrowConfig, step: int) -> tuple[torch.Tensor, ...]:
    """Per row of the global batch of ``step``: (level, first block, last block).

    Anchor rows (``spec.anchor_fraction`` of them, spread evenly over the batch) cycle through
    ``spec.anchors`` from step to step; each runs its level's path at its own r_j. The rest
    draw the stage's own noise and run the stage's blocks.
    """
    B = cfg.train.batch_size
    levels = row_levels(spec.noise.lo, spec.noise.hi, B, cfg.train.seed, spec.index, step)
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
    return Batch(ids, scores, levels, first, last)


def per_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (one per masked position, in ``mask.nonzero()`` order) within each row."""
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    return sums / mask.sum(1).clamp(min=1).to(values.dtype)


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
        self.consistency = cfg.stability.consistency_weight if spec.consistency_level is not None else 0.0

    def __call__(self, model: GrowModel, batch: Batch) -> torch.Tensor:
        device = batch.ids.device
        mask = nested_mask(batch.scores, batch.levels).to(device)
        x = corrupt(batch.ids, mask, self.mask_id)
        t = batch.levels.to(device) if model.time_embed is not None else None
        per_row = torch.zeros(len(x), dtype=torch.float32, device=device)
        for first, last in sorted({(int(a), int(b)) for a, b in zip(batch.first, batch.last)}):
            sel = ((batch.first == first) & (batch.last == last)).to(device)
            ts = t[sel] if t is not None else None
            after_first = model.forward_from(model.embed(x[sel]), first, first, ts)
            hidden = model.forward_from(after_first, first + 1, last, ts)
            # The head only where the loss is: at r = 0.15 that is 7x fewer head FLOPs.
            ce = F.cross_entropy(model.head(hidden[mask[sel]]).float(), batch.ids[sel][mask[sel]], reduction="none")
            row_loss = per_row_mean(ce, mask[sel])
            if self.consistency and first == self.spec.first and last == self.spec.last:
                lighter = nested_mask(batch.scores[sel.cpu()], self.spec.consistency_level).to(device)
                target = model.embed(corrupt(batch.ids[sel], lighter, self.mask_id)).detach()
                row_loss = row_loss + self.consistency * (after_first.float() - target.float()).pow(2).mean((1, 2))
            per_row = per_row.index_put((sel.nonzero().flatten(),), row_loss)
        return per_row.mean()

"""The forward process: noise schedule r_1 > ... > r_L, nested masking, masked-token loss.

Masks are deterministic functions of (seed, sample key): every token of a sample gets one
uniform score, and masking at ratio r hides the ceil(r * T) lowest-scored tokens. So the
mask at r is a subset of the mask at every r' > r (nested) and a sample is reproducible at
every noise level -- the design card's "deterministic masks via (sample_id, r, seed)". The
nesting is what lets the consistency loss compare block k's output with the input the
suffix saw at r_{k+1}, and what makes every stage's held-out CE comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grow.config import ScheduleConfig, _check_ratios

# Salts keep the score streams of training and held-out samples apart.
TRAIN_SALT = 0
HELDOUT_SALT = 1


def make_schedule(cfg: ScheduleConfig, num_blocks: int) -> list[float]:
    """Mask ratios r_1..r_L for blocks 1..L: explicit, or linear/cosine from r_max down to r_min."""
    if cfg.ratios is not None:
        ratios = list(cfg.ratios)
    elif num_blocks == 1:
        ratios = [cfg.r_min]
    else:
        t = np.linspace(0.0, 1.0, num_blocks)
        if cfg.kind == "cosine":
            # Slow near both ends: more blocks spent near the heaviest and lightest noise.
            t = (1 - np.cos(np.pi * t)) / 2
        ratios = [round(float(cfg.r_max - (cfg.r_max - cfg.r_min) * x), 6) for x in t]
    _check_ratios(ratios, "schedule")
    return ratios


def mask_scores(keys: Sequence[int], seq_len: int, seed: int, salt: int = TRAIN_SALT) -> torch.Tensor:
    """One uniform score per token, a pure function of (seed, salt, key): shape (B, seq_len)."""
    rows = [np.random.default_rng([seed, salt, int(k)]).random(seq_len) for k in keys]
    # float64 so ties (which would break the exact mask count) are practically impossible.
    return torch.from_numpy(np.stack(rows))


def mask_counts(ratio: float | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Masked tokens per row at noise level ``ratio`` (a float or one level per row): ceil(r * T)."""
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    return torch.ceil(ratio * seq_len - 1e-9).long().clamp(0, seq_len)


def nested_mask(scores: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """Mask the ceil(ratio * T) lowest-scored tokens of each row.

    ``ratio`` is one level for the whole batch or one per row (shape (B,)): per-row levels are
    how a stage that samples t in a band or in U(0, 1) corrupts its batch, and a row's mask is
    still nested in the mask that row would get at any heavier level.
    """
    seq_len = scores.shape[-1]
    counts = mask_counts(ratio, seq_len).to(scores.device).expand(scores.shape[:-1])
    threshold = scores.sort(dim=-1).values.gather(-1, (counts - 1).clamp(min=0).unsqueeze(-1))
    return (scores <= threshold) & (counts > 0).unsqueeze(-1)


def row_levels(lo: float, hi: float, batch_size: int, seed: int, stream: int, step: int) -> torch.Tensor:
    """Noise levels t_i of the global batch of ``step``: low-discrepancy in [lo, hi] (MDLM).

    t_i = lo + (hi - lo) * ((u + i) / B mod 1) with one u per step, a pure function of
    (seed, stream, step), so a resumed stage and every micro-batch split see the same levels.
    Levels stay above 0, so every row masks at least one token.
    """
    if lo == hi:
        return torch.full((batch_size,), float(lo), dtype=torch.float64)
    u = np.random.default_rng([seed, stream, step, 7]).random()
    t = lo + (hi - lo) * ((u + np.arange(batch_size)) / batch_size % 1.0)
    return torch.from_numpy(np.maximum(t, 1e-6))


def corrupt(ids: torch.Tensor, mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Absorbing-state corruption: masked positions become [MASK]."""
    return ids.masked_fill(mask, mask_token_id)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over masked positions only (BERT/LLaDA: unmasked tokens carry no loss).

    With ``mask``, logits (B, T, V) and targets (B, T) are indexed by it; without, they are
    already the masked positions' rows (N, V) and (N,).
    """
    if mask is not None:
        logits, targets = logits[mask], targets[mask]
    return F.cross_entropy(logits.float(), targets)

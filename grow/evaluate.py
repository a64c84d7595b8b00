"""Honest quality numbers: held-out masked cross-entropy at a given noise level.

Held-out masks come from the held-out salt of the nested-mask stream, so every stage and
every export is measured on exactly the same masked tokens at a given ratio.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grow.noise import HELDOUT_SALT, corrupt, mask_scores, nested_mask

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def heldout_ce(
    logits_fn: LogitsFn,
    heldout: torch.Tensor,
    ratio: float,
    *,
    mask_token_id: int,
    seed: int,
    batch_size: int,
    batches: int,
    device: torch.device | str = "cpu",
) -> float:
    """Token-weighted mean CE over masked positions of the first ``batches`` held-out batches.

    ``logits_fn`` maps corrupted ids (B, T) to logits (B, T, V): a grown model's
    ``model(ids, start=k)`` or a Hugging Face model's ``lambda x: m(input_ids=x).logits``.
    """
    total, count = 0.0, 0
    n = heldout.shape[0]
    for b in range(batches):
        keys = [(b * batch_size + i) % n for i in range(batch_size)]
        ids = heldout[keys].to(device)
        mask = nested_mask(mask_scores(keys, ids.shape[1], seed, HELDOUT_SALT), ratio).to(device)
        logits = logits_fn(corrupt(ids, mask, mask_token_id)).float()
        total += torch.nn.functional.cross_entropy(logits[mask], ids[mask], reduction="sum").item()
        count += int(mask.sum())
        if (b + 1) * batch_size >= n:  # the whole held-out split has been seen once
            break
    return total / count

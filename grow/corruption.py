"""Corruptions: what the forward process does to the positions a nested mask selects.

Which positions are corrupted at level r is always ``noise.nested_mask`` (the ceil(r * T)
lowest-scored tokens of a sample), so every corruption is nested in the same way: the set
corrupted at r is a subset of the set corrupted at r' > r. What a corrupted position then
holds is a pure function of (seed, salt, sample key, position) -- never of r -- so a sample is
the same at every level wherever both levels corrupt it.

    mask      the position becomes [MASK] (absorbing state; LLaDA, MDLM). Loss on the
              corrupted positions only.
    gaussian  the position's input embedding is Gaussian noise (std ``objective.gaussian_std``
              times the RMS of the embedding table) instead of the [MASK] embedding (design
              card section 3). Loss on the corrupted positions only. The network needs the
              noise at its input, so only grow itself can run such a model (no export).
    uniform   the position holds a uniformly random token (tiny-diffusion's token
              replacement; uniform-state diffusion). The network cannot tell which tokens
              are wrong, so the loss is on every token.

A corruption turns clean ids into the ids the network reads (``corrupt``), says where the
loss is (``loss_positions``) and, for gaussian, installs the input hook on the model that
puts the noise at [MASK] positions (``install``): the samplers and the evaluation keep
passing ids with [MASK] where nothing is known, and the hook makes those the noise the
model was trained on.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Tags keep the streams of one sample apart: mask scores use (seed, salt, key) itself.
_TOKENS_TAG = 1
_GAUSS_TAG = 2
# Rows that have no sample key (a sampler's rows) use this salt with the row index as key.
SAMPLE_SALT = 2


@dataclass(frozen=True)
class Rows:
    """Where a batch's rows come from: their sample keys and the (seed, salt) of their split."""

    keys: tuple[int, ...]
    seed: int
    salt: int

    def select(self, sel: torch.Tensor) -> "Rows":
        idx = sel.nonzero().flatten().tolist() if sel.dtype == torch.bool else sel.tolist()
        return Rows(tuple(self.keys[i] for i in idx), self.seed, self.salt)


def _rng(rows: Rows, key: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([rows.seed, rows.salt, int(key), tag])


def replacement_tokens(rows: Rows, seq_len: int, vocab_size: int, mask_id: int) -> torch.Tensor:
    """One uniformly random token per (row, position), never [MASK]: shape (B, seq_len)."""
    out = np.stack([_rng(rows, k, _TOKENS_TAG).integers(0, vocab_size - 1, seq_len) for k in rows.keys])
    out = out + (out >= mask_id)  # skip the mask id: uniform over the other V - 1 tokens
    return torch.from_numpy(out).long()


def gaussian_noise(rows: Rows, seq_len: int, width: int) -> torch.Tensor:
    """One standard normal vector per (row, position): shape (B, seq_len, width), float32."""
    out = np.stack([_rng(rows, k, _GAUSS_TAG).standard_normal((seq_len, width), dtype=np.float32)
                    for k in rows.keys])
    return torch.from_numpy(out)


# The rows whose keys the Gaussian input hook draws its noise from; unset = a sampler's rows.
_ROWS: contextvars.ContextVar[Rows | None] = contextvars.ContextVar("grow_corruption_rows", default=None)


@contextlib.contextmanager
def rows_of(rows: Rows):
    """Within this block, inputs of the model are the rows ``rows`` (for keyed noise)."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


class Corruption:
    """The absorbing [MASK] state: the corruption grow has always had."""

    name = "mask"
    loss_on_all = False
    """The loss (and the held-out CE) covers every token, not only the corrupted ones."""
    replaces_tokens = False
    """Corrupted positions hold real tokens: samplers refine every position instead of unmasking."""

    def corrupt(self, ids: torch.Tensor, mask: torch.Tensor, rows: Rows, mask_id: int, vocab_size: int) -> torch.Tensor:
        return ids.masked_fill(mask, mask_id)

    def loss_positions(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(mask) if self.loss_on_all else mask

    def install(self, model) -> None:
        """Attach whatever the model needs at its input (nothing for token corruptions)."""
        model.input_hook = None


class Uniform(Corruption):
    name = "uniform"
    loss_on_all = True
    replaces_tokens = True

    def corrupt(self, ids, mask, rows, mask_id, vocab_size):
        noise = replacement_tokens(rows, ids.shape[1], vocab_size, mask_id).to(ids.device)
        return torch.where(mask, noise, ids)


class GaussianInputs:
    """Input hook: [MASK] positions get Gaussian noise instead of the [MASK] embedding.

    The noise of a row is keyed by its sample (``rows_of``) in training and evaluation, so
    it is the same at every level; a sampler's rows use their index. Its scale follows the
    embedding table's RMS (detached), so the noise stays comparable to a token's embedding
    as the embedding trains.
    """

    def __init__(self, mask_id: int, std: float) -> None:
        self.mask_id, self.std = mask_id, std

    def __call__(self, ids: torch.Tensor, hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        where = ids == self.mask_id
        if not where.any():
            return hidden
        if ids.dim() != 2:
            raise ValueError(f"expected (batch, tokens) ids, got shape {tuple(ids.shape)}")
        rows = _ROWS.get() or Rows(tuple(range(ids.shape[0])), 0, SAMPLE_SALT)
        if len(rows.keys) != ids.shape[0]:
            raise ValueError(f"{len(rows.keys)} row keys for a batch of {ids.shape[0]} rows")
        scale = self.std * table.detach().float().pow(2).mean().sqrt()
        noise = gaussian_noise(rows, ids.shape[1], hidden.shape[-1]).to(hidden.device) * scale
        return torch.where(where.unsqueeze(-1), noise.to(hidden.dtype), hidden)


class Gaussian(Corruption):
    name = "gaussian"

    def __init__(self, std: float = 1.0) -> None:
        self.std = std

    def install(self, model) -> None:
        model.input_hook = GaussianInputs(model.config.mask_token_id, self.std)


CORRUPTIONS = ("mask", "gaussian", "uniform")


def corruption_for(cfg) -> Corruption:
    """The corruption of a run's config (``objective.corruption``)."""
    return corruption_named(cfg.objective.corruption, cfg.objective.gaussian_std)


def corruption_named(name: str, gaussian_std: float = 1.0) -> Corruption:
    if name == "gaussian":
        return Gaussian(gaussian_std)
    return Uniform() if name == "uniform" else Corruption()


def keys_rows(keys: Sequence[int] | torch.Tensor, seed: int, salt: int) -> Rows:
    return Rows(tuple(int(k) for k in keys), seed, salt)

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
    duo       Duo (diffusion duality): Gaussian noise on the one-hot token, then argmax. The
              flipped set is the Gaussian's own (not the nested mask), nested in the noise
              weight because each (sample, position) keeps one Gaussian vector. In training the
              network reads soft tokens (a tempered softmax of the noisy one-hot, annealed
              toward argmax over the stage); the loss is a symmetric KL on every token, each row
              scaled by its noise amount. Evaluation and sampling use the hard (argmax) tokens.

A corruption turns clean ids into the ids the network reads (``corrupt``), says where the
loss is (``loss_positions``) and, for gaussian, installs the input hook on the model that
puts the noise at [MASK] positions (``install``): the samplers and the evaluation keep
passing ids with [MASK] where nothing is known, and the hook makes those the noise the
model was trained on.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
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

    def corrupt(self, ids: torch.Tensor, mask: torch.Tensor, rows: Rows, mask_id: int, vocab_size: int,
                levels: torch.Tensor | None = None) -> torch.Tensor:
        """The ids the network reads: ``mask`` selects the positions (``levels``, one per row,
        only for a corruption that picks its own positions: duo)."""
        return ids.masked_fill(mask, mask_id)

    def soft_inputs(self, model, ids, rows, levels, progress: float) -> torch.Tensor | None:
        """Input embeddings other than the embedded corrupted ids (duo's soft tokens), or None."""
        return None

    def position_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss per loss position: cross-entropy."""
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")

    def row_scale(self, levels: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """A factor per row on its loss (duo), or None."""
        return None

    def loss_positions(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(mask) if self.loss_on_all else mask

    def install(self, model) -> None:
        """Attach whatever the model needs at its input (nothing for token corruptions)."""
        model.input_hook = None


class Uniform(Corruption):
    name = "uniform"
    loss_on_all = True
    replaces_tokens = True

    def corrupt(self, ids, mask, rows, mask_id, vocab_size, levels=None):
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


@functools.lru_cache(maxsize=8)
def _flip_table(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(w grid, fraction of tokens argmax((1 - w) onehot + w g) flips) for V = vocab_size.

    A token x flips when max_{j != x} g_j - g_x > (1 - w) / w = c, so with g ~ N(0, I)
    P(flip) = int phi(z) (1 - Phi(c + z)^(V - 1)) dz, increasing in w up to (V - 1) / V at w = 1.
    """
    w = np.concatenate([np.linspace(1e-3, 0.05, 50), np.linspace(0.05, 1.0, 951)[1:]])
    z = np.linspace(-9.0, 9.0, 3601)
    phi = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    c = (1 - w) / w
    cdf = torch.special.ndtr(torch.from_numpy(c[:, None] + z[None, :])).double().numpy()
    flip = (phi * (1 - cdf ** (vocab_size - 1))).sum(1) * (z[1] - z[0])
    return w, np.maximum.accumulate(flip)


def duo_weight(levels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The noise weight w whose expected flipped fraction is ``level`` * (V - 1) / V.

    Maps the curriculum's levels (fractions of corrupted tokens, as for every other corruption)
    onto Duo's Gaussian noise weight, so r_k and the bands mean the same thing for duo.
    """
    w, flip = _flip_table(int(vocab_size))
    target = levels.double().cpu().numpy() * (vocab_size - 1) / vocab_size
    return torch.from_numpy(np.interp(target, flip, w)).to(levels.device)


class Duo(Corruption):
    name = "duo"
    loss_on_all = True
    replaces_tokens = True

    def __init__(self, temperature: Sequence[float] = (0.1, 1e-4), smoothing: float = 1e-3) -> None:
        self.t_start, self.t_end = float(temperature[0]), float(temperature[1])
        self.smoothing = smoothing
        self._last = None

    def noisy(self, ids: torch.Tensor, rows: Rows, levels: torch.Tensor, vocab_size: int,
              mask_id: int) -> torch.Tensor:
        """(1 - w) onehot(x) + w g, one keyed Gaussian vector g per (sample, position): (B, T, V),
        with -inf for [MASK] (a replacement model never reads it). A training step asks twice (hard
        tokens, soft tokens) for the same rows, so the last result is kept (read-only)."""
        key = (rows, tuple(levels.tolist()), hash(ids.cpu().numpy().tobytes()), tuple(ids.shape), vocab_size,
               mask_id)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        g = gaussian_noise(rows, ids.shape[1], vocab_size).to(ids.device)
        w = duo_weight(levels, vocab_size).to(ids.device, torch.float32).view(-1, 1, 1)
        hot = torch.nn.functional.one_hot(ids, vocab_size).float()
        noisy = (1 - w) * hot + w * g
        noisy[..., mask_id] = -torch.inf
        self._last = (key, noisy)
        return noisy

    def corrupt(self, ids, mask, rows, mask_id, vocab_size, levels=None):
        if levels is None:
            raise ValueError("duo corrupts by noise level; pass levels")
        return self.noisy(ids, rows, levels, vocab_size, mask_id).argmax(-1)

    def temperature(self, progress: float) -> float:
        """Geometric from the first to the second value of objective.duo_temperature over a stage."""
        return self.t_start * (self.t_end / self.t_start) ** min(1.0, max(0.0, progress))

    def soft_inputs(self, model, ids, rows, levels, progress):
        noisy = self.noisy(ids, rows, levels, model.config.vocab_size, model.config.mask_token_id)
        soft = torch.softmax(noisy / self.temperature(progress), dim=-1)
        table = model.embed_tokens.weight
        return (soft.to(table.dtype) @ table).to(model.norm.weight.dtype)

    def position_losses(self, logits, targets):
        """Symmetric KL between the prediction p and the (smoothed) one-hot target q.

        KL(q || p) is the cross-entropy up to q's entropy; KL(p || q) also charges the mass p
        puts on wrong tokens. q = (1 - eps) onehot + eps / V keeps KL(p || q) finite.
        """
        V = logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        eps = self.smoothing
        logq = torch.full_like(logp, math.log(eps / V))
        logq.scatter_(-1, targets.unsqueeze(-1), math.log(1 - eps + eps / V))
        p, q = logp.exp(), logq.exp()
        return ((q * (logq - logp)).sum(-1) + (p * (logp - logq)).sum(-1))

    def row_scale(self, levels, vocab_size):
        """1 at no noise, falling to 0 at pure noise: V (1 - w) / (V (1 - w) + w).

        The seed's ``w / (V (1 - w) + w)`` grows with w, contradicting its own comment ("as
        noise -> 0, view_scale -> 1") and its purpose (heavy-noise rows must not dominate), so
        grow uses one minus it, which matches both.
        """
        w = duo_weight(levels, vocab_size).float()
        return vocab_size * (1 - w) / (vocab_size * (1 - w) + w)


CORRUPTIONS = ("mask", "gaussian", "uniform", "duo")


def corruption_for(cfg) -> Corruption:
    """The corruption of a run's config (``objective.corruption``)."""
    o = cfg.objective
    return corruption_named(o.corruption, o.gaussian_std, o.duo_temperature, o.duo_smoothing)


def corruption_named(name: str, gaussian_std: float = 1.0, duo_temperature=(0.1, 1e-4),
                     duo_smoothing: float = 1e-3) -> Corruption:
    if name == "gaussian":
        return Gaussian(gaussian_std)
    if name == "duo":
        return Duo(duo_temperature, duo_smoothing)
    return Uniform() if name == "uniform" else Corruption()


def keys_rows(keys: Sequence[int] | torch.Tensor, seed: int, salt: int) -> Rows:
    return Rows(tuple(int(k) for k in keys), seed, salt)

"""Samplers: pure functions from a denoiser and a prompt to tokens (design card section 5).

Every sampler takes a model with the ``GrowModel`` API (``embed``, ``forward_from``, ``head``,
``forward``, ``first_block``, ``num_blocks``, ``config``), a ``(B, P)`` prompt (P may be 0,
all rows the same length), the number of tokens to generate, the mask id and a
``torch.Generator``; it returns a ``SampleResult``. A grown run and an exported Hugging Face
model go through the same functions: ``grow.inference.load_denoiser`` wraps both as a
``GrowModel`` over the very same modules.

    depth      the card's time-as-depth unroll (5.1): ONE forward pass, block k reads the head
               and unmasks down to r_{k+1}; L block evaluations in total.
    suffix     the card's "suffix execution at first": step k reruns blocks k..L on the
               current tokens, exactly the sub-network stage k was trained as.
    iterative  time-as-input (5.2) with the full stack: S steps, t 1 -> 0, LLaDA confidence
               decoding, MDLM logits caching, optional low-confidence remasking.
    semi_ar    long outputs block by block, left to right; each block is decoded by the
               iterative routine given the prompt plus a bounded window of what came before,
               with the committed prefix's keys/values cached (Fast-dLLM).
    refine     replacement noise (objective.corruption: uniform): start from random tokens
               and re-predict every position every step, re-noising the least confident
               ones down the schedule -- decoded tokens can still change (self-correction).

Masked positions are never predicted as [MASK]: its logit is removed before choosing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grow.errors import UserError

MODES = ("depth", "suffix", "iterative", "semi-ar", "refine")
REPLACEMENT_MODES = ("refine",)


def modes_for(corruption, depth_tied: bool) -> list[str]:
    """The samplers that apply to a model: refine for replacement noise, the unmasking ones
    otherwise (depth and suffix only for a depth-tied model)."""
    if corruption.replaces_tokens:
        return list(REPLACEMENT_MODES)
    return [m for m in MODES if m not in REPLACEMENT_MODES and (depth_tied or m not in ("depth", "suffix"))]


def check_mode(mode: str, corruption, depth_tied: bool, what: str) -> None:
    """Refuse a sampler that does not fit the model's corruption or levels, in one line."""
    if mode in modes_for(corruption, depth_tied):
        return
    if corruption.replaces_tokens:
        raise UserError(f"--mode: {what} was trained with {corruption.name} (token replacement) noise and never "
                        f"saw [MASK]; use --mode refine")
    if mode in REPLACEMENT_MODES:
        raise UserError(f"--mode: refine starts from random tokens, which {what} ({corruption.name} corruption) "
                        "never saw; use --mode iterative")
    raise UserError(f"--mode: {mode} steps through noise levels tied to blocks, and {what} has none "
                    "(it was trained as a whole stack on t ~ U(0, 1)); use --mode iterative or semi-ar")

HiddenFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """What a sampler produced.

    ``tokens`` is the whole sequence, prompt included: ``tokens[:, prompt_length:]`` is the
    generated part. ``trace`` has one dict per step: ``step``, ``block`` (depth/suffix) or
    ``t`` (iterative/semi-ar: the noise level after the step), ``positions`` / ``tokens``
    (per row: what was unmasked, positions in ``tokens``' coordinates), ``remasked`` (per row),
    ``confidence`` (mean confidence of the unmasked tokens) -- enough to replay the
    generation. ``forwards`` counts network runs that produced logits (depth: 1, the single
    unroll; suffix: one per suffix run; iterative/semi-ar: full-stack forwards, cache hits
    excluded); ``block_evals`` counts block applications, the unit of compute.
    """

    tokens: torch.Tensor
    trace: list[dict[str, Any]]
    forwards: int
    block_evals: int
    prompt_length: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length :]


# --------------------------------------------------------------------------- shared pieces


def prompt_batch(ids: Sequence[int], num_samples: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """A ``(num_samples, len(ids))`` prompt: the same prompt for every sample."""
    if num_samples < 1:
        raise UserError(f"--num-samples: expected a positive integer, got {num_samples}")
    return torch.tensor([list(ids)] * num_samples, dtype=torch.long, device=device).reshape(num_samples, len(ids))


def _check(model, prompt: torch.Tensor, length: int, *, temperature: float = 0.0, top_p: float = 1.0) -> None:
    if prompt.dim() != 2:
        raise UserError(f"--prompt: expected a (batch, tokens) tensor of prompt ids, got shape {tuple(prompt.shape)}")
    if length <= 0:
        raise UserError(f"--length: expected a positive number of tokens to generate, got {length}")
    context = model.config.max_position_embeddings
    if prompt.shape[1] + length > context:
        raise UserError(
            f"--prompt/--length: {prompt.shape[1]} prompt tokens + {length} generated exceed the model's "
            f"context of {context} positions (max_position_embeddings)"
        )
    if temperature < 0:
        raise UserError(f"--temperature: expected >= 0 (0 = argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: expected a probability in (0, 1], got {top_p}")


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise UserError(f"--steps: expected a positive number of denoising steps, got {steps}")


def _masked_input(prompt: torch.Tensor, length: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt followed by ``length`` masks, and the bool map of the positions to generate."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, length), mask_id, dtype=torch.long, device=prompt.device)], dim=1)
    editable = torch.zeros_like(x, dtype=torch.bool)
    editable[:, P:] = True
    return x, editable


def choose(
    logits: torch.Tensor, mask_id: int, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A candidate token and its confidence for every row of ``logits`` (..., V).

    Temperature 0 is argmax, with confidence = the softmax probability of the argmax
    (LLaDA's ``low_confidence`` score). Otherwise the token is drawn from the tempered,
    top-p-filtered distribution and its confidence is its probability there. The draw is by
    inverse CDF, one uniform per position: ``torch.multinomial`` (and a Gumbel/exponential
    race, V randoms per position) took 40-60% of an iterative step at V = 4096 on CPU.
    """
    logits = logits.float().clone()
    logits[..., mask_id] = -math.inf
    if temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    # inverse CDF: one uniform per row; right=True never lands on a zero-probability token
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device, dtype=cdf.dtype)
    tokens = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def choose_at(
    logits: torch.Tensor, where: torch.Tensor, mask_id: int, temperature: float, top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``choose`` for logits rows of the positions ``where`` (B, T) is set, scattered back to
    ``(B, T)`` (mask id / confidence 0 elsewhere). Only masked positions ever need a
    candidate, so the head and the draw run on those rows alone."""
    tokens = torch.full(where.shape, mask_id, dtype=torch.long, device=where.device)
    conf = torch.zeros(where.shape, dtype=torch.float32, device=where.device)
    if where.any():
        tokens[where], conf[where] = choose(logits, mask_id, temperature, top_p, generator)
    return tokens, conf


def top_per_row(score: torch.Tensor, allowed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool map of the ``counts[b]`` highest-``score`` allowed positions of each row ``b``."""
    score = score.masked_fill(~allowed, -math.inf)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return (rank < counts.unsqueeze(1)) & allowed


def _rows(mask: torch.Tensor, values: torch.Tensor | None = None, offset: int = 0) -> list[list]:
    """Per row: the positions (``values`` is None) or values where ``mask`` is set."""
    if values is None:
        return [(row.nonzero().flatten() + offset).tolist() for row in mask]
    return [v[m].tolist() for v, m in zip(values, mask)]


def _mean_conf(conf: torch.Tensor, select: torch.Tensor) -> float | None:
    return float(conf[select].mean()) if select.any() else None


def _count(ratio: float, n: torch.Tensor) -> torch.Tensor:
    """Masks left at noise level ``ratio`` of an ``n``-token span: ceil, as in ``nested_mask``."""
    return torch.ceil(ratio * n.double() - 1e-9).long().clamp(min=0)


# --------------------------------------------------------------------------- depth = time


def level_of(model, x: torch.Tensor, mask_id: int) -> torch.Tensor | None:
    """The noise level a time-conditioned model is given: each row's masked fraction (the
    quantity its training levels measured); None for a time-free model."""
    return (x == mask_id).float().mean(1) if model.time_embed is not None else None


def _depth_start(model, prompt, length, mask_id, ratios, paths, temperature, top_p):
    """Checks shared by the time-as-depth samplers; (x, masked, generated span per row)."""
    _check(model, prompt, length, temperature=temperature, top_p=top_p)
    L = model.num_blocks
    if len(ratios) != L:
        raise UserError(f"ratios: expected one noise level per block ({L}), got {len(ratios)}")
    x, masked = _masked_input(prompt, length, mask_id)
    return x, masked, masked.sum(1)


def right_to_left_paths(num_blocks: int) -> dict[int, tuple[int, int]]:
    """The design card's level paths: level k is served by blocks k..L."""
    return {k: (k, num_blocks) for k in range(1, num_blocks + 1)}


def _unmask_to_level(model, hidden, x, masked, span, k, ratios, trace, *, mask_id, temperature, top_p, generator):
    """After block k: unmask the most confident positions so r_{k+1} of the span stays masked
    (none after block L), record the step in ``trace``; returns (x, masked, selected, candidates)."""
    L = model.num_blocks
    target = _count(ratios[k], span) if k < L else torch.zeros_like(span)
    counts = (masked.sum(1) - target).clamp(min=0)
    cand, conf = choose_at(model.head(hidden[masked]), masked, mask_id, temperature, top_p, generator)
    select = top_per_row(conf, masked, counts)
    x = torch.where(select, cand, x)
    masked = masked & ~select
    trace.append({
        "step": len(trace) + 1, "block": k, "positions": _rows(select), "tokens": _rows(select, cand),
        "remasked": [[] for _ in range(x.shape[0])], "confidence": _mean_conf(conf, select),
        "masked_left": int(masked.sum()),
    })
    return x, masked, select, cand


@torch.no_grad()
def depth(
    model,
    prompt: torch.Tensor,
    length: int,
    *,
    mask_id: int,
    ratios: Sequence[float],
    paths: dict[int, tuple[int, int]] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Time-as-depth: one forward pass in which block k is reverse-diffusion step k.

    Args:
        model: a ``GrowModel`` (blocks ``first_block..last_block`` are run).
        prompt: ``(B, P)`` prompt ids; P may be 0.
        length: tokens to generate after the prompt.
        mask_id: the tokenizer's mask token id.
        ratios: the schedule r_1..r_L (one per block id).
        paths: unused: the single unroll runs every block in order whichever way a depth-tied
            model grew (accepted so every depth-tied sampler takes the same arguments).
        temperature: 0 = argmax; otherwise sample from softmax(logits / temperature).
        top_p: nucleus filter applied when sampling.
        generator: the random stream (only used when temperature > 0).

    After block k the head is read and the most confident masked positions are unmasked,
    leaving r_{k+1} of the generated span masked (none after block L). The new tokens are
    written back into the residual stream: the hidden state at an unmasked position gets
    ``embed(token) - embed(mask)`` added (the input noise instead of embed(mask) for a
    gaussian model), which is exactly what re-embedding the updated sequence changes at the
    layer input, while everything the blocks so far computed stays.
    Block k+1 then continues from that stream.
    """
    x, masked, span = _depth_start(model, prompt, length, mask_id, ratios, paths, temperature, top_p)
    hidden = model.embed(x)
    trace, evals = [], 0
    for k in range(model.first_block, model.last_block + 1):
        if not masked.any():
            break
        hidden = model.forward_from(hidden, k, k, level_of(model, x, mask_id))
        evals += 1
        before = model.embed(x)  # [MASK] embeddings, or the input noise a gaussian model was given
        x, masked, select, cand = _unmask_to_level(model, hidden, x, masked, span, k, ratios, trace, mask_id=mask_id,
                                                   temperature=temperature, top_p=top_p, generator=generator)
        hidden = hidden + select.unsqueeze(-1).to(hidden.dtype) * (model.embed(x) - before)
    return SampleResult(x, trace, forwards=1, block_evals=evals, prompt_length=prompt.shape[1])


@torch.no_grad()
def suffix(
    model,
    prompt: torch.Tensor,
    length: int,
    *,
    mask_id: int,
    ratios: Sequence[float],
    paths: dict[int, tuple[int, int]] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Time-as-depth with path execution: step k runs the blocks that serve level k.

    Args:
        model: a ``GrowModel``.
        prompt: ``(B, P)`` prompt ids; P may be 0.
        length: tokens to generate after the prompt.
        mask_id: the tokenizer's mask token id.
        ratios: the schedule r_1..r_L.
        paths: level k -> (first, last) blocks (``Loaded.paths``): k..L when grown right to
            left (the card's "suffix execution", the default), 1..k when grown left to right.
        temperature, top_p, generator: as in ``depth``.

    Step k sees the generated span masked at r_k -- what the stage of level k trained its
    blocks on -- embeds it afresh, runs the path, and unmasks down to r_{k+1}. Costs the sum
    of the path lengths (L(L+1)/2 block evaluations for a complete run) instead of depth's L.
    Levels whose path the model does not have yet are skipped.
    """
    x, masked, span = _depth_start(model, prompt, length, mask_id, ratios, paths, temperature, top_p)
    paths = paths or right_to_left_paths(model.num_blocks)
    trace, forwards, evals = [], 0, 0
    have = range(model.first_block, model.last_block + 1)
    for k in range(1, model.num_blocks + 1):
        first, last = paths[k]
        if not masked.any():
            break
        if first not in have or last not in have:
            continue
        hidden = model.forward_from(model.embed(x), first, last, level_of(model, x, mask_id))
        forwards += 1
        evals += last - first + 1
        x, masked, _, _ = _unmask_to_level(model, hidden, x, masked, span, k, ratios, trace, mask_id=mask_id,
                                           temperature=temperature, top_p=top_p, generator=generator)
    return SampleResult(x, trace, forwards=forwards, block_evals=evals, prompt_length=prompt.shape[1])


# --------------------------------------------------------------------------- iterative


def denoise(
    hidden_fn: HiddenFn,
    head: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    editable: torch.Tensor,
    *,
    mask_id: int,
    steps: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    threshold: float | None = None,
    remask: float = 0.0,
    generator: torch.Generator | None = None,
    cache: bool = True,
    offset: int = 0,
) -> tuple[torch.Tensor, list[dict[str, Any]], int]:
    """The iterative routine shared by ``iterative`` and ``semi_ar``: returns (x, trace, forwards).

    ``hidden_fn`` maps ids (B, T) to the last block's hidden states; ``head`` maps hidden
    rows to logits and is applied to the masked positions only. ``editable`` marks the
    positions being generated (all masked on entry); nothing else is ever changed or
    remasked. ``offset`` is added to trace positions (semi-ar reports positions in the final
    output). Step s of S moves the noise level from t = 1 - (s-1)/S to 1 - s/S: it leaves
    ceil(t N) of the N generated positions masked.
    """
    x = x.clone()
    masked = editable & (x == mask_id)
    span = masked.sum(1)
    committed = torch.zeros_like(masked)
    committed_conf = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    trace: list[dict[str, Any]] = []
    forwards = 0
    seen_x, seen_logits = None, None
    for s in range(1, steps + 1):
        if not masked.any():
            break
        # MDLM's caching: the denoiser is not conditioned on t, so an unchanged sequence
        # gives unchanged logits and the forward can be skipped.
        # The masked set is a function of x, so cached rows line up with the current ones.
        hit = cache and seen_x is not None and torch.equal(x, seen_x)
        if not hit:
            seen_x, seen_logits = x.clone(), head(hidden_fn(x)[masked])
            forwards += 1
        cand, conf = choose_at(seen_logits, masked, mask_id, temperature, top_p, generator)

        remasked = torch.zeros_like(masked)
        # LLaDA-style self-correction: re-mask the least confident committed tokens (by the
        # confidence they were committed with), a fraction that decays linearly to 0 at step S.
        fraction = remask * (steps - s) / max(1, steps - 1)
        if fraction > 0 and committed.any():
            n_remask = torch.floor(fraction * committed.sum(1).double()).long()
            remasked = top_per_row(-committed_conf, committed, n_remask)

        t = 1.0 - s / steps
        target = _count(t, span) if s < steps else torch.zeros_like(span)
        counts = (masked.sum(1) + remasked.sum(1) - target).clamp(min=0)
        if threshold is not None:
            counts = torch.maximum(counts, ((conf >= threshold) & masked).sum(1))
        counts = torch.minimum(counts, masked.sum(1))  # re-masked tokens wait for the next step
        select = top_per_row(conf, masked, counts)

        x = torch.where(select, cand, x).masked_fill(remasked, mask_id)
        committed_conf = torch.where(select, conf, committed_conf)
        committed = (committed | select) & ~remasked
        masked = (masked & ~select) | remasked
        trace.append({
            "step": s, "t": t, "positions": _rows(select, offset=offset), "tokens": _rows(select, cand),
            "remasked": _rows(remasked, offset=offset), "confidence": _mean_conf(conf, select),
            "masked_left": int(masked.sum()), "cached": bool(hit),
        })
    return x, trace, forwards


@torch.no_grad()
def iterative(
    model,
    prompt: torch.Tensor,
    length: int,
    *,
    mask_id: int,
    steps: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    threshold: float | None = None,
    remask: float = 0.0,
    generator: torch.Generator | None = None,
    cache: bool = True,
) -> SampleResult:
    """Full-stack iterative unmasking (LLaDA ``generate`` with one block).

    Args:
        model: a ``GrowModel`` (full stack: blocks ``first_block..L``).
        prompt: ``(B, P)`` prompt ids; P may be 0.
        length: tokens to generate after the prompt.
        mask_id: the tokenizer's mask token id.
        steps: S denoising steps, t = 1 -> 0 linearly; step s leaves ceil((1 - s/S) * length)
            positions masked, so steps > length makes some steps unmask nothing.
        temperature: 0 = argmax; otherwise sample from softmax(logits / temperature).
        top_p: nucleus filter applied when sampling.
        threshold: also unmask every masked position whose confidence >= threshold (parallel
            decoding; the schedule's count is the minimum, so it can only finish sooner).
        remask: fraction of the committed (never the prompt's) tokens with the lowest
            confidence re-masked at each step, decaying linearly to 0 at the last step.
        generator: the random stream for sampling.
        cache: reuse the previous logits when the sequence did not change (MDLM); the
            samples are identical either way, only ``forwards`` differs.
    """
    _check(model, prompt, length, temperature=temperature, top_p=top_p)
    _check_steps(steps)
    _check_options(threshold, remask)
    x, editable = _masked_input(prompt, length, mask_id)
    x, trace, forwards = denoise(
        _full_stack(model, mask_id), model.head, x, editable, mask_id=mask_id, steps=steps, temperature=temperature, top_p=top_p,
        threshold=threshold, remask=remask, generator=generator, cache=cache,
    )
    blocks = model.last_block - model.first_block + 1
    return SampleResult(x, trace, forwards=forwards, block_evals=forwards * blocks, prompt_length=prompt.shape[1])


def _full_stack(model, mask_id: int) -> HiddenFn:
    return lambda ids: model.forward_from(model.embed(ids), t=level_of(model, ids, mask_id))


def _check_options(threshold: float | None, remask: float) -> None:
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"--threshold: expected a confidence in (0, 1], got {threshold}")
    if not 0 <= remask < 1:
        raise UserError(f"--remask: expected a fraction in [0, 1), got {remask}")


# --------------------------------------------------------------------------- replacement noise


def random_tokens(shape, vocab_size: int, mask_id: int, generator: torch.Generator | None,
                  device: torch.device | str) -> torch.Tensor:
    """Uniformly random tokens, never [MASK] (what ``grow.corruption.Uniform`` puts in)."""
    out = torch.randint(0, vocab_size - 1, shape, generator=generator, device=device)
    return out + (out >= mask_id).long()


@torch.no_grad()
def refine(
    model,
    prompt: torch.Tensor,
    length: int,
    *,
    mask_id: int,
    steps: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Sampling for replacement noise: every generated position is re-predicted every step.

    Args:
        model: a ``GrowModel`` trained with ``objective.corruption: uniform`` (full stack).
        prompt: ``(B, P)`` prompt ids; P may be 0.
        length: tokens to generate after the prompt.
        mask_id: the tokenizer's mask token id (never produced).
        steps: S steps, the noise level going t = 1 -> 0 linearly.
        temperature, top_p: as in ``iterative``; generator: the random stream (start tokens too).

    The generated span starts as uniformly random tokens (level t = 1). Step s predicts a
    token for every generated position from the current sequence, then puts the sequence at
    the next level t = 1 - s/S the way training corrupted it: the ceil(t N) least confident
    positions get fresh random tokens, every other position takes its prediction -- also a
    position decoded at an earlier step, which is how a wrong token gets corrected. The
    last step keeps every prediction. ``trace`` records per step the positions whose token
    changed (``positions``/``tokens``) and which of them were re-noised (``renoised``).
    """
    _check(model, prompt, length, temperature=temperature, top_p=top_p)
    _check_steps(steps)
    B, P = prompt.shape
    V = model.config.vocab_size
    start = random_tokens((B, length), V, mask_id, generator, prompt.device)
    x = torch.cat([prompt, start], dim=1)
    editable = torch.zeros_like(x, dtype=torch.bool)
    editable[:, P:] = True
    span = editable.sum(1)
    trace: list[dict[str, Any]] = []
    level = 1.0
    for s in range(1, steps + 1):
        t = torch.full((B,), level, device=x.device) if model.time_embed is not None else None
        hidden = model.forward_from(model.embed(x), t=t)
        cand, conf = choose_at(model.head(hidden[editable]), editable, mask_id, temperature, top_p, generator)
        level = 1.0 - s / steps
        target = _count(level, span) if s < steps else torch.zeros_like(span)
        renoise = top_per_row(-conf, editable, target)
        fresh = random_tokens(x.shape, V, mask_id, generator, x.device)
        new = torch.where(renoise, fresh, torch.where(editable, cand, x))
        changed = new != x
        trace.append({
            "step": s, "t": level, "positions": _rows(changed), "tokens": _rows(changed, new),
            "remasked": [[] for _ in range(B)], "renoised": _rows(renoise & changed),
            "confidence": _mean_conf(conf, editable & ~renoise), "changed": int(changed.sum()),
        })
        x = new
    return SampleResult(x, trace, forwards=steps, block_evals=steps * (model.last_block - model.first_block + 1),
                        prompt_length=P, extra={"start": start.tolist()})


# --------------------------------------------------------------------------- semi-autoregressive


class PrefixKV:
    """Keys/values of a committed prefix, per layer, fed to stock EuroBERT attention.

    EuroBERT attention calls ``past_key_values.update(k, v, layer_idx)`` and attends over
    what it returns. While ``recording``, the prefix's own K/V are stored (the prefix attends
    only to itself); afterwards each call returns prefix K/V followed by the new tokens' K/V
    *without* storing them, so the same cache serves every denoising step of a block.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        return (torch.cat([self.keys[layer_idx], key], dim=-2), torch.cat([self.values[layer_idx], value], dim=-2))


def _rope(model, hidden: torch.Tensor, start: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device).unsqueeze(0)
    return positions, model.rotary_emb(hidden, position_ids=positions)


def _blocks(model, hidden: torch.Tensor, start: int, **kwargs) -> torch.Tensor:
    """Run every existing block on ``hidden`` whose first position id is ``start``."""
    positions, rope = _rope(model, hidden, start)
    for k in range(model.first_block, model.last_block + 1):
        hidden = model.block(k)(hidden, position_embeddings=rope, position_ids=positions, **kwargs)
    return hidden


@torch.no_grad()
def prefix_cache(model, prefix: torch.Tensor) -> PrefixKV:
    """Run the committed prefix once through every block, keeping each layer's K/V."""
    kv = PrefixKV()
    _blocks(model, model.embed(prefix), 0, past_key_values=kv)
    kv.recording, kv.length = False, prefix.shape[1]
    return kv


def cached_hidden(model, kv: PrefixKV, block: torch.Tensor) -> torch.Tensor:
    """Hidden states of ``block`` (positions after the prefix) attending to cached prefix K/V + itself."""
    return _blocks(model, model.embed(block), kv.length, past_key_values=kv)


def frozen_prefix_hidden(model, prefix: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The cached computation without a cache: the whole sequence, recomputed, under an
    attention mask that stops prefix queries from seeing the block (Fast-dLLM's
    approximation, expressed as a mask). Returns the block's hidden states."""
    P, N = prefix.shape[1], block.shape[1]
    allowed = torch.ones(P + N, P + N, dtype=torch.bool, device=block.device)
    allowed[:P, P:] = False
    hidden = _blocks(model, model.embed(torch.cat([prefix, block], dim=1)), 0, attention_mask=allowed[None, None])
    return hidden[:, P:]


@torch.no_grad()
def cached_logits(model, kv: PrefixKV, block: torch.Tensor) -> torch.Tensor:
    return model.head(cached_hidden(model, kv, block))


@torch.no_grad()
def frozen_prefix_logits(model, prefix: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Block logits with the prefix frozen, computed without a cache: the tests' reference."""
    return model.head(frozen_prefix_hidden(model, prefix, block))


@torch.no_grad()
def semi_ar(
    model,
    prompt: torch.Tensor,
    length: int,
    *,
    mask_id: int,
    block_length: int = 32,
    steps: int | None = None,
    context: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    threshold: float | None = None,
    remask: float = 0.0,
    generator: torch.Generator | None = None,
    cache: bool = True,
    prefix_mode: str | None = None,
) -> SampleResult:
    """Block-wise left-to-right generation of long outputs (LLaDA semi-AR, Fast-dLLM cache).

    Args:
        model: a ``GrowModel`` (the cache runs its blocks one by one).
        prompt: ``(B, P)`` prompt ids; P may be 0.
        length: total tokens to generate; may exceed the model's context.
        mask_id: the tokenizer's mask token id.
        block_length: tokens per block; each is decoded by the iterative routine.
        steps: denoising steps per block (default: block_length, one token per step).
        context: how many of the most recently generated tokens the next block sees besides
            the prompt (tiny-diffusion's context window). None = as many as fit in the
            model's context; always cut to fit.
        temperature, top_p, threshold, remask: as in ``iterative``, per block.
        generator: the random stream for sampling.
        cache: True = Fast-dLLM prefix cache: the prompt + window is run once per block and
            its per-layer keys/values are reused by every step of the block. This freezes
            the prefix: its tokens do not attend to the block being decoded, which full
            bidirectional attention would let them do. False = exact: the whole window is
            recomputed at every step, prefix attending to the block too.
        prefix_mode: overrides ``cache``: "cached", "exact", or "frozen" (the cached
            approximation recomputed every step under an attention mask; for testing).
    """
    mode = prefix_mode or ("cached" if cache else "exact")
    if mode not in ("cached", "exact", "frozen"):
        raise ValueError(f"prefix_mode: expected cached, exact or frozen, got {mode!r}")
    if model.time_embed is not None:
        # A time-conditioned prefix changes with every step's level, so there is nothing to cache.
        mode = "exact"
    if block_length < 1:
        raise UserError(f"--block-length: expected a positive number of tokens, got {block_length}")
    if length <= 0:
        raise UserError(f"--length: expected a positive number of tokens to generate, got {length}")
    if context is not None and context < 0:
        raise UserError(f"--context: expected >= 0 tokens, got {context}")
    block_length = min(block_length, length)
    context_size = model.config.max_position_embeddings
    if prompt.dim() == 2 and prompt.shape[1] + block_length > context_size:
        raise UserError(
            f"--prompt/--block-length: {prompt.shape[1]} prompt tokens + a block of {block_length} exceed the "
            f"model's context of {context_size} positions (max_position_embeddings)"
        )
    _check(model, prompt, block_length, temperature=temperature, top_p=top_p)
    steps = block_length if steps is None else steps
    _check_steps(steps)
    _check_options(threshold, remask)

    B, P = prompt.shape
    room = model.config.max_position_embeddings - P - block_length
    window = room if context is None else min(context, room)
    generated = prompt.new_zeros((B, 0))
    trace: list[dict[str, Any]] = []
    forwards, prefills, evals_per_forward = 0, 0, model.last_block - model.first_block + 1
    for start in range(0, length, block_length):
        n = min(block_length, length - start)
        seen = generated[:, max(0, generated.shape[1] - window) :] if window else generated[:, :0]
        prefix = torch.cat([prompt, seen], 1)
        block = torch.full((B, n), mask_id, dtype=torch.long, device=prompt.device)
        editable = torch.ones_like(block, dtype=torch.bool)
        if mode == "exact" or prefix.shape[1] == 0:
            Lp = prefix.shape[1]
            x = torch.cat([prefix, block], 1)
            editable = torch.cat([torch.zeros_like(prefix, dtype=torch.bool), editable], 1)
            x, steps_trace, f = denoise(
                _full_stack(model, mask_id), model.head, x, editable, mask_id=mask_id, steps=steps, temperature=temperature,
                top_p=top_p, threshold=threshold, remask=remask, generator=generator, offset=P + start - Lp,
            )
            block = x[:, Lp:]
        else:
            if mode == "cached":
                kv = prefix_cache(model, prefix)
                prefills += 1

                def hidden_fn(b, kv=kv):
                    return cached_hidden(model, kv, b)
            else:

                def hidden_fn(b, prefix=prefix):
                    return frozen_prefix_hidden(model, prefix, b)

            block, steps_trace, f = denoise(
                hidden_fn, model.head, block, editable, mask_id=mask_id, steps=steps, temperature=temperature,
                top_p=top_p, threshold=threshold, remask=remask, generator=generator, offset=P + start,
            )
        forwards += f
        for entry in steps_trace:
            trace.append({**entry, "step": len(trace) + 1, "block_start": P + start})
        generated = torch.cat([generated, block], 1)
    tokens = torch.cat([prompt, generated], 1)
    return SampleResult(
        tokens, trace, forwards=forwards + prefills, block_evals=(forwards + prefills) * evals_per_forward,
        prompt_length=P, extra={"prefills": prefills, "window": window, "prefix": mode},
    )


# --------------------------------------------------------------------------- dispatch


def generate(
    model,
    prompt: torch.Tensor,
    length: int,
    mode: str,
    *,
    mask_id: int,
    ratios: Sequence[float] | None = None,
    paths: dict[int, tuple[int, int]] | None = None,
    steps: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    threshold: float | None = None,
    remask: float = 0.0,
    block_length: int = 32,
    context: int | None = None,
    generator: torch.Generator | None = None,
    cache: bool = True,
) -> SampleResult:
    """Run sampler ``mode`` (one of ``MODES``) with the options that apply to it.

    ``steps`` defaults to ``length`` (iterative) or ``block_length`` (semi-ar); depth and
    suffix take their steps from the schedule and reject threshold/remask.
    """
    if mode not in MODES:
        raise UserError(f"--mode: unknown sampler {mode!r}; expected one of {', '.join(MODES)}")
    if mode in ("depth", "suffix"):
        if threshold is not None or remask:
            raise UserError(f"--threshold/--remask: not used by --mode {mode} (its steps are the schedule's)")
        fn = depth if mode == "depth" else suffix
        return fn(model, prompt, length, mask_id=mask_id, ratios=ratios, paths=paths, temperature=temperature, top_p=top_p,
                  generator=generator)
    if mode == "refine":
        if threshold is not None or remask:
            raise UserError("--threshold/--remask: not used by --mode refine (it re-predicts every position)")
        return refine(model, prompt, length, mask_id=mask_id, steps=length if steps is None else steps,
                      temperature=temperature, top_p=top_p, generator=generator)
    if mode == "iterative":
        return iterative(model, prompt, length, mask_id=mask_id, steps=length if steps is None else steps,
                         temperature=temperature, top_p=top_p, threshold=threshold, remask=remask,
                         generator=generator, cache=cache)
    return semi_ar(model, prompt, length, mask_id=mask_id, block_length=block_length, steps=steps, context=context,
                   temperature=temperature, top_p=top_p, threshold=threshold, remask=remask, generator=generator,
                   cache=cache)


# --------------------------------------------------------------------------- showing results

MASK_GLYPH = "\u2591"  # one light-shade block per masked token


def frames(result: SampleResult, tokenizer, mask_id: int, row: int = 0) -> list[str]:
    """The text of sample ``row`` after every step, masks drawn as one glyph per token.

    Replays the trace from prompt + all masks. Runs of unmasked tokens are decoded together,
    so byte-level BPE pieces of one character stay whole.
    """
    P = result.prompt_length
    start = result.extra.get("start")  # refine starts from random tokens, not masks
    tail = start[row] if start is not None else [mask_id] * (result.tokens.shape[1] - P)
    current = result.tokens[row].tolist()[:P] + list(tail)
    out = [_render(current, tokenizer, mask_id)]
    for entry in result.trace:
        for pos, tok in zip(entry["positions"][row], entry["tokens"][row]):
            current[pos] = tok
        for pos in entry["remasked"][row]:
            current[pos] = mask_id
        out.append(_render(current, tokenizer, mask_id))
    return out


def _render(ids: list[int], tokenizer, mask_id: int) -> str:
    parts, run = [], []
    for tok in ids + [None]:
        if tok is not None and tok != mask_id:
            run.append(tok)
            continue
        if run:
            parts.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
        if tok is not None:
            parts.append(MASK_GLYPH)
    # one screen line per frame, as in the LLaDA demo: escape what would break the redraw
    return "".join(parts).replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")


def animate(result: SampleResult, tokenizer, mask_id: int, stream, delay: float = 0.05) -> None:
    """Masks resolving in place on a terminal: each frame redraws over the previous one."""
    import shutil
    import time

    width = max(20, shutil.get_terminal_size((80, 24)).columns)
    drawn = 0
    for text in frames(result, tokenizer, mask_id):
        if drawn > 1:
            stream.write(f"\x1b[{drawn - 1}A")  # back to the first line of the wrapped frame
        stream.write("\r\x1b[J" + text)
        stream.flush()
        drawn = max(1, -(-len(text) // width))
        time.sleep(delay)
    stream.write("\n")
    stream.flush()


def to_json(result: SampleResult, tokenizer, *, seconds: float, **info: Any) -> dict[str, Any]:
    """A JSON-ready record of a sampling call: samples, per-step trace, cost and timing."""
    generated = result.generated
    return {
        **info,
        "samples": [
            {"text": tokenizer.decode(row, skip_special_tokens=True), "ids": row,
             "generated": tokenizer.decode(gen, skip_special_tokens=True)}
            for row, gen in zip(result.tokens.tolist(), generated.tolist())
        ],
        "prompt_tokens": result.prompt_length,
        "forwards": result.forwards,
        "block_evals": result.block_evals,
        "seconds": seconds,
        "tokens_per_s": generated.numel() / seconds if seconds > 0 else None,
        "trace": result.trace,
        **({"details": result.extra} if result.extra else {}),
    }

"""Honest quality numbers: held-out masked CE per noise level, the MDLM bound, sample statistics.

Held-out masks come from the held-out salt of the nested-mask stream, so every stage and
every export is measured on exactly the same masked tokens at a given ratio. ``grow eval``
runs ``evaluate_denoiser``: CE curves per stage, the likelihood bound of the full stack and
what each sampler produces, as JSON and a plot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from grow.corruption import Corruption, corruption_for, keys_rows, rows_of
from grow.errors import UserError
from grow.noise import HELDOUT_SALT, corrupt, mask_scores, nested_mask

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""logits_fn(corrupted ids (B, T), noise level per row (B,)) -> logits (B, T, V)."""


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
    corruption: Corruption | None = None,
    vocab_size: int | None = None,
) -> float:
    """Token-weighted mean CE over the loss positions of the first ``batches`` held-out batches.

    ``logits_fn(ids, t)`` maps corrupted ids (B, T) and the level of each row to logits
    (B, T, V): a grown model's ``model(ids, start=k, t=t)`` or a Hugging Face model's
    ``lambda x, t: m(input_ids=x).logits`` (a time-free model ignores t). ``corruption``
    (default [MASK]) says what the corrupted positions hold and where the CE is taken: the
    corrupted positions, or every token for replacement noise (``vocab_size`` is then the
    range of the random tokens).
    """
    corruption = corruption or Corruption()
    total, count = 0.0, 0
    n = heldout.shape[0]
    for b in range(batches):
        keys = [(b * batch_size + i) % n for i in range(batch_size)]
        ids = heldout[keys].to(device)
        rows = keys_rows(keys, seed, HELDOUT_SALT)
        mask = nested_mask(mask_scores(keys, ids.shape[1], seed, HELDOUT_SALT), ratio).to(device)
        where = corruption.loss_positions(mask)
        t = torch.full((len(keys),), float(ratio), device=device)
        with rows_of(rows):
            x = corruption.corrupt(ids, mask, rows, mask_token_id, vocab_size, levels=t.double().cpu())
            logits = logits_fn(x, t).float()
        total += torch.nn.functional.cross_entropy(logits[where], ids[where], reduction="sum").item()
        count += int(where.sum())
        if (b + 1) * batch_size >= n:  # the whole held-out split has been seen once
            break
    return total / count


def own_levels(spec, ratios: Sequence[float]) -> list[float]:
    """The levels a stage's headline CE averages over: its own level, the middle of its band's
    schedule level, or every schedule level for a stage trained on t ~ U(0, 1)."""
    if spec.noise.fixed:
        return [spec.noise.lo]
    if spec.level is not None:
        return [ratios[spec.level - 1]]
    return list(ratios)


@torch.no_grad()
def level_report(model, cfg, spec, heldout: torch.Tensor, mask_token_id: int,
                 device: torch.device) -> tuple[float, dict[str, Any]]:
    """What a stage commits about the model it leaves: (its own CE, the per-level table).

    Own CE: blocks ``spec.first..spec.last`` at the stage's level(s) (``own_levels``). The
    table, per schedule level k: ``whole`` -- every block the model has (what an export runs);
    ``path`` -- the blocks that serve level k in a depth-tied model (``level_paths``), when the
    model has them yet. All on the same held-out masks, so stages and runs compare.
    """
    from grow.curriculum import level_paths

    ratios = cfg.ratios()
    kw = dict(mask_token_id=mask_token_id, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
              batches=cfg.train.eval_batches, device=device, corruption=corruption_for(cfg),
              vocab_size=model.config.vocab_size)

    def ce(first: int, last: int, r: float) -> float:
        return heldout_ce(lambda x, t: model(x, start=first, end=last, t=t), heldout, r, **kw)

    own_at = own_levels(spec, ratios)
    own = sum(ce(spec.first, spec.last, r) for r in own_at) / len(own_at)
    paths = level_paths(cfg) or {}
    first, last = model.first_block, model.last_block
    table: dict[str, Any] = {"whole_blocks": [first, last], "whole": {}, "path": {}}
    for k, r in enumerate(ratios, start=1):
        table["whole"][str(k)] = ce(first, last, r)
        path = paths.get(k)
        if path is not None and first <= path[0] and path[1] <= last:
            same = tuple(path) == (first, last)
            table["path"][str(k)] = table["whole"][str(k)] if same else ce(*path, r)
    return own, table


# --------------------------------------------------------------------------- the MDLM bound

ELBO_MASKING = ("count", "bernoulli")


@dataclass
class Elbo:
    """An upper bound on the held-out negative log-likelihood, per token."""

    nats_per_token: float
    sequences: int
    tokens: int
    masking: str

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)

    def to_dict(self) -> dict[str, Any]:
        return {"nats_per_token": self.nats_per_token, "bits_per_token": self.bits_per_token,
                "perplexity_bound": self.perplexity_bound, "sequences": self.sequences, "tokens": self.tokens,
                "masking": self.masking}


@torch.no_grad()
def mdlm_elbo(
    logits_fn: LogitsFn,
    heldout: torch.Tensor,
    *,
    mask_token_id: int,
    seed: int,
    batch_size: int,
    batches: int,
    device: torch.device | str = "cpu",
    masking: str = "count",
    eps: float = 1e-3,
) -> Elbo:
    """MDLM's continuous-time bound for the linear schedule alpha_t = 1 - t, per token.

        -log p(x) <= E_{t ~ U(0,1)} [ (1/t) * sum_{i masked in z_t} -log p(x_i | z_t) ]

    (the weight -alpha'_t / (1 - alpha_t) is 1/t), divided by the T tokens of a sequence.
    The n sequences evaluated get low-discrepancy times t_i = (u + i) / n mod 1 with one
    u ~ U(0, 1), MDLM's variance reduction. Two estimators of the same expectation:

    - ``bernoulli``: every token is masked with probability t_i and the sequence scores
      (1/t_i) * sum of masked CE / T -- the formula literally (t clipped below at ``eps``).
    - ``count`` (default): m_i = ceil(t_i T) tokens are masked (t ~ U makes m ~ U{1..T}) and
      the sequence scores sum of masked CE / m_i, i.e. its mean masked CE. Given that m tokens
      are masked, integrating the 1/t weight over t gives exactly 1/m
      (int_0^1 (1/t) C(T,m) t^m (1-t)^(T-m) dt = 1/m), so this is the bound with t integrated
      out: unbiased for the same quantity, lower variance (LLaDA's form of the bound).

    A model that predicts the uniform distribution scores exactly log V with ``count``.
    """
    if masking not in ELBO_MASKING:
        raise ValueError(f"masking: expected one of {', '.join(ELBO_MASKING)}, got {masking!r}")
    generator = torch.Generator().manual_seed(seed)
    n = min(heldout.shape[0], batches * batch_size)
    T = heldout.shape[1]
    u = torch.rand(1, generator=generator, dtype=torch.float64).item()
    total = 0.0
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))
        ids = heldout[rows].to(device)
        t = ((u + rows.double()) / n) % 1.0
        scores = torch.rand(len(rows), T, generator=generator, dtype=torch.float64)
        if masking == "count":
            m = torch.ceil(t * T).long().clamp(1, T)
            mask = scores.argsort(1).argsort(1) < m.unsqueeze(1)
            weight = 1.0 / m.double()
            t = m.double() / T  # the level the network actually sees
        else:
            t = t.clamp(min=eps)
            mask = scores < t.unsqueeze(1)
            weight = 1.0 / (t * T)
        mask = mask.to(device)
        logits = logits_fn(corrupt(ids, mask, mask_token_id), t.float().to(device)).float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * mask
        total += float((ce.double().sum(1).cpu() * weight).sum())
    return Elbo(total / n, n, n * T, masking)


# --------------------------------------------------------------------------- sample statistics


def sample_stats(samples: list[list[int]], stop_ids: tuple[int, ...] = ()) -> dict[str, float]:
    """Diversity and degeneration of generated token sequences.

    Each sample is cut at its first ``stop_ids`` token (EOS/pad). ``distinct_1``/``distinct_2``:
    distinct n-grams over all samples / all n-grams (Li et al. 2016). ``repetition``: seq-rep-4
    (Welleck et al. 2019), the fraction of a sample's 4-grams that repeat an earlier one,
    averaged over samples. ``mean_length``: tokens before the cut.
    """
    cut = []
    for s in samples:
        end = next((i for i, tok in enumerate(s) if tok in stop_ids), len(s))
        cut.append(list(s[:end]))

    def distinct(n: int) -> float:
        grams = [tuple(s[i : i + n]) for s in cut for i in range(len(s) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0

    reps = []
    for s in cut:
        grams = [tuple(s[i : i + 4]) for i in range(len(s) - 3)]
        if grams:
            reps.append(1.0 - len(set(grams)) / len(grams))
    return {
        "distinct_1": distinct(1),
        "distinct_2": distinct(2),
        "repetition": sum(reps) / len(reps) if reps else 0.0,
        "mean_length": sum(map(len, cut)) / len(cut) if cut else 0.0,
    }


# --------------------------------------------------------------------------- a whole report

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def parse_ratios(text: str) -> list[float]:
    """'0.15,0.5,1.0' -> [0.15, 0.5, 1.0]; each in (0, 1]."""
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ratios: expected comma-separated mask ratios like 0.15,0.5,1.0, got {text!r}") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise UserError(f"--ratios: expected mask ratios in (0, 1], got {text!r}")
    return sorted(set(ratios))


def commit_figures(run: Path) -> dict[int, dict[str, Any]]:
    """Level k -> the CE the newest stage tied to level k measured when it committed.

    Read from the manifests (``heldout_ce`` of a stage whose spec has ``level == k``); the
    figure ``grow status`` has always shown, and what the current model is held to.
    """
    from grow.store import list_stages

    out: dict[int, dict[str, Any]] = {}
    for stage in list_stages(run).values():
        level = stage.spec.get("level")
        if level is not None and (level not in out or stage.index > out[level]["index"]):
            out[level] = {"stage": stage.name, "index": stage.index, "ce": stage.manifest["heldout_ce"]}
    return out


def evaluate_denoiser(
    loaded,
    heldout: torch.Tensor,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    samples: int = 4,
    sample_length: int | None = None,
    modes: Sequence[str] | None = None,
    steps: int = 64,
    levels_only: bool = False,
    score_samples: Callable[[list[list[int]]], dict[str, float]] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Everything ``grow eval`` reports for a loaded denoiser (``grow.inference.Loaded``).

    - per schedule level r_k: the CE its stage measured at commit (runs), the current
      model's path for level k (depth-tied models) and the whole stack -- what an export and
      the iterative / semi-AR samplers run -- with the drift of the path from its commit;
    - the whole stack and every level path on a grid of ratios;
    - the MDLM bound of the whole stack (nats and bits per token, perplexity bound);
    - per sampler mode the model supports: ``samples`` unconditional samples at temperature 1,
      their statistics and the sampler's throughput in generated tokens per second;
      ``score_samples`` adds figures of its own computed from the generated ids (``grow ablate``'s
      n-gram judge).
    """
    from grow import sample as sampling

    model, mask_id = loaded.model, loaded.mask_id
    device = next(model.parameters()).device
    first, last = model.first_block, model.last_block
    if batches < 1 or batch_size < 1:
        raise UserError(f"--batches: expected a positive number of held-out batches, got {batches}")
    kw = dict(mask_token_id=mask_id, seed=seed, batch_size=batch_size, batches=batches, device=device)
    ce_kw = dict(kw, corruption=loaded.corruption, vocab_size=model.config.vocab_size)
    whole = loaded.logits_fn()
    commits = commit_figures(loaded.path) if loaded.source == "run" else {}
    report: dict[str, Any] = {
        "source": loaded.source, "path": str(loaded.path), "num_blocks": model.num_blocks,
        "blocks": [first, last], "schedule": list(loaded.ratios), "depth_tied": loaded.paths is not None,
        "heldout": {"sequences": int(heldout.shape[0]), "seq_len": int(heldout.shape[1]),
                    "batches": batches, "batch_size": batch_size, "seed": seed},
    }
    start = time.perf_counter()
    levels, paths = [], {}
    for k, r in enumerate(loaded.ratios, start=1):
        entry: dict[str, Any] = {"level": k, "ratio": r, "whole": heldout_ce(whole, heldout, r, **ce_kw)}
        path = loaded.level_path(k)
        if path is not None:
            paths[k] = path
            same = tuple(path) == (first, last)
            entry["path_blocks"] = list(path)
            entry["path"] = entry["whole"] if same else heldout_ce(loaded.logits_fn(*path), heldout, r, **ce_kw)
        if k in commits:
            entry["commit"], entry["commit_stage"] = commits[k]["ce"], commits[k]["stage"]
            if "path" in entry:
                entry["drift"] = entry["path"] / entry["commit"] - 1
        levels.append(entry)
    report["levels"] = levels
    log(f"eval: CE per level ({time.perf_counter() - start:.1f}s)")
    if levels_only:
        return report
    report["grid"] = {"whole": [{"ratio": r, "ce": heldout_ce(whole, heldout, r, **ce_kw)} for r in grid]}
    for k, path in paths.items():
        if tuple(path) != (first, last):
            fn = loaded.logits_fn(*path)
            report["grid"][str(k)] = [{"ratio": r, "ce": heldout_ce(fn, heldout, r, **ce_kw)} for r in grid]
    log(f"eval: CE curves on {len(grid)} ratios ({time.perf_counter() - start:.1f}s)")
    if loaded.corruption.replaces_tokens:
        # The MDLM bound is the absorbing-state one; a replacement model reports CE on all tokens.
        report["elbo"] = None
    else:
        report["elbo"] = mdlm_elbo(whole, heldout, **kw).to_dict()
        log(f"eval: MDLM bound {report['elbo']['bits_per_token']:.3f} bits/token ({time.perf_counter() - start:.1f}s)")

    report["samples"] = {}
    if samples > 0:
        length = min(sample_length or heldout.shape[1], model.config.max_position_embeddings)
        tok = loaded.tokenizer
        stop = tuple(i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None)
        prompt = torch.zeros((samples, 0), dtype=torch.long, device=device)
        for mode in modes or sampling.modes_for(loaded.corruption, bool(loaded.paths)):
            generator = torch.Generator(device=device).manual_seed(seed)
            opts: dict[str, Any] = {"steps": steps} if mode in ("iterative", "semi-ar", "refine") else {}
            if mode == "semi-ar":
                opts["block_length"] = min(32, max(1, length // 4))  # several blocks, so the cache is used
                opts["steps"] = max(1, steps * opts["block_length"] // length)
            t0 = time.perf_counter()
            result = sampling.generate(model, prompt, length, mode, mask_id=mask_id, ratios=loaded.ratios,
                                       paths=loaded.paths, temperature=1.0, generator=generator, **opts)
            seconds = time.perf_counter() - t0
            ids = result.generated.tolist()
            report["samples"][mode] = {
                **sample_stats(ids, stop), "tokens_per_s": samples * length / seconds, "seconds": seconds,
                "forwards": result.forwards, "block_evals": result.block_evals, "length": length,
                "options": {"temperature": 1.0, **opts},
                "texts": [tok.decode(s, skip_special_tokens=True) for s in ids],
            }
            if score_samples is not None:
                report["samples"][mode].update(score_samples(ids))
        log(f"eval: {samples} samples per mode ({time.perf_counter() - start:.1f}s)")
    return report


def levels_table(levels: list[dict[str, Any]]) -> list[str]:
    """CE per schedule level: at commit, the level's path now (and its drift), the whole stack."""
    lines = [f"{'level':>5}  {'r_k':>6}  {'stage at commit':>15}  {'path now':>9}  {'drift':>7}  {'whole stack':>11}  path"]
    for e in levels:
        commit = f"{e['commit']:.4f}" if "commit" in e else "-"
        path = f"{e['path']:.4f}" if "path" in e else "-"
        drift = f"{100 * e['drift']:+.2f}%" if "drift" in e else "-"
        blocks = f"blocks {e['path_blocks'][0]}..{e['path_blocks'][1]}" if "path_blocks" in e else "-"
        lines.append(f"{e['level']:>5}  {e['ratio']:>6.3f}  {commit:>15}  {path:>9}  {drift:>7}  "
                     f"{e['whole']:>11.4f}  {blocks}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a few human-readable tables."""
    first, last = report["blocks"]
    lines = [f"{report['source']} {report['path']}: blocks {first}..{last}, "
             f"{report['heldout']['sequences']} held-out sequences of {report['heldout']['seq_len']}"]
    lines += levels_table(report["levels"])
    if "grid" not in report:  # --levels
        return "\n".join(lines)
    grid = report["grid"]["whole"]
    lines.append("ratio      " + "  ".join(f"{g['ratio']:>6.2f}" for g in grid))
    for key, curve in report["grid"].items():
        label = f"whole {first}..{last}" if key == "whole" else f"path of {key}"
        lines.append(f"{label:>10} " + "  ".join(f"{g['ce']:>6.3f}" for g in curve))
    e = report["elbo"]
    if e is None:
        lines.append("MDLM bound: does not apply to replacement noise; the CE above is on every token")
    else:
        lines.append(f"MDLM bound (whole stack): {e['nats_per_token']:.4f} nats/token = {e['bits_per_token']:.4f} "
                     f"bits/token, perplexity <= {e['perplexity_bound']:.2f} ({e['sequences']} sequences)")
    for mode, s in report["samples"].items():
        lines.append(f"{mode:>9}: {s['tokens_per_s']:>9.1f} tok/s  distinct-1 {s['distinct_1']:.3f}  "
                     f"distinct-2 {s['distinct_2']:.3f}  rep-4 {s['repetition']:.3f}  "
                     f"mean length {s['mean_length']:.1f}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """PNG of held-out masked CE against noise level: the whole stack and each level's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    first, last = report["blocks"]
    paths = [k for k in report["grid"] if k != "whole"]
    for i, k in enumerate(sorted(paths, key=int)):
        curve = report["grid"][k]
        color = cmap(i / max(1, len(paths)))
        ax.plot([g["ratio"] for g in curve], [g["ce"] for g in curve], color=color, lw=1.2, label=f"path of level {k}")
        entry = report["levels"][int(k) - 1]
        ax.plot([entry["ratio"]], [entry["path"]], "o", color=color)
    curve = report["grid"]["whole"]
    ax.plot([g["ratio"] for g in curve], [g["ce"] for g in curve], color="black", lw=2.2,
            label=f"whole stack (blocks {first}..{last})")
    ax.set_xlabel("mask ratio (noise level)")
    ax.set_ylabel("held-out masked CE (nats)")
    elbo = f"ELBO {report['elbo']['bits_per_token']:.2f} bits/token" if report["elbo"] else "CE on every token"
    ax.set_title(f"CE by noise level; dots: each level's path at r_k; {elbo}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heldout_for(loaded, data: str | None = None, *, seed: int = 0, seq_len: int | None = None,
                log: Callable[[str], None] = print) -> tuple[torch.Tensor, int]:
    """Held-out sequences for a loaded denoiser and the seed its masks use.

    A run rebuilds its own corpus split with its saved tokenizer and seed (``data`` replaces
    the source), so stage k's CE at r_k is measured on the very tokens its manifest's
    ``heldout_ce`` was. An export tokenizes ``data`` (default: the bible) with its own
    tokenizer, ``seq_len`` from ``grow.json`` (else 128) unless given.
    """
    import dataclasses
    import tempfile

    from grow.config import DataConfig
    from grow.data import load_corpus

    if loaded.source == "run":
        cfg = loaded.config
        data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, source=data)
        if seq_len is not None:
            data_cfg = dataclasses.replace(data_cfg, seq_len=seq_len)
        corpus = load_corpus(data_cfg, loaded.path / "tokenizer", cfg.train.seed, log=log)
        return corpus.heldout, cfg.train.seed
    max_pos = loaded.model.config.max_position_embeddings
    length = seq_len or int(loaded.meta.get("seq_len", min(128, max_pos)))
    if length > max_pos:
        raise UserError(f"--seq-len: {length} exceeds the model's context of {max_pos} positions")
    with tempfile.TemporaryDirectory(prefix="grow-eval-") as tmp:
        data_cfg = DataConfig(source=data or "bible", tokenizer=str(loaded.path), seq_len=length)
        corpus = load_corpus(data_cfg, Path(tmp) / "tokenizer", seed, log=log)
    return corpus.heldout, seed

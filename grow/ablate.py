"""``grow ablate``: the evidence. The configured growth, the joint baseline and every part of the
method switched off in turn, trained on the same data, shape, tokenizer, seed and token budget,
then measured the same way.

Each arm is an ordinary run directory (``OUT/arms/NAME``) grown by ``grow train`` itself, so
every other subcommand accepts it, and a killed ablation continues where it stopped: a finished
arm keeps its ``ablation.json`` and is not touched again; an unfinished one is resumed with
``--resume``. Measured per arm, on the same held-out rows and masks: CE per level through each
level's path and through the whole stack, the MDLM bound, samples per sampler (statistics,
throughput, and their perplexity under an n-gram model of the training split: a judge that is
not the model being scored), wall time, tokens and peak memory, and the whole stack of both
export merge modes.

``--minutes M`` chooses the token budget instead: a calibration run times the configured growth on
this machine, the planner scales it to each arm, and the budget that fits every arm, trained and
measured, in about M minutes is fixed in ``OUT/ablation-budget.json`` for every later call.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from grow.errors import UserError

Log = Callable[[str], None]


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    sets: tuple[str, ...] = ()


# The arms, relative to the user's config (the design card's recommendation, right to left with
# depth as time). Warm starts need a checkpoint: with a config of the checkpoint's shape,
# --set model.init_from=DIR starts every arm from it. An arm whose overrides do not
# validate against the config is skipped with a note.
ARMS: tuple[Arm, ...] = (
    Arm("grow", "the config as given"),
    Arm("joint", "joint baseline: every block at once, t ~ U(0, 1), time-free",
        ("curriculum.kind=joint", "curriculum.time=input", "curriculum.conditioning=none",
         "curriculum.final_steps=0", "curriculum.anchor=0.0")),
    Arm("no-spectral-norm", "growth without spectral norm", ("stability.spectral_norm=false",)),
    Arm("no-gamma", "growth without the residual gain (gamma = 1)", ("stability.gamma=1.0",)),
    Arm("no-lora", "growth without LoRA alignment of the frozen suffix (the final stage trains block 1)",
        ("lora.enabled=false", "curriculum.final_trains=free_block")),
    Arm("no-4bit", "growth with the frozen suffix in full precision", ("quant.enabled=false",)),
    Arm("no-anchor", "growth without path anchors", ("curriculum.anchor=0.0",)),
    Arm("no-final", "growth without the final whole-stack stage", ("curriculum.final_steps=0",)),
    Arm("consistency", "growth with the consistency loss on (lambda = 0.1)", ("stability.consistency_weight=0.1",)),
    Arm("left-to-right", "left to right, time as input (card 4.2)",
        ("curriculum.kind=left_to_right", "curriculum.time=input", "curriculum.conditioning=none",
         "curriculum.final_steps=0", "curriculum.anchor=0.0")),
    Arm("r2l-bands", "hybrid: right to left, each block on a band of t (card 4.3)", ("curriculum.time=input",)),
    Arm("l2r-depth", "hybrid: left to right with depth tied to noise (card 4.3)",
        ("curriculum.kind=left_to_right", "curriculum.time=depth")),
    Arm("gaussian", "Gaussian-noised embeddings instead of [MASK]", ("objective.corruption=gaussian",)),
    Arm("uniform", "random-token replacement, bands of t (CE on every token: not comparable to [MASK] CE)",
        ("objective.corruption=uniform", "curriculum.time=input")),
    Arm("duo", "Duo replacement noise, bands of t (CE on every token: not comparable to [MASK] CE)",
        ("objective.corruption=duo", "curriculum.time=input")),
    Arm("llada", "LLaDA's 1/t-weighted loss, bands of t", ("objective.weighting=llada", "curriculum.time=input")),
)


def arm_names() -> list[str]:
    return [a.name for a in ARMS]


def choose_arms(only: str | None) -> list[Arm]:
    if not only:
        return list(ARMS)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in arm_names()]
    if unknown:
        raise UserError(f"--only: unknown arm(s) {', '.join(unknown)}; expected some of {', '.join(arm_names())}")
    return [a for a in ARMS if a.name in wanted]


# --------------------------------------------------------------------------- the budget


def stage_steps(cfg) -> int:
    from grow.curriculum import stage_specs

    return sum(spec.steps for spec in stage_specs(cfg))


def tokens_per_step(cfg) -> int:
    return cfg.train.batch_size * cfg.data.seq_len


def budget_sets(config: str, sets: Sequence[str], budget: int) -> list[str]:
    """Overrides that give this arm ``budget`` training tokens (steps x batch x seq_len over all
    its stages), keeping the config's shares between stages."""
    from grow.config import load_config

    cfg = load_config(config, list(sets))
    target = max(1, round(budget / tokens_per_step(cfg)))
    growth = [cfg.steps_for(k) for k in range(1, cfg.model.num_blocks + 1)]
    c = cfg.curriculum
    # The steps a curriculum spends beyond train.steps (periodic joint stages, the final stage)
    # scale with it, so the arm's total lands on the target.
    scale = target / stage_steps(cfg)
    out = [f"train.steps=[{', '.join(str(max(1, round(s * scale))) for s in growth)}]"]
    if c.final_steps:
        out.append(f"curriculum.final_steps={max(1, round(c.final_steps * scale))}")
    if c.joint_every:
        out.append(f"curriculum.joint_steps={max(1, round(c.joint_steps * scale))}")
    out.append(f"train.warmup_steps={max(1, min(cfg.train.warmup_steps, round(cfg.train.warmup_steps * scale)))}")
    return out


# --------------------------------------------------------------------------- the n-gram judge


class Ngram:
    """An interpolated bigram model of token ids (absolute discounting, unigram add-one back-off),
    fit on the training split: the perplexity it gives a sample says how corpus-like the sample's
    local statistics are, independently of the model that produced it."""

    def __init__(self, rows, vocab_size: int, discount: float = 0.75):
        self.vocab, self.d = vocab_size, discount
        self.uni: Counter[int] = Counter()
        self.bi: Counter[tuple[int, int]] = Counter()
        for i in range(0, len(rows), 256):
            for row in rows[i : i + 256].tolist():
                self.uni.update(row)
                self.bi.update(zip(row, row[1:]))
        self.total = sum(self.uni.values())
        self.context: Counter[int] = Counter()
        self.types: Counter[int] = Counter()
        for (a, _), n in self.bi.items():
            self.context[a] += n
            self.types[a] += 1

    def prob(self, a: int, b: int) -> float:
        p_uni = (self.uni[b] + 1) / (self.total + self.vocab)
        n_a = self.context[a]
        if not n_a:
            return p_uni
        return max(self.bi[(a, b)] - self.d, 0) / n_a + self.d * self.types[a] / n_a * p_uni

    def perplexity(self, samples: Sequence[Sequence[int]]) -> float:
        nll, count = 0.0, 0
        for s in samples:
            for a, b in zip(s, s[1:]):
                nll -= math.log(self.prob(a, b))
                count += 1
        return math.exp(nll / count) if count else float("nan")


# --------------------------------------------------------------------------- one arm


def train_arm(run: Path, config: str, sets: Sequence[str], log: Log, *, threads: int | None = None,
              quiet: bool = False) -> None:
    """Grow (or continue) the arm's run with ``grow train`` itself, in its own process: each
    arm's peak memory is then its own (on CPU the manifests record the process's peak RSS).
    ``threads`` caps its CPU threads; ``quiet`` keeps its progress off the terminal (arms that
    run side by side would interleave it; the run's train.log has every line)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "grow", "train", config, "--out", str(run)]
    for s in sets:
        argv += ["--set", s]
    if (run / "grow.yaml").is_file():
        argv.append("--resume")  # a killed ablation left this arm unfinished
        log(f"ablate: {run.name}: resuming")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    sink = subprocess.DEVNULL if quiet else None
    code = subprocess.call(argv, env=env, stdout=sink, stderr=sink)
    if code:
        raise UserError(f"--out: arm {run.name} stopped (grow train exited {code}); see {run / 'train.log'}")


def measure_arm(run: Path, *, samples: int, steps: int, exports: bool, log: Log) -> dict[str, Any]:
    """Every figure of one finished arm (see the module docstring)."""
    import torch

    from grow.corruption import corruption_for
    from grow.data import load_corpus
    from grow.evaluate import evaluate_denoiser
    from grow.inference import load_denoiser
    from grow.store import list_stages

    loaded = load_denoiser(run, torch.device("cpu"), log=log)
    cfg = loaded.config
    # The run's own split, as heldout_for rebuilds it: its held-out rows for every CE, its
    # training rows for the judge, from one load.
    corpus = load_corpus(cfg.data, run / "tokenizer", cfg.train.seed, log=log)
    heldout, seed = corpus.heldout, cfg.train.seed
    judge = Ngram(corpus.train, len(loaded.tokenizer))
    kw = dict(batches=cfg.train.eval_batches, batch_size=cfg.train.batch_size, seed=seed)
    report = evaluate_denoiser(loaded, heldout, samples=samples, steps=steps, log=log,
                               score_samples=lambda ids: {"ngram_ppl": judge.perplexity(ids)}, **kw)
    manifests = [s.manifest for s in list_stages(run).values()]
    result: dict[str, Any] = {
        "run": str(run),
        # replacement noise takes its CE over every token, which does not compare with [MASK] CE
        "ce_on": "every token" if corruption_for(cfg).loss_on_all else "masked tokens",
        "curriculum": cfg.curriculum.kind, "time": cfg.curriculum.time,
        "stages": len(manifests),
        "tokens": sum(m["tokens_seen"] for m in manifests),
        "train_seconds": sum(m.get("train_seconds", 0.0) for m in manifests),
        "peak_bytes": max(m["memory"]["peak_bytes"] for m in manifests),
        "peak_kind": manifests[-1]["memory"]["peak_kind"],
        "levels": report["levels"], "elbo": report["elbo"],
        "samples": {mode: {k: v for k, v in s.items() if k != "texts"} | {"text": s["texts"][0]}
                    for mode, s in report["samples"].items()},
        "exports": {},
    }
    if exports:
        _measure_exports(run, result, heldout, kw)
    return result


def _measure_exports(run: Path, result: dict[str, Any], heldout, kw: dict[str, Any]) -> None:
    """The whole stack of both export merge modes, or why the run has no stock export."""
    from transformers.utils import logging as hf_logging

    from grow.evaluate import evaluate_denoiser
    from grow.export import export_run
    from grow.inference import load_denoiser

    hf_logging.disable_progress_bar()  # shard-writing and weight-loading bars, two per export
    try:
        for merge in ("dequantized", "original"):
            out = run.parent / f"{run.name}.export-{merge}"
            try:
                if not (out / "config.json").is_file():
                    export_run(run, out, merge_into=merge, overwrite=True, log=lambda s: None)
            except UserError as exc:  # e.g. a time embedding or Gaussian input noise: no stock export
                result["export_refused"] = str(exc)
                result["exports"] = {}
                break
            hf = load_denoiser(out, log=lambda s: None)
            levels = evaluate_denoiser(hf, heldout, levels_only=True, **kw)["levels"]
            result["exports"][merge] = [e["whole"] for e in levels]
    finally:
        hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- --minutes

BUDGET_FILE = "ablation-budget.json"
PROBE_STEPS = 3  # optimizer steps per stage of the calibration probe: enough that the first step's
# one-time costs do not dominate its per-token time, few enough to cost seconds at the tiny shape


def cost_factors(config: str, sets: Sequence[str], arms: Sequence[Arm], log: Log) -> dict[str, float]:
    """Each arm's training FLOPs per token relative to the configured growth's, from the planner
    (its stages' tokens and FLOPs per token at the config's own shares, which ``budget_sets``
    keeps). Every curriculum and corruption of ``ARMS`` is planned; an arm whose config does not
    load is left out (it is skipped when its turn comes), one the planner refuses costs 1."""
    from grow.config import load_config
    from grow.plan import plan

    def per_token(cfg) -> float:
        p = plan(cfg)
        return p.total_flops / max(p.total_tokens, 1)

    base = per_token(load_config(config, list(sets)))
    factors: dict[str, float] = {}
    for arm in arms:
        try:
            cfg = load_config(config, [*sets, *arm.sets])
        except UserError:
            continue
        try:
            factors[arm.name] = per_token(cfg) / base
        except UserError as exc:
            log(f"ablate: {arm.name}: not planned ({exc}); its training is costed like growth's")
            factors[arm.name] = 1.0
    return factors


def calibrate(config: str, out: Path, sets: Sequence[str], *, samples: int, steps: int, exports: bool,
              jobs: int = 1, log: Log) -> dict[str, Any]:
    """Time the configured growth on this machine: a probe of PROBE_STEPS steps per stage, grown
    and measured exactly as an arm is (``OUT/calibration/run``), after the corpus is prepared and
    the tokenizer trained once (``OUT/calibration/tokenizer``, which every arm then reads, so no
    arm pays for either). A finished calibration of the same settings is reused: an ablation
    refused for too few minutes keeps it. With ``jobs`` > 1 the probe trains and is measured on
    the threads one job gets, as its arms will be."""
    import shutil
    import time
    from dataclasses import replace

    import torch

    from grow.config import load_config
    from grow.curriculum import stage_specs
    from grow.data import load_corpus
    from grow.store import write_json_atomic

    where = out / "calibration"
    record = where / "calibration.json"
    key = {"config": config, "sets": list(sets), "samples": samples, "steps": steps, "exports": exports,
           "jobs": jobs}
    if record.is_file():
        found = json.loads(record.read_text())
        if {k: found.get(k) for k in key} == key:
            log(f"ablate: calibration: reusing {where} (measured by an earlier call)")
            return found | {"reused": True}
    if where.exists():  # unfinished, or for other settings: it holds nothing but its own scratch
        ours = {"calibration.json", "run", "tokenizer"}
        if any(p.name not in ours and not p.name.startswith("run.export-") for p in where.iterdir()):
            raise UserError(f"--out: {where} is not an ablation's calibration; move it away or choose another --out")
        shutil.rmtree(where)
    where.mkdir(parents=True)
    base = load_config(config, list(sets))
    tok, run = where / "tokenizer", where / "run"
    start = time.perf_counter()
    # The corpus as the arms read it: keyed by their (given) tokenizer, so it is prepared here.
    load_corpus(base.data, tok, base.train.seed, log=log)
    load_corpus(replace(base.data, tokenizer=str(tok)), tok, base.train.seed, log=log)
    data_seconds = time.perf_counter() - start
    probe = PROBE_STEPS * len(stage_specs(base)) * tokens_per_step(base)
    probe_sets = [*sets, *budget_sets(config, sets, probe), f"data.tokenizer={tok}"]
    log(f"ablate: calibration: growing the configured growth on {probe:,} tokens in {run}")
    start = time.perf_counter()
    threads = threads_per_job(jobs)
    train_arm(run, config, probe_sets, log, threads=threads)
    probe_seconds = time.perf_counter() - start
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    start = time.perf_counter()
    try:
        measured = measure_arm(run, samples=samples, steps=steps, exports=exports, log=lambda s: None)
    finally:
        torch.set_num_threads(before)
    measure_seconds = time.perf_counter() - start
    # the stage manifests' totals, as measure_arm reads them for every arm
    train_seconds, tokens = measured["train_seconds"], measured["tokens"]
    for export in where.glob("run.export-*"):  # timed; nothing reads them
        shutil.rmtree(export)
    found = key | {
        "tokenizer": str(tok), "probe_tokens": tokens,
        "seconds_per_token": train_seconds / max(tokens, 1),
        # process start, model building, quantization, per-stage evaluation and commits
        "fixed_seconds": probe_seconds - train_seconds,
        "measure_seconds": measure_seconds,
        "seconds": data_seconds + probe_seconds + measure_seconds,
    }
    write_json_atomic(record, found)
    log(f"ablate: calibration: {1000 * found['seconds_per_token']:.3f} s per 1k tokens of growth, "
        f"{found['fixed_seconds']:.1f} s fixed and {measure_seconds:.1f} s measuring per arm "
        f"({found['seconds']:.0f} s in all)")
    return found | {"reused": False}


def minutes_budget(minutes: float, calibration: dict[str, Any], factors: dict[str, float], *, step_tokens: int,
                   min_tokens: int, out: Path, jobs: int = 1) -> int:
    """The token budget per arm that fits ``minutes`` of wall time: what is left after the
    calibration (when this call ran it) and every arm's fixed and measuring cost, shared by the
    arms' training at growth's measured seconds per token times each arm's FLOPs factor; whole
    steps only. ``jobs`` arms at a time share the work out; the fixed costs are counted per round
    of ``jobs`` arms, since the last round may run fewer."""
    spent = 0.0 if calibration["reused"] else calibration["seconds"]
    per_arm = calibration["fixed_seconds"] + calibration["measure_seconds"]
    fixed = spent + math.ceil(len(factors) / jobs) * per_arm
    if not factors:
        raise UserError("--only: none of the chosen arms has a valid config; nothing to budget --minutes for")
    rate = sum(factors.values()) * calibration["seconds_per_token"] / jobs  # seconds per token of budget
    budget = int(max(minutes * 60 - fixed, 0) / rate) // step_tokens * step_tokens if rate > 0 else 0
    if budget < min_tokens:
        # A second call reuses the calibration just made, so it needs no time for it.
        need = (math.ceil(len(factors) / jobs) * per_arm + rate * min_tokens) / 60
        raise UserError(
            f"--minutes: {minutes:g} minutes do not cover "
            + ("" if calibration["reused"] else f"the calibration ({calibration['seconds']:.0f} s) and ")
            + f"{len(factors)} arm(s) ({jobs} at a time) at {per_arm:.0f} s each besides training, plus one "
            "training step per stage; "
            f"at least about {math.ceil(need * 10) / 10:g} minutes are needed by a call that reuses the "
            f"calibration kept in {out / 'calibration'}")
    return budget


def settle_budget(config: str, out: Path, base, arms: Sequence[Arm], *, sets: Sequence[str], budget: int | None,
                  minutes: float | None, samples: int, steps: int, exports: bool, log: Log,
                  jobs: int = 1) -> dict[str, Any]:
    """The ablation's token budget per arm, one number for all its arms and all its calls:
    ``OUT/ablation-budget.json`` (written before the first arm trains) fixes it, and a later
    call that asks for another is refused."""
    from grow.curriculum import stage_specs
    from grow.store import write_json_atomic

    path = out / BUDGET_FILE
    default = stage_steps(base) * tokens_per_step(base)
    if path.is_file():
        stored = json.loads(path.read_text())
        same = (stored.get("minutes") == minutes if minutes is not None
                else stored["budget_tokens"] == (budget if budget is not None else default))
        if not same:
            flag = "--minutes" if minutes is not None else "--budget"
            again = f"--budget {stored['budget_tokens']}" + (
                f" or --minutes {stored['minutes']:g}" if stored.get("minutes") is not None else "")
            raise UserError(f"{flag}: {out} was started with {describe_budget(stored)}; every arm gets that budget: "
                            f"continue it with {again}, or use a new --out")
        log(f"ablate: budget {stored['budget_tokens']:,} tokens per arm ({describe_budget(stored)}, fixed in {path})")
        chosen = stored
    else:
        done = sorted(out.glob("arms/*/ablation.json"))
        if minutes is not None and done:
            raise UserError(f"--minutes: {out} already holds arms trained without --minutes; continue it with "
                            "--budget (their budget), or use a new --out")
        chosen = {"how": "--budget" if budget is not None else "config", "minutes": None,
                  "budget_tokens": budget if budget is not None else default, "tokenizer": None,
                  "calibration": None, "factors": None}
        if minutes is not None:
            calibration = calibrate(config, out, sets, samples=samples, steps=steps, exports=exports, jobs=jobs,
                                    log=log)
            factors = cost_factors(config, sets, arms, log)
            step_tokens = tokens_per_step(base)
            chosen |= {"how": "--minutes", "minutes": minutes, "tokenizer": calibration["tokenizer"],
                       "calibration": calibration, "factors": factors,
                       "budget_tokens": minutes_budget(minutes, calibration, factors, step_tokens=step_tokens,
                                                       min_tokens=len(stage_specs(base)) * step_tokens, out=out,
                                                       jobs=jobs)}
            log(f"ablate: {describe_budget(chosen)}")
    for done in sorted(out.glob("arms/*/ablation.json")):  # arms measured before the budget file was
        b = json.loads(done.read_text()).get("budget_tokens")
        if b is not None and b != chosen["budget_tokens"]:
            raise UserError(f"--budget: arm {done.parent.name} of {out} was trained on {b:,} tokens, this ablation's "
                            f"budget is {chosen['budget_tokens']:,}; every arm gets the same budget: continue it "
                            f"with --budget {b}, or use a new --out")
    if not path.is_file():
        write_json_atomic(path, chosen)
    return chosen


def describe_budget(b: dict[str, Any]) -> str:
    n = f"{b['budget_tokens']:,} tokens"
    if b["how"] == "--minutes":
        c = b["calibration"]
        return (f"--minutes {b['minutes']:g}: calibrated on this machine: {1000 * c['seconds_per_token']:.3f} s per "
                f"1k tokens of growth, {c['fixed_seconds'] + c['measure_seconds']:.0f} s fixed per arm "
                f"({c['measure_seconds']:.0f} s of it measuring)"
                + (f", {c['jobs']} arms at a time" if c.get("jobs", 1) > 1 else "") + f" -> budget {n}")
    if b["how"] == "--budget":
        return f"--budget {b['budget_tokens']}"
    return f"the config's own stages ({n})"


# --------------------------------------------------------------------------- the whole ablation


def threads_per_job(jobs: int) -> int | None:
    """CPU threads for each of ``jobs`` arms that run side by side: the cores shared out; None
    for one arm at a time, which runs on the threads it would have anyway."""
    if jobs <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def run_arm(arm: Arm, run: Path, config: str, arm_sets: Sequence[str], *, budget: int, samples: int, steps: int,
            exports: bool, log: Log, threads: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train and measure one arm, then write its ``ablation.json``: the mark that it is done."""
    import time

    start = time.perf_counter()
    train_arm(run, config, arm_sets, log, threads=threads, quiet=quiet)
    result = {"arm": arm.name, "what": arm.what, "sets": list(arm.sets), "budget_tokens": budget,
              **measure_arm(run, samples=samples, steps=steps, exports=exports, log=log)}
    # training (since its resume, for an arm a killed ablation left unfinished) and measuring
    result["wall_seconds"] = time.perf_counter() - start
    from grow.store import write_json_atomic

    write_json_atomic(run / "ablation.json", result)  # an arm counts as measured only once this file exists
    return result


def _worker_start(threads: int) -> None:
    """A job's process: its measuring and its training subprocess each get ``threads`` threads."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _worker_arm(*args, **kwargs) -> dict[str, Any]:
    import sys

    name = args[0].name
    return run_arm(*args, **kwargs, log=lambda line: print(f"[{name}] {line}", file=sys.stderr, flush=True))


def run_ablation(config: str, out: Path, *, sets: Sequence[str] = (), budget: int | None = None,
                 minutes: float | None = None, only: str | None = None, samples: int = 4, steps: int = 32,
                 exports: bool = True, jobs: int = 1, log: Log = print) -> dict[str, Any]:
    """``budget`` tokens per arm, or a budget that fits the whole ablation in ``minutes`` of
    wall time (``settle_budget``), or (neither) what the configured growth spends.

    ``jobs`` arms run side by side, each in its own process with the cores shared out
    (``threads_per_job``): on a small CPU machine the arms' fixed costs (process start, model
    building, evaluation, sampling) use one core badly, so two arms at a time finish sooner
    than one at a time with two threads."""
    import time

    from grow.config import load_config

    started = time.perf_counter()
    base = load_config(config, list(sets))  # the user's config must be valid on its own
    arms = choose_arms(only)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(jobs)
    chosen = settle_budget(config, out, base, arms, sets=sets, budget=budget, minutes=minutes, samples=samples,
                           steps=steps, exports=exports, jobs=jobs, log=log)
    budget = chosen["budget_tokens"]
    (out / "arms").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    todo: list[tuple[Arm, Path, list[str]]] = []
    tokenizer = chosen["tokenizer"]  # the calibration's, when there was one
    for i, arm in enumerate(arms, 1):
        run = out / "arms" / arm.name
        done = run / "ablation.json"
        if done.is_file():
            results[arm.name] = json.loads(done.read_text())
            log(f"ablate: [{i}/{len(arms)}] {arm.name}: done earlier")
            tokenizer = tokenizer or run / "tokenizer"
            continue
        arm_sets = [*sets, *arm.sets]
        try:
            arm_sets += budget_sets(config, arm_sets, budget)
            load_config(config, arm_sets)
        except UserError as exc:
            skipped[arm.name] = str(exc)
            log(f"ablate: [{i}/{len(arms)}] {arm.name}: skipped ({exc})")
            continue
        todo.append((arm, run, arm_sets))
    earlier = set(results)
    kw = dict(budget=budget, samples=samples, steps=steps, exports=exports)

    def here(arm: Arm, run: Path, arm_sets: list[str]) -> None:
        log(f"ablate: {arm.name}: {arm.what}")
        try:
            results[arm.name] = run_arm(arm, run, config, arm_sets, **kw, log=log)
        except UserError as exc:  # one arm that cannot train does not cost the others
            skipped[arm.name] = str(exc)
            log(f"ablate: {arm.name}: {exc}")

    if todo and tokenizer is None:
        # Every arm reads the same tokens with one tokenizer: the first arm's, trained before the
        # others start (arms side by side would each train their own).
        arm, run, arm_sets = todo.pop(0)
        here(arm, run, arm_sets)
        tokenizer = run / "tokenizer" if (run / "tokenizer").is_dir() else None
    todo = [(a, r, [*s, f"data.tokenizer={tokenizer}"] if tokenizer else s) for a, r, s in todo]
    if jobs > 1 and len(todo) > jobs:
        # Longest first (by the planner's FLOPs per token), so that no long arm is left to run
        # alone at the end while the other cores idle.
        factors = chosen.get("factors") or cost_factors(config, sets, [a for a, _, _ in todo], log)
        todo.sort(key=lambda t: -factors.get(t[0].name, 1.0))
    if jobs <= 1:
        for arm, run, arm_sets in todo:
            here(arm, run, arm_sets)
    elif todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        log(f"ablate: {len(todo)} arm(s), {jobs} at a time with {threads} thread(s) each; "
            "each arm's training log is its run's train.log")
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start, initargs=(threads,)) as pool:
            futures = {pool.submit(_worker_arm, arm, run, config, arm_sets, **kw, threads=threads, quiet=True): arm
                       for arm, run, arm_sets in todo}
            for future in as_completed(futures):
                arm = futures[future]
                try:
                    results[arm.name] = future.result()
                    log(f"ablate: {arm.name}: done in {results[arm.name]['wall_seconds']:.0f} s")
                except UserError as exc:
                    skipped[arm.name] = str(exc)
                    log(f"ablate: {arm.name}: {exc}")
    previous = out / "ablation.json"
    calls = json.loads(previous.read_text()).get("calls", []) if previous.is_file() else []
    calls.append({"seconds": time.perf_counter() - started, "jobs": jobs,
                  "arms": [n for n in results if n not in earlier]})
    order = [a.name for a in arms]
    results = {n: results[n] for n in order if n in results}
    summary = {"config": config, "sets": list(sets), "budget_tokens": budget, "budget": chosen,
               "schedule": base.ratios(), "arms": results, "skipped": skipped, "jobs": jobs,
               "threads_per_job": threads,
               # what this call took, its calibration included; arms done by earlier calls are not in it
               "wall_seconds": calls[-1]["seconds"], "calls": calls,
               "arm_seconds": sum(r.get("wall_seconds", 0.0) for r in results.values())}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ablation.md").write_text(render_markdown(summary))
    if results:
        plot(summary, out / "ablation.png")
    return summary


# --------------------------------------------------------------------------- reporting


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def whole(result: dict[str, Any]) -> list[float]:
    return [e["whole"] for e in result["levels"]]


def path(result: dict[str, Any]) -> list[float] | None:
    if any("path" not in e for e in result["levels"]):
        return None
    return [e["path"] for e in result["levels"]]


def judged(result: dict[str, Any]) -> dict[str, Any]:
    """The samples the bigram judge compares: the iterative sampler's, or, for a replacement-noise
    model (which has no [MASK] to unmask), the refine sampler's."""
    s = result["samples"]
    return s.get("iterative") or s.get("refine") or {}


def render_markdown(summary: dict[str, Any]) -> str:
    arms = summary["arms"]
    ratios = summary["schedule"]
    lines = [f"# Ablation of `{summary['config']}`", ""]
    lines += [f"Budget: {summary['budget_tokens']:,} training tokens per arm (steps x batch x sequence length "
              "over all its stages; rounding to whole steps moves it slightly)"
              + (f", chosen by {describe_budget(summary['budget'])}" if summary.get("budget") else "") + ".", ""]
    if summary.get("wall_seconds"):
        c = (summary.get("budget") or {}).get("calibration")
        jobs = summary.get("jobs", 1)
        calls = summary.get("calls", [])
        lines += [(f"Wall time: {sum(k['seconds'] for k in calls):,.0f} s over {len(calls)} calls of the same "
                   f"command (the last, which wrote this, {summary['wall_seconds']:,.0f} s)" if len(calls) > 1 else
                   f"Wall time of the call that wrote this: {summary['wall_seconds']:,.0f} s")
                  + (f"; the calibration took {c['seconds']:.0f} s" if c else "")
                  + (f"; arms ran {jobs} at a time, {summary['threads_per_job']} thread(s) each"
                     if jobs > 1 else "")
                  + ". An arm's wall s is its training and measuring by the call that finished it.", ""]
    lines += ["Held-out masked CE (nats/token) averaged over the schedule's levels, through the whole stack "
              "(what an export and the iterative / semi-AR samplers run) and through each level's own path "
              "(what the depth sampler runs); the MDLM bound of the whole stack; samples' perplexity under a "
              "bigram model of the training split (lower = more corpus-like), distinct bigrams and 4-gram "
              "repetition of iterative samples (refine samples for uniform and duo, which have no [MASK] to unmask).", "",
              "| arm | what | tokens | train s | wall s | peak | whole CE | path CE | bits/token | sample n-gram ppl | "
              "distinct-2 | repetition | depth tok/s | iterative tok/s | semi-ar tok/s | refine tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in arms.items():
        p = path(r)
        it = judged(r)
        tps = [f"{r['samples'][m]['tokens_per_s']:.0f}" if m in r["samples"] else "-"
               for m in ("depth", "iterative", "semi-ar", "refine")]
        wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-"  # not recorded before --minutes
        # replacement noise has no MDLM bound: its CE is over every token, not a masking ELBO
        bits = f"{r['elbo']['bits_per_token']:.3f}" if r.get("elbo") else "-"
        lines.append(
            f"| {name} | {r['what']} | {r['tokens']:,} | {r['train_seconds']:.0f} | "
            f"{wall} | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{_mean(whole(r)):.4f} | {f'{_mean(p):.4f}' if p else '-'} | {bits} | "
            f"{it.get('ngram_ppl', float('nan')):.1f} | {it.get('distinct_2', float('nan')):.3f} | "
            f"{it.get('repetition', float('nan')):.3f} | {' | '.join(tps)} |")
    header = "| arm | " + " | ".join(f"r={r:g}" for r in ratios) + " |"
    rule = "|---|" + "---|" * len(ratios)
    lines += ["", "Whole-stack CE per level:", "", header, rule]
    lines += [f"| {n} | " + " | ".join(f"{x:.4f}" for x in whole(r)) + " |" for n, r in arms.items()]
    lines += ["", "Path CE per level (depth-tied arms):", "", header, rule]
    lines += [f"| {n} | " + " | ".join(f"{x:.4f}" for x in path(r)) + " |" for n, r in arms.items() if path(r)]
    exported = {n: r["exports"] for n, r in arms.items() if r.get("exports")}
    if exported:
        lines += ["", "Whole-stack CE of the export, mean over levels, per merge mode:", "",
                  "| arm | dequantized | original |", "|---|---|---|"]
        lines += [f"| {n} | {_mean(e['dequantized']):.4f} | {_mean(e['original']):.4f} |" for n, e in exported.items()]
    refused = {n: r["export_refused"] for n, r in arms.items() if r.get("export_refused")}
    if refused:
        lines += ["", "No stock export: " + "; ".join(f"{n} ({why})" for n, why in refused.items())]
    if summary["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{n} ({why})" for n, why in summary["skipped"].items())]
    lines += ["", "## Conclusions", "", conclusions(summary), ""]
    return "\n".join(lines)


def conclusions(summary: dict[str, Any]) -> str:
    """A paragraph written from the numbers: growth against the joint baseline, then what each
    switched-off part costs or gains, largest first. Differences under 0.005 nats are called ties:
    at the tiny budget, seeds alone move CE by more than that."""
    arms = summary["arms"]
    if "grow" not in arms:
        return "No `grow` arm was measured, so nothing is compared against the configured growth."
    g = arms["grow"]
    gw, out = _mean(whole(g)), []

    def cmp(delta: float) -> str:
        if abs(delta) < 0.005:
            return "ties with"
        return "is worse than" if delta > 0 else "beats"

    if "joint" in arms:
        j = arms["joint"]
        d = _mean(whole(j)) - gw
        lvl = [r for r, a, b in zip(summary["schedule"], whole(j), whole(g)) if a < b]
        out.append(f"At the same token budget, the joint baseline {cmp(d)} growth through the whole stack "
                   f"({_mean(whole(j)):.4f} vs {gw:.4f} nats, mean over levels"
                   + (f"; joint is better at r = {', '.join(f'{r:g}' for r in lvl)}" if lvl else "") + "), "
                   f"at {j['peak_bytes'] / max(g['peak_bytes'], 1):.2f}x growth's peak memory "
                   f"({g['peak_kind']}).")
    apart = [n for n, r in arms.items() if r.get("ce_on", "masked tokens") != g.get("ce_on", "masked tokens")]
    deltas = sorted(((_mean(whole(r)) - gw, n) for n, r in arms.items() if n not in ("grow", "joint", *apart)),
                    reverse=True)
    for d, n in deltas:
        out.append(f"`{n}` ({arms[n]['what']}) {cmp(d)} growth as configured by {abs(d):.4f} nats.")
    if apart:
        out.append(f"{', '.join(f'`{n}`' for n in apart)} take their CE over {arms[apart[0]]['ce_on']}, not "
                   f"over {g.get('ce_on', 'masked tokens')} as `grow` does, so their CE is not compared; their "
                   "samples are, by the bigram judge.")
    best = min(arms, key=lambda n: judged(arms[n]).get("ngram_ppl", float("inf")))
    it = judged(arms[best])
    if it:
        # A bigram judge rewards frequent pairs, repeated ones included: say how repetitive they are.
        out.append(f"The most corpus-like samples by the bigram judge come from `{best}` (perplexity "
                   f"{it['ngram_ppl']:.1f}, 4-gram repetition {it['repetition']:.2f}"
                   + ("; that low perplexity is mostly repeated frequent pairs" if it["repetition"] > 0.3 else "")
                   + ").")
    return " ".join(out)


def plot(summary: dict[str, Any], path_png: Path) -> None:
    """CE per level per arm: [MASK] arms on the left; arms whose CE covers every token (replacement
    noise), which would squash the others' scale and do not compare with them, on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = summary["schedule"]
    groups = {}
    for n, r in summary["arms"].items():
        groups.setdefault(r.get("ce_on", "masked tokens"), []).append(n)
    fig, axes = plt.subplots(1, len(groups), figsize=(8 + 4 * (len(groups) - 1), 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # one colour per arm, up to twenty
    for ax, (ce_on, names) in zip(axes[0], groups.items()):
        for n in names:
            r = summary["arms"][n]
            color = colors[list(summary["arms"]).index(n) % len(colors)]
            ax.plot(ratios, whole(r), marker="o", color=color, label=n)
            if path(r):
                ax.plot(ratios, path(r), linestyle="--", color=color, alpha=0.6)
        ax.set_xlabel("noise level r")
        ax.set_ylabel(f"held-out CE over {ce_on} (nats/token)")
        ax.legend(fontsize=7)
    fig.suptitle("CE per level per arm, whole stack (dashed: each level's own path)")
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)

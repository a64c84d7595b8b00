"""``grow`` command line: one function per subcommand, mapped in ``COMMANDS``.

User mistakes raise ``UserError``; ``main`` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from grow.errors import UserError
from grow.store import write_text_atomic

# Settings that define blocks already grown (or how they are rebuilt): a resume may not change them.
CRITICAL_SECTIONS = ("model", "schedule", "curriculum", "quant")
CRITICAL_FIELDS = ("data.seq_len", "data.tokenizer", "data.vocab_size", "stability.spectral_norm",
                   "lora.enabled", "lora.rank", "lora.alpha", "lora.targets", "lora.blocks")


def _log_to(run: Path | None):
    """A logger that prints above progress bars and appends to RUN/train.log."""
    from tqdm.auto import tqdm

    def log(line: str) -> None:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        if run is not None and run.is_dir():
            try:
                with open(run / "train.log", "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            except OSError:  # a full disk must not stop training over a log line (it was printed)
                pass

    return log


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def critical_changes(old: dict, new: dict) -> list[str]:
    """Settings that define the already-grown blocks and may not change on resume."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if k.split(".")[0] in CRITICAL_SECTIONS or k in CRITICAL_FIELDS]
    return [k for k in keys if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------ train


def cmd_train(args: argparse.Namespace) -> None:
    from grow.config import load_config

    overrides = list(args.set or [])
    if args.deepspeed:
        overrides.append(f"train.deepspeed={args.deepspeed}")
    run = Path(args.out)
    stored_yaml = run / "grow.yaml"
    # A resumed run's converted model is in its stage 1: its shape stands in for a checkpoint
    # that is no longer reachable (grow.convert.resolve_init_from).
    stored_model = ((yaml.safe_load(stored_yaml.read_text()) or {}).get("model")
                    if (args.resume or args.from_stage is not None) and stored_yaml.is_file() else None)
    cfg = load_config(args.config, overrides, stored_model=stored_model)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: choose one")
    from grow.curriculum import find_stage, stage_specs

    specs = stage_specs(cfg)
    from_stage = find_stage(specs, args.from_stage, "--from-stage") if args.from_stage is not None else None
    stop_after = find_stage(specs, args.stop_after, "--stop-after") if args.stop_after is not None else None
    if from_stage is not None:
        args.resume = True
    from grow.lock import DirLock
    from grow.stages import Backend, grow_run

    # Every rank builds its backend; only rank 0 checks, locks and writes the run.
    backend = Backend(cfg)
    lock = DirLock(run, "grow train", flag="--out") if backend.is_main else None
    error, corpus, log = None, None, (lambda line: None)
    try:
        if backend.is_main:
            try:
                lock.acquire()
                corpus, log = _prepare_run(cfg, run, args, specs, from_stage)
            except UserError as exc:
                error = str(exc)
        error = _broadcast(backend, error)
        if error is not None:
            raise UserError(error)
        if not backend.is_main:
            from grow.data import load_corpus

            # rank 0 has prepared (or checked) the corpus: map the same files, never re-tokenize
            corpus = load_corpus(cfg.data, run / "tokenizer", cfg.train.seed, log=log, prepare_missing=False)
        ratios = cfg.ratios()
        c = cfg.curriculum
        log(f"growing {cfg.model.num_blocks} blocks ({c.kind}, time {c.time}, {len(specs)} stages) into {run} on "
            f"{backend.world} process(es), {backend.device}; r = {', '.join(f'{r:.3f}' for r in ratios)}")
        if from_stage is not None and backend.is_main:
            set_aside(run, specs[from_stage.index - 1:], log)
        backend.barrier()
        from grow.checkpoint import install_sigterm_handler

        install_sigterm_handler()
        grow_run(cfg, run, corpus, log=log, stop_after=stop_after.name if stop_after else None, backend=backend)
    finally:
        if lock is not None:
            lock.release()


def _prepare_run(cfg, run: Path, args, specs, from_stage):
    """Check ``run`` against the flags and return (corpus, log) of a run ready to train.

    A resume reuses the run's tokenizer and rewrites grow.yaml (and run.json) only once the
    config and data have checked out. A fresh start (or --overwrite) is built in a hidden
    sibling -- tokenizer, corpus, model shape, grow.yaml -- and only that complete start
    replaces what was at ``run``: a failed start leaves everything as it was.
    """
    from grow.data import load_corpus
    from grow.store import write_run_config, write_run_manifest

    if run.exists() and not run.is_dir():
        raise UserError(f"--out: {run} exists and is not a directory")
    inside = next((p for p in run.absolute().parents if (p / "grow.yaml").is_file()), None)
    if inside is not None:
        raise UserError(f"--out: {run} is inside the grow run {inside}; choose a directory outside every run")
    exists = run.is_dir() and any(run.iterdir())
    if exists and not (args.resume or args.overwrite):
        raise UserError(f"--out: {run} exists and is not empty; pass --resume to continue it or --overwrite to replace it")
    if args.resume:
        _check_resume(cfg, run, exists, specs, from_stage)
        log = _log_to(run)
        corpus = load_corpus(cfg.data, run / "tokenizer", cfg.train.seed, log=log)
        write_run_config(run, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return corpus, log
    tmp = run.absolute().with_name(f".{run.absolute().name}.start-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if cfg.model.init_from:  # the checkpoint's tokenizer (+ a mask token) is the run's
            from grow.convert import save_run_tokenizer

            save_run_tokenizer(cfg.model.init_from, tmp / "tokenizer", _log_to(tmp))
        corpus = load_corpus(cfg.data, tmp / "tokenizer", cfg.train.seed, log=_log_to(tmp))
        _check_model_shape(cfg, corpus.tokenizer)
        write_text_atomic(tmp / "grow.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_run_manifest(tmp)
        _replace_run(tmp, run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return corpus, _log_to(run)


def _check_resume(cfg, run: Path, exists: bool, specs, from_stage) -> None:
    """What --resume needs of the stored run: a run, unchanged files, the same architecture and engine."""
    from grow.checkpoint import checkpoint_engine, checkpoint_root, latest_checkpoint
    from grow.stages import committed, read_run_config, repair_command
    from grow.store import check_run_files

    if not exists:
        raise UserError(f"--resume: {run} has no run to resume; start it without --resume")
    stored = run / "grow.yaml"
    if not stored.is_file():
        raise UserError(f"--resume: {run} is not a grow run (no grow.yaml); start afresh there with --overwrite")
    check_run_files(run, _log_to(run))
    # Through today's dataclasses, so a field added since the run started counts at its default.
    old = read_run_config(run)
    changed = critical_changes(old.to_dict(), cfg.to_dict())
    if changed:
        raise UserError(f"--resume: architecture-critical settings differ from the stored run: {', '.join(changed)}")
    stages, problem = committed(run, specs, verify=False)  # sizes only; grow_run checks every hash
    if from_stage is not None and from_stage.index <= len(stages) + 1:
        return  # the stages from there on are set aside
    if problem:
        raise UserError(f"RUN: {problem}; re-run from it with {repair_command(run, old, len(stages) + 1)}")
    if len(stages) >= len(specs):
        return
    ckpt = latest_checkpoint(checkpoint_root(run, specs[len(stages)].name), log=lambda line: None)
    if ckpt is None:
        return
    # A DeepSpeed checkpoint holds DeepSpeed's files, a plain one trainable.safetensors: neither engine reads the other.
    written = checkpoint_engine(ckpt)
    if written == "deepspeed" and not cfg.train.deepspeed:
        raise UserError(f"--deepspeed: {ckpt} was saved under DeepSpeed; resume with --deepspeed "
                        f"{old.train.deepspeed or 'JSON'} (or re-run the stage with --from-stage {len(stages) + 1})")
    if written == "plain" and cfg.train.deepspeed:
        raise UserError(f"--deepspeed: {ckpt} was saved without DeepSpeed; resume without --deepspeed "
                        f"(or re-run the stage under DeepSpeed with --from-stage {len(stages) + 1})")


def _check_model_shape(cfg, tokenizer) -> None:
    """Build the run's empty model on the meta device: the shape errors a first stage would hit, now."""
    import torch

    from grow.assemble import build_model

    with torch.device("meta"):
        build_model(cfg, tokenizer)


def _replace_run(tmp: Path, run: Path) -> None:
    """Put the complete start ``tmp`` at ``run``; an old run there is removed only after that.

    Over an old run the two directories are exchanged in one step where the kernel can
    (renameat2 RENAME_EXCHANGE), so no moment exists at which RUN is missing; elsewhere the old
    run is renamed aside first.
    """
    from grow.store import fsync_dir

    old = None
    if run.is_dir() and any(run.iterdir()):
        if _exchange(tmp, run):
            old = tmp
        else:
            old = run.absolute().with_name(f".{run.absolute().name}.old-{os.getpid()}")
            os.rename(run, old)
            os.rename(tmp, run)
    else:
        if run.is_dir():
            run.rmdir()
        run.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, run)
    fsync_dir(run.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        rename = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return rename(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _broadcast(backend, value):
    """Rank 0's value on every rank (so an error on rank 0 stops all ranks with the same message)."""
    if backend.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def set_aside(run: Path, specs, log) -> None:
    """Move the directories (and checkpoints) of stages ``specs`` and of any later stage into
    RUN/set-aside-<time>/, never deleting."""
    from grow.store import STAGE_NAME, stage_paths

    first = specs[0].index
    target = run / f"set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    later = [p for p in stage_paths(run) if int(STAGE_NAME.fullmatch(p.name)[1]) >= first]
    ckpts = [p for p in (run / "checkpoints").glob("stage-*")] if (run / "checkpoints").is_dir() else []
    later += [p for p in ckpts if STAGE_NAME.fullmatch(p.name) and int(STAGE_NAME.fullmatch(p.name)[1]) >= first]
    moved = []
    for path in later:
        dest = target / path.relative_to(run)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dest)
        moved.append(str(path.relative_to(run)))
    if moved:
        log(f"--from-stage {first}: moved {', '.join(moved)} to {target}")


# ------------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int | None:
    from grow.checkpoint import checkpoint_root, latest_checkpoint
    from grow.curriculum import level_paths, stage_specs
    from grow.evaluate import levels_table
    from grow.stages import committed, invalid_next, read_run_config, repair_command
    from grow.store import leftovers, list_stages, require_run, run_problem, stage_paths, stage_problem
    from grow.units import format_bytes

    run = require_run(Path(args.run))
    config = read_run_config(run)
    specs = stage_specs(config)
    stages, problem = committed(run, specs, verify=args.verify)
    listed = list_stages(run, verify=args.verify)
    paths = {p.name: p for p in stage_paths(run)}
    c = config.curriculum
    print(f"run {run}: {config.model.num_blocks} blocks, hidden {config.model.hidden_size}, data {config.data.source}, "
          f"curriculum {c.kind} (time {c.time}), {len(specs)} stages")
    print(f"{'stage':<18}  {'trains':<10}  {'noise':<20}  {'steps':>6}  {'tokens':>12}  {'heldout_ce':>10}  "
          f"{'size':>10}  state")
    for spec in specs:
        trains = ",".join(f"B{k}" for k in spec.train) if len(spec.train) <= 2 else f"B{spec.train[0]}..B{spec.train[-1]}"
        trains = ("converted" if spec.converted
                  else (trains or "adapters") + ("+ends" if spec.trains_ends else ""))
        stage = listed.get(spec.index)
        if spec.index <= len(stages):
            m = stage.manifest
            print(f"{spec.name:<18}  {trains:<10}  {spec.noise.describe():<20}  {m['steps']:>6}  "
                  f"{m['tokens_seen']:>12,}  {m['heldout_ce']:>10.4f}  {format_bytes(stage.size_bytes()):>10}  done")
            continue
        path = paths.get(spec.name)
        if spec.index == len(stages) + 1 and problem and path is not None:
            state = f"invalid: {stage_problem(path, args.verify) or problem}"
        elif stage is not None:
            state = "ignored: follows a missing or invalid stage"
        elif path is not None:
            state = f"invalid: {stage_problem(path, args.verify)}"
        else:
            state = "pending"
        ckpt = latest_checkpoint(checkpoint_root(run, spec.name), log=lambda s: None)
        if ckpt is not None:
            state += f", checkpoint at step {int(ckpt.name.split('-')[1])}/{spec.steps}"
        print(f"{spec.name:<18}  {trains:<10}  {spec.noise.describe():<20}  {'-':>6}  {'-':>12}  {'-':>10}  "
              f"{'-':>10}  {state}")
    if stages:
        last = stages[-1].manifest
        if "levels" in last:
            from grow.corruption import corruption_for

            what = "CE on every token" if corruption_for(config).replaces_tokens else "masked CE"
            print(f"\nheld-out {what} per level, the model as {stages[-1].name} left it "
                  "(path = the blocks a depth sampler uses for that level; whole stack = what an export runs):")
            from grow.evaluate import commit_figures

            commits = commit_figures(run)
            rows = []
            for k, r in enumerate(config.ratios(), start=1):
                e = {"level": k, "ratio": r, "whole": last["levels"]["whole"][str(k)]}
                if str(k) in last["levels"]["path"]:
                    e["path"] = last["levels"]["path"][str(k)]
                    e["path_blocks"] = list(level_paths(config)[k])
                if k in commits:
                    e["commit"] = commits[k]["ce"]
                    if "path" in e:
                        e["drift"] = e["path"] / e["commit"] - 1
                rows.append(e)
            print("\n".join(levels_table(rows)))
        print("\nmemory per stage (model state = trained blocks + grads + optimizer + frozen blocks + adapters + ends):")
        print(f"{'stage':<18}  {'trainable':>11}  {'model state':>11}  {'frozen 4-bit':>12}  {'B/param':>7}  "
              f"{'adapters':>9}  {'peak':>10}  peak kind")
        for stage in stages:
            mem = stage.manifest["memory"]
            q = mem["frozen_4bit"]
            print(f"{stage.name:<18}  {mem['trainable_params']:>11,}  {format_bytes(mem['model_state_bytes']):>11}  "
                  f"{format_bytes(q['bytes']):>12}  {q['bytes_per_param']:>7.3f}  "
                  f"{mem['adapters']['params']:>9,}  {format_bytes(mem['peak_bytes']):>10}  {mem['peak_kind']}")
    ds = f" --deepspeed {config.train.deepspeed}" if config.train.deepspeed else ""
    from grow.lock import holder

    writer = holder(run)
    if writer is not None:
        print(f"\nbeing written now by {writer}")
    found = leftovers(run)
    if found:
        print("\nleftovers (removed when the run continues): "
              + "; ".join(f"{p.relative_to(run)} ({why})" for p, why in found))
    files = run_problem(run) if args.verify else None
    if files is not None:
        print(f"\nproblem: {files}")
    broken = invalid_next(run, specs, stages, args.verify)
    if problem or broken:
        bad = specs[len(stages)]
        print(f"\nproblem: {problem or broken}\nnext: {repair_command(run, config, bad.index)} re-runs "
              f"{bad.name} and the stages after it (the later ones are set aside, not deleted)")
    elif len(stages) < len(specs):
        spec = specs[len(stages)]
        ckpt = latest_checkpoint(checkpoint_root(run, spec.name), log=lambda s: None)
        where = f"from its checkpoint at step {int(ckpt.name.split('-')[1])}" if ckpt else "from step 0"
        print(f"\nnext: grow train {run / 'grow.yaml'} --out {run} --resume{ds} continues {spec.name} "
              f"({spec.noise.describe()}) {where}")
    else:
        print("\ncomplete: every stage is committed" + (", but see the problem above" if files else ""))
    return 1 if (problem or broken or files) and args.verify else None


# ------------------------------------------------------------------------ plan


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from grow.config import load_config
    from grow.plan import fit, plan, read_deepspeed, render
    from grow.units import parse_bytes

    from grow.convert import CheckpointUnavailable

    try:
        cfg = load_config(args.config, args.set or [])
    except CheckpointUnavailable as exc:  # planning needs the shape, not the weights
        cfg = load_config(args.config, args.set or [], checkpoint=False)
        print(f"note: {exc}; planning the architecture the config spells out")
    try:
        gpu_memory = parse_bytes(args.gpu_memory)
    except ValueError as exc:
        raise UserError(f"--gpu-memory: {exc}") from None
    if args.grad_ckpt not in (None, "on", "off"):
        raise UserError(f"--grad-ckpt: expected on or off, got {args.grad_ckpt!r}")
    options = dict(
        gpus=args.gpus, gpu_memory=gpu_memory, deepspeed=read_deepspeed(args.deepspeed) if args.deepspeed else None,
        seq_len=args.seq_len, grad_ckpt=None if args.grad_ckpt is None else args.grad_ckpt == "on",
        throughput=args.throughput,
    )
    if not args.fit:
        result = plan(cfg, micro_batch=args.micro_batch, **options)
        print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
        return
    if args.micro_batch is not None:
        raise UserError("--micro-batch: --fit chooses the micro-batch; pass one or the other")
    found = fit(cfg, **options)
    if args.json:
        print(json.dumps(found.plan.to_dict() | {"fit": found.to_dict()}, indent=2))
    else:
        print(render(found.plan) + "\n\n" + found.summary())


# ------------------------------------------------------------------------ sample


def cmd_sample(args: argparse.Namespace) -> None:
    import json

    import torch

    from grow.engine import resolve_device
    from grow.inference import load_denoiser
    from grow.sample import animate, check_mode, generate, prompt_batch, to_json

    at_least("--length", args.length, 1)
    at_least("--num-samples", args.num_samples, 1)
    at_most("--num-samples", args.num_samples, MAX_BATCH)
    at_least("--block-length", args.block_length, 1)
    at_least("--steps", args.steps, 1)
    at_least("--context", args.context, 0)
    at_least("--temperature", args.temperature, 0.0)
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p: expected a probability mass in (0, 1], got {args.top_p}")
    if not 0.0 <= args.remask < 1.0:
        raise UserError(f"--remask: expected a fraction in [0, 1), got {args.remask}")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise UserError(f"--threshold: expected a confidence in (0, 1], got {args.threshold}")
    device = resolve_device(args.device)
    loaded = load_denoiser(args.model, device)
    ids = loaded.tokenizer(args.prompt, add_special_tokens=False)["input_ids"] if args.prompt else []
    trained = loaded.config.data.seq_len if loaded.config is not None else loaded.meta.get("seq_len")
    positions = getattr(loaded.model.config, "max_position_embeddings", None) or float("inf")
    if trained and trained < len(ids) + args.length <= positions:  # past the positions: an error follows
        print(f"warning: {len(ids) + args.length} tokens (prompt + --length) is more than the {trained} the model "
              "was trained on (data.seq_len); quality past that length is untested", file=sys.stderr)
    check_mode(args.mode, loaded.corruption, loaded.paths is not None, str(args.model))
    tokenizer = loaded.tokenizer
    prompt = prompt_batch(ids, args.num_samples, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = {"steps": args.steps, "temperature": args.temperature, "top_p": args.top_p,
               "threshold": args.threshold, "remask": args.remask, "block_length": args.block_length,
               "context": args.context}
    start = time.perf_counter()
    result = generate(loaded.model, prompt, args.length, args.mode, mask_id=loaded.mask_id, ratios=loaded.ratios,
                      paths=loaded.paths, generator=generator, **options)
    seconds = time.perf_counter() - start
    if args.json:
        record = to_json(result, tokenizer, seconds=seconds, model=str(args.model), source=loaded.source,
                         mode=args.mode, prompt=args.prompt, length=args.length, seed=args.seed, options=options)
        print(json.dumps(record))
        return
    if args.show and sys.stdout.isatty():
        animate(result, tokenizer, loaded.mask_id, sys.stdout)
        for row in result.tokens[1:].tolist():
            print(tokenizer.decode(row, skip_special_tokens=True))
        return
    for i, row in enumerate(result.tokens.tolist()):
        if i:
            print("---")
        print(tokenizer.decode(row, skip_special_tokens=True))


# ------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from grow.engine import resolve_device
    from grow.evaluate import (DEFAULT_GRID, evaluate_denoiser, format_report, heldout_for, parse_ratios,
                               plot_report)
    from grow.inference import load_denoiser

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    if args.tasks:  # lm-evaluation-harness tasks instead of grow's own report (grow.harness)
        return _eval_tasks(args)
    grid = parse_ratios(args.ratios) if args.ratios else list(DEFAULT_GRID)
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        at_least(flag, value, 1)
    at_most("--batch-size", args.batch_size, MAX_BATCH)
    for flag, target in (("--json", args.json), ("--plot", args.plot)):
        if target is not None:
            writable_file(flag, Path(target))
    if args.levels and args.plot:
        raise UserError("--plot: the plot draws the CE curves, which --levels skips; drop one of them")
    if args.samples < 0:
        raise UserError(f"--samples: expected >= 0 samples per sampler, got {args.samples}")
    device = resolve_device(args.device)
    loaded = load_denoiser(args.model, device, log=log)
    heldout, seed = heldout_for(loaded, args.data, seed=args.seed, log=log)
    run_cfg = loaded.config
    batches = args.batches or (run_cfg.train.eval_batches if run_cfg else 4)
    batch_size = args.batch_size or (run_cfg.train.batch_size if run_cfg else 16)
    report = evaluate_denoiser(loaded, heldout, grid=grid, batches=batches, batch_size=batch_size, seed=seed,
                               samples=args.samples, steps=args.steps, levels_only=args.levels, log=log)
    print(format_report(report))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
        log(f"eval: wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        log(f"eval: wrote {args.plot}")


def _eval_tasks(args: argparse.Namespace) -> None:
    if args.levels or args.plot or args.ratios or args.data:
        raise UserError("--tasks: runs lm-eval tasks; --levels, --plot, --ratios and --data apply to grow's own report")
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--tasks: needs lm-eval, the eval extra: pip install -e '.[eval]'")
    from grow import harness

    results = harness.evaluate_tasks(args.model, args.tasks, mc_num=args.mc_num, batch_size=args.batch_size or 32,
                                     seed=args.seed, limit=args.limit, device=args.device)
    print(harness.results_table(results))
    if args.json:
        Path(args.json).write_text(harness.results_json(results))
        print(f"eval: wrote {args.json}", file=sys.stderr)


# ------------------------------------------------------------------------ ablate


def cmd_ablate(args: argparse.Namespace) -> None:
    from grow.ablate import run_ablation

    if args.budget is not None and args.budget < 1:
        raise UserError(f"--budget: expected a positive number of tokens, got {args.budget}")
    if args.samples < 0 or args.steps < 1:
        raise UserError("--samples must be >= 0 and --steps >= 1")
    if args.minutes is not None and not 0 < args.minutes < float("inf"):
        raise UserError(f"--minutes: expected a positive number of minutes, got {args.minutes:g}")

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    out = Path(args.out)
    run_ablation(args.config, out, sets=args.set or [], budget=args.budget, minutes=args.minutes, only=args.only,
                 samples=args.samples, steps=args.steps, exports=not args.no_export, log=log)
    print((out / "ablation.md").read_text())
    log(f"ablate: wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")


# ------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int | None:
    from grow.export import HubError, check_repo_id, export_run, hub_token, push_to_hub, retry_hint

    repo_id = args.push_to_hub
    hub_flags: list[str] = []
    if repo_id is not None:
        # Before any work: a bad repo id or a missing login should not cost an export.
        check_repo_id(repo_id)
        if hub_token() is None:
            raise UserError("--push-to-hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login` first")
        hub_flags = ["--push-to-hub", repo_id, *(["--private"] if args.private else []),
                     *(["--revision", args.revision] if args.revision else [])]
    elif args.private or args.revision:
        raise UserError("--private/--revision: only meaningful with --push-to-hub REPO_ID")
    out = Path(args.out)
    export_run(args.run, out, dtype=args.dtype, merge_into=args.merge_into, max_shard_size=args.max_shard_size,
               overwrite=args.overwrite, command_extra=hub_flags, card_name=repo_id)
    if repo_id is None:
        return
    try:
        push_to_hub(out, repo_id, private=args.private, revision=args.revision)
    except HubError as exc:  # not a user-input error: exit 1, the local export stays
        print(f"grow: error: --push-to-hub: upload to {repo_id} failed ({exc}); the export in {out} is complete, "
              f"retry with: {retry_hint(repo_id, out, args.revision, args.private)} "
              "(or re-run this command with --overwrite)", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------ data


def cmd_data(args: argparse.Namespace) -> int | None:
    return {"prepare": cmd_data_prepare, "inspect": cmd_data_inspect}[args.data_command](args)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from grow.config import DataConfig
    from grow.data import prepare_corpus
    from grow.units import parse_bytes

    start = time.perf_counter()
    try:
        cfg = DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         seq_len=args.seq_len, text_field=args.text_field, hub_split=args.hub_split,
                         streaming=args.streaming, max_documents=args.max_documents,
                         heldout_fraction=args.heldout_fraction, heldout_max_documents=args.heldout_max_documents,
                         num_proc=args.num_proc)
        try:
            shard_bytes = parse_bytes(args.shard_size)
        except ValueError as exc:
            raise UserError(f"--shard-size: {exc}") from None
        m = prepare_corpus(cfg, Path(args.out), seed=args.seed, shard_bytes=shard_bytes, overwrite=args.overwrite)
    except UserError as exc:
        raise UserError(_as_flag(str(exc))) from None
    seconds = time.perf_counter() - start
    tokens = m["tokens"]["train"] + m["tokens"]["heldout"]
    for line in _describe_corpus(Path(args.out), m):
        print(line)
    print(f"prepared in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s with {m['num_proc']} process(es))")


def _as_flag(message: str) -> str:
    """A DataConfig error names its field (data.seq_len); grow data prepare's user typed --seq-len."""
    import re

    match = re.match(r"data\.(\w+):", message)
    if match is None:
        return message
    flag = "SOURCE" if match[1] == "source" else "--" + match[1].replace("_", "-")
    return flag + message[match.end() - 1:]


def _describe_corpus(directory: Path, m: dict) -> list[str]:
    from grow.units import format_bytes

    src, tok, split = m["source"], m["tokenizer"], m["split"]
    docs, rows = m["documents"], m["rows"]
    size = sum(entry["bytes"] for entry in m["files"].values())
    origin = (f"trained BPE (vocab_size={tok['trained_vocab_size']})" if tok["origin"] == "trained"
              else tok["origin"])
    lines = [
        f"corpus     {directory} (format {m['format']} v{m['format_version']}, written {m['written_at']})",
        f"source     {src['name']} (field {src['text_field']!r}{', streamed' if src['streaming'] else ''}"
        f"{', first ' + str(src['max_documents']) + ' documents' if src['max_documents'] else ''})",
        f"documents  {docs['train'] + docs['heldout']:,}: {docs['train']:,} train, {docs['heldout']:,} held out "
        f"(seed {split['seed']}, fraction {split['heldout_fraction']}, at most {split['heldout_max_documents']:,}, "
        f"by {split['method']})",
        f"tokens     {m['tokens']['train']:,} train, {m['tokens']['heldout']:,} held out (one separator per document)",
        f"rows       {rows['train']:,} train / {rows['heldout']:,} held out of {m['seq_len']} tokens, {m['dtype']}, "
        f"{len(m['shards']['train'])} + {len(m['shards']['heldout'])} shard(s), {format_bytes(size)}",
        f"tokenizer  {origin}, {tok['size']:,} ids, separator {tok['separator_id']}, mask {tok['mask_token_id']}, "
        f"sha256 {tok['sha256'][:16]}",
    ]
    if src.get("rows_without_text"):
        lines.append(f"warning    {src['rows_without_text']:,} rows without {src['text_field']!r} text were skipped "
                     f"(first at {src['first_without_text']})")
    return lines


def cmd_data_inspect(args: argparse.Namespace) -> int | None:
    from grow.data import TokenRows, load_tokenizer
    from grow.data.shards import problem, read_manifest, stamp_time, write_stamp

    directory = Path(args.dir)
    m = read_manifest(directory, "DIR")
    for line in _describe_corpus(directory, m):
        print(line)
    found = problem(directory, m, hashes=args.verify)
    if found is not None:
        print(f"check      FAILED: {found}")
        return 1
    if args.verify:
        write_stamp(directory)
        print(f"check      all {len(m['files'])} files match their size and sha256")
    else:
        when = stamp_time(directory)
        print(f"check      all {len(m['files'])} files match their size; sha256 "
              + (f"last verified on this machine at {when}" if when else
                 "not checked since the files last changed (--verify hashes every file; so does the next "
                 "grow train that uses them)"))
    train = TokenRows.open([directory / s["file"] for s in m["shards"]["train"]])
    if not 0 <= args.row < len(train):
        raise UserError(f"--row: expected 0..{len(train) - 1}, got {args.row}")
    text = load_tokenizer(directory / "tokenizer", "DIR").decode(train.rows([args.row])[0].tolist())
    print(f"sample     train row {args.row}: {text!r}")


# ------------------------------------------------------------------------ flag checks

# The most sequences one sample/eval batch may hold: far above any useful batch on one device, far
# below what silently fills a machine's memory (--num-samples 100000000).
MAX_BATCH = 4096


def at_least(flag: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{flag}: expected at least {minimum}, got {value}")


def at_most(flag: str, value, maximum) -> None:
    if value is not None and value > maximum:
        raise UserError(f"{flag}: expected at most {maximum:,}, got {value:,}; split the work into several calls")


def writable_file(flag: str, path: Path) -> None:
    """A file the command will write at the end: refused before any work when it cannot be."""
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{flag}: the directory {path.parent} does not exist")


# ------------------------------------------------------------------------ parser

COMMANDS = {
    "train": cmd_train,
    "status": cmd_status,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "plan": cmd_plan,
    "export": cmd_export,
    "data": cmd_data,
    "ablate": cmd_ablate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grow",
        description="Grow a masked-diffusion language model one block at a time, right to left "
        "(depth = reverse diffusion time).",
    )
    import grow

    parser.add_argument("--version", action="version", version=f"grow {grow.__version__}")
    # The deepspeed launcher adds --local_rank=N right after the module name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="grow a run, stage L first (resumable)",
                       description="Grow every block of CONFIG into the run directory --out. Each finished "
                       "stage is committed as RUN/stage-kk with a manifest; a stage without one does not exist. "
                       "SIGTERM saves a mid-stage checkpoint and exits with code 143; continue with --resume.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=50 (repeatable; value is YAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run from its newest valid mid-stage checkpoint, or after its newest stage")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out with a fresh start (only "
                   "once the new start's config and data have checked out)")
    p.add_argument("--deepspeed", metavar="JSON",
                   help="run every stage under DeepSpeed ZeRO with this config (see ds_configs/); "
                   "launch with `deepspeed --num_gpus N --module grow train ...` for several processes")
    p.add_argument("--from-stage", metavar="STAGE",
                   help="re-run from this stage (its index, e.g. 3, or label, e.g. block04): keep the stages "
                   "before it, move it and the later ones aside into RUN/set-aside-<time>/ (implies --resume)")
    p.add_argument("--stop-after", metavar="STAGE", help="stop after committing this stage (index or label)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("status", help="one line per stage of a run",
                       description="Show each block's stage: noise level, steps, tokens, held-out masked CE, "
                       "size on disk, and what a resume would do next.")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against its manifest")

    p = sub.add_parser("plan", help="memory, FLOPs and wall time of every stage, without a GPU",
                       description="Plan each stage of CONFIG: trainable parameters, per-GPU bytes of weights, "
                       "grads and optimizer after ZeRO, the NF4 suffix, LoRA, ends, activations (with and without "
                       "checkpointing of the suffix), whether it fits, FLOPs per token and the wall time. "
                       "Pure arithmetic: runs in seconds for any shape.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config field, as for grow train (repeatable)")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs (default 1)")
    p.add_argument("--gpu-memory", default="80GiB", metavar="SIZE", help="memory per GPU (default 80GiB)")
    p.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config: ZeRO stage, offload, bf16 "
                   "(default: plain PyTorch, nothing partitioned)")
    p.add_argument("--micro-batch", type=int, metavar="B", help="sequences per GPU per forward (default: "
                   "train.micro_batch_size, else the JSON's train_micro_batch_size_per_gpu, else train.batch_size / N)")
    p.add_argument("--seq-len", type=int, metavar="T", help="tokens per sequence (default data.seq_len)")
    p.add_argument("--grad-ckpt", metavar="on|off", help="checkpoint the frozen suffix (default "
                   "train.checkpoint_suffix)")
    p.add_argument("--throughput", type=float, metavar="TFLOPS", help="sustained TFLOPS per GPU, for a wall time")
    p.add_argument("--fit", action="store_true", help="find the largest micro-batch per GPU at which every stage "
                   "fits and the gradient accumulation that keeps train.batch_size, and plan at it; or say why "
                   "nothing fits and what would")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("sample", help="generate text from a run or an exported model",
                       description="Generate --length tokens after --prompt with one of the samplers: depth (one "
                       "forward pass, block k = reverse step k), suffix (step k reruns blocks k..L), iterative "
                       "(full stack, --steps steps) or semi-ar (block by block with a prefix KV cache).")
    p.add_argument("model", metavar="RUN_OR_EXPORT", help="run directory or exported model directory")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: none)")
    p.add_argument("--length", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--mode", choices=("depth", "suffix", "iterative", "semi-ar", "refine"), default="depth",
                   help="sampler (default depth); refine for replacement noise (objective.corruption: uniform)")
    p.add_argument("--steps", type=int, metavar="S", help="denoising steps: iterative (default --length) or per "
                   "semi-ar block (default --block-length); depth/suffix take theirs from the schedule")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = argmax (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    p.add_argument("--threshold", type=float, metavar="C", help="iterative/semi-ar: also unmask every position "
                   "whose confidence is >= C")
    p.add_argument("--remask", type=float, default=0.0, metavar="F", help="iterative/semi-ar: re-mask this "
                   "fraction of the least confident generated tokens per step, decaying to 0 (default 0)")
    p.add_argument("--block-length", type=int, default=32, metavar="N", help="semi-ar: tokens per block (default 32)")
    p.add_argument("--context", type=int, metavar="N", help="semi-ar: generated tokens kept in view besides the "
                   "prompt (default: as many as fit)")
    p.add_argument("--num-samples", type=int, default=1, metavar="B", help="samples generated as one batch")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when present")
    p.add_argument("--show", action="store_true", help="animate the masks resolving (only on a terminal)")
    p.add_argument("--json", action="store_true", help="print one JSON object: samples, per-step trace, timing")

    p = sub.add_parser("eval", help="held-out masked CE per noise level and stage, ELBO, sampler statistics",
                       description="Measure a run or export: held-out masked CE of the full stack at each r_k and "
                       "on a grid of ratios, one curve per stage (blocks k..L), the MDLM ELBO (bits per token, "
                       "perplexity bound), and per sampler: distinct-1/2, repetition, mean length, tokens/s.")
    p.add_argument("model", metavar="RUN_OR_EXPORT", help="run directory or exported model directory")
    p.add_argument("--ratios", metavar="R1,R2,...", help="mask ratios of the grid (default 0.1,0.2,...,1.0)")
    p.add_argument("--batches", type=int, metavar="N", help="held-out batches per measurement (default: the "
                   "run's train.eval_batches, else 4)")
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences per batch (default: the run's "
                   "train.batch_size, else 16)")
    p.add_argument("--data", metavar="PATH_OR_bible", help="held-out text: a run's own corpus by default, "
                   "the bible for an export")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="samples per sampler for statistics and "
                   "throughput (0 = skip; default 4)")
    p.add_argument("--steps", type=int, default=64, metavar="S", help="iterative/semi-ar steps for the samples "
                   "(default 64)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of an export's split and masks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when present")
    p.add_argument("--levels", action="store_true", help="only the per-level table: CE at commit, each level's "
                   "path now (and its drift), the whole stack (skips the grid, the bound and the samples)")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot CE against noise level, one curve per stage")
    p.add_argument("--tasks", metavar="NAMES_OR_YAML", help="run lm-evaluation-harness tasks instead (comma-separated "
                   "task names or task YAML files; needs the eval extra); docs/evaluate.md")
    p.add_argument("--mc-num", type=int, default=32, metavar="N", help="--tasks: Monte Carlo mask draws per "
                   "log-likelihood (default 32)")
    p.add_argument("--limit", type=float, metavar="N", help="--tasks: only the first N documents of each task")

    p = sub.add_parser("data", help="prepare a corpus as memory-mapped token shards; inspect one",
                       description="Corpora at scale: `grow data prepare` tokenizes a source once into packed, "
                       "memory-mapped token rows that `grow train` reads with data.source: DIR on every rank; "
                       "`grow data inspect` describes and checks such a directory.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("prepare", help="tokenize SOURCE into packed .npy token shards + manifest",
                            description="Read SOURCE, hold out documents, fit or load the tokenizer, tokenize in "
                            "parallel, pack rows of --seq-len tokens and write them as .npy shards (uint16 below "
                            "65,536 ids) with the tokenizer and a manifest (counts, tokenizer hash, sha256 of every "
                            "file) written last. Each flag sets the data.* field of the same name.")
    q.add_argument("source", metavar="SOURCE", help="'bible', a .txt/.jsonl/.json/.parquet file, a saved dataset "
                   "directory, a directory of data files or a hub dataset name")
    q.add_argument("--out", required=True, metavar="DIR", help="directory to write (written whole, then renamed)")
    q.add_argument("--tokenizer", default="train", metavar="train|PATH", help="'train' (fit a byte-level BPE on "
                   "the training documents, default) or a tokenizer directory / hub id with a mask token")
    q.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="vocabulary of a trained tokenizer "
                   "(default 4096)")
    q.add_argument("--seq-len", type=int, default=128, metavar="N", help="tokens per row (default 128)")
    q.add_argument("--text-field", default="text", metavar="NAME", help="column with the text (default text)")
    q.add_argument("--hub-split", default="train", metavar="NAME", help="split of a hub/saved dataset (default train)")
    q.add_argument("--streaming", action="store_true", help="read the source lazily (datasets streaming=True)")
    q.add_argument("--max-documents", type=int, metavar="N", help="use only the first N non-empty documents")
    q.add_argument("--heldout-fraction", type=float, default=0.02, metavar="F", help="fraction of documents held "
                   "out (default 0.02)")
    q.add_argument("--heldout-max-documents", type=int, default=1000, metavar="N", help="at most N held-out "
                   "documents (default 1000)")
    q.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the held-out choice (default 0; "
                   "grow train uses train.seed for a raw source)")
    q.add_argument("--num-proc", type=int, metavar="N", help="tokenizer processes (default: one per CPU core; "
                   "small sources are tokenized in process)")
    q.add_argument("--shard-size", default="512MiB", metavar="SIZE", help="largest shard (default 512MiB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    q = data_sub.add_parser("inspect", help="counts, tokenizer, a decoded row and the manifest check of DIR",
                            description="Describe a prepared directory from its manifest, check every file's size "
                            "(and with --verify its sha256) and decode one training row. Exit code 1 when a file "
                            "does not match the manifest.")
    q.add_argument("dir", metavar="DIR", help="a directory written by grow data prepare")
    q.add_argument("--verify", action="store_true", help="hash every file against the manifest")
    q.add_argument("--row", type=int, default=0, metavar="I", help="training row to decode (default 0)")

    p = sub.add_parser("export", help="write a complete run as one Hugging Face model (and push it)",
                       description="Merge the LoRA adapters of a complete run and write ONE stock "
                       "EuroBertForMaskedLM to --out: sharded safetensors, config, the run's tokenizer, grow.json "
                       "(schedule, sampling defaults, provenance) and a model card. Loads with "
                       "AutoModelForMaskedLM.from_pretrained, no remote code. The hub token is read from HF_TOKEN "
                       "or `hf auth login`, never from the command line.")
    p.add_argument("run", metavar="RUN", help="run directory (every block grown)")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory (written whole, then renamed)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weight dtype (default: the run's "
                   "train.precision)")
    p.add_argument("--merge-into", choices=("dequantized", "original"), default="dequantized",
                   help="add each LoRA delta to the dequantized 4-bit weight the suffix trained with (default: "
                   "the function training measured) or to the stored full-precision weight")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="largest safetensors shard "
                   "(default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out (only once the "
                   "new export is complete)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this Hugging Face model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="with --push-to-hub: upload to this branch (created "
                   "if missing)")

    from grow.ablate import arm_names

    p = sub.add_parser("ablate", help="growth against the joint baseline, every part switched off in turn",
                       description="Train the arms one after another on the same data, shape, tokenizer, seed and "
                       "token budget, each as an ordinary run in OUT/arms/NAME, measure every arm the same way "
                       "(CE per level through each path and the whole stack, the MDLM bound, sample statistics "
                       "with a bigram judge, throughput, time, memory, both export merges) and write "
                       "OUT/ablation.md, .json and .png. Run it again to continue a killed ablation. Arms: "
                       + ", ".join(arm_names()) + ".")
    p.add_argument("config", metavar="CONFIG", help="YAML config of the `grow` arm; the others change it")
    p.add_argument("--out", required=True, metavar="DIR", help="ablation directory (continued when it exists)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field for "
                   "every arm (repeatable)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, metavar="TOKENS", help="training tokens per arm, spread over its "
                      "stages in the config's proportions (default: what the config's own stages spend)")
    size.add_argument("--minutes", type=float, metavar="M", help="choose the budget so that the whole ablation "
                      "(every arm trained and measured) takes about M minutes on this machine, timed by a short "
                      "calibration run in OUT/calibration; every arm still gets the same budget")
    p.add_argument("--only", metavar="ARM,ARM", help="run only these arms")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="samples per sampler and arm (default 4)")
    p.add_argument("--steps", type=int, default=32, metavar="S", help="iterative/semi-ar steps (default 32)")
    p.add_argument("--no-export", action="store_true", help="skip exporting each arm with both merge modes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # A command returns None (success) or an exit code for failures that are not user input.
        code = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"grow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:
        from grow.checkpoint import Preempted
        from grow.store import StorageError

        if isinstance(exc, StorageError):  # the OS refused a write: not the user's input, but one line
            print(f"grow: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            # Anywhere else (a log, metrics, a report): stages and checkpoints are written whole or not at all.
            print(f"grow: error: {exc.strerror}: {exc.filename or 'a write'}; every stage and checkpoint "
                  "committed before is intact", file=sys.stderr)
            return 1
        if not isinstance(exc, Preempted):
            raise
        print(f"grow: {exc}; continue with --resume", file=sys.stderr)
        return 143
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()
    return code or 0


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def _closed_pipe() -> int:
    """The reader of our output went away (``grow status RUN | head -1``): stop quietly.

    stdout is pointed at /dev/null so the interpreter's final flush does not complain either;
    the exit code is the shell's for a process ended by SIGPIPE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured by a test): nothing to redirect
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())

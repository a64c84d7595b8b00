"""``grow train``: a fresh start built aside and swapped in whole, --resume, --from-stage."""

from __future__ import annotations

import argparse
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


def add_train_parser(sub) -> None:
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

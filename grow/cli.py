"""``grow`` command line: one function per subcommand, mapped in ``COMMANDS``.

User mistakes raise ``UserError``; ``main`` prints them as one line and exits with code 2.
"""

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

CRITICAL_SECTIONS = ("model",)
CRITICAL_FIELDS = ("data.seq_len", "data.tokenizer", "data.vocab_size", "stability.spectral_norm")


def _log_to(run: Path | None):
    """A logger that prints above progress bars and appends to RUN/train.log."""
    from tqdm.auto import tqdm

    def log(line: str) -> None:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        if run is not None and run.is_dir():
            with open(run / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

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

    cfg = load_config(args.config, args.set or [])
    run = Path(args.out)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: choose one")
    exists = run.exists() and any(run.iterdir())
    if exists and not (args.resume or args.overwrite):
        raise UserError(f"--out: {run} exists and is not empty; pass --resume to continue it or --overwrite to replace it")
    if args.resume:
        if not exists:
            raise UserError(f"--resume: {run} has no run to resume")
        stored = run / "grow.yaml"
        if not stored.is_file():
            raise UserError(f"--resume: {run} is not a grow run (no grow.yaml)")
        old = yaml.safe_load(stored.read_text())
        changed = critical_changes(old, cfg.to_dict())
        if changed:
            raise UserError(f"--resume: architecture-critical settings differ from the stored run: {', '.join(changed)}")
    created = not run.exists()
    if args.overwrite and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    log = _log_to(run)
    try:
        from grow.data import load_corpus

        corpus = load_corpus(cfg.data, run / "tokenizer", cfg.train.seed, log=log)
    except UserError:
        if created or args.overwrite:
            shutil.rmtree(run, ignore_errors=True)
        raise
    write_text_atomic(run / "grow.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    from grow.stages import grow_run

    ratios = cfg.ratios()
    log(f"growing {cfg.model.num_blocks} blocks right to left into {run}; r = {', '.join(f'{r:.3f}' for r in ratios)}")
    grow_run(cfg, run, corpus, log=log, stop_after=args.stop_after)


# ------------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> None:
    from grow.store import list_stages, require_run, stage_dir, stage_problem
    from grow.units import format_bytes

    run = require_run(Path(args.run))
    cfg = yaml.safe_load((run / "grow.yaml").read_text())
    from grow.config import from_dict, GrowConfig

    config = from_dict(GrowConfig, cfg)
    ratios = config.ratios()
    L = config.model.num_blocks
    stages = list_stages(run, verify=args.verify)
    print(f"run {run}: {L} blocks, hidden {config.model.hidden_size}, data {config.data.source}")
    print(f"{'block':>5}  {'r_k':>6}  {'steps':>6}  {'tokens':>12}  {'heldout_ce':>10}  {'size':>10}  state")
    for k in range(L, 0, -1):
        stage = stages.get(k)
        if stage is not None:
            m = stage.manifest
            print(f"{k:>5}  {ratios[k - 1]:>6.3f}  {m['steps']:>6}  {m['tokens_seen']:>12,}  "
                  f"{m['heldout_ce']:>10.4f}  {format_bytes(stage.size_bytes()):>10}  done")
        else:
            path = stage_dir(run, k)
            state = f"invalid: {stage_problem(path, args.verify)}" if path.exists() else "pending"
            print(f"{k:>5}  {ratios[k - 1]:>6.3f}  {'-':>6}  {'-':>12}  {'-':>10}  {'-':>10}  {state}")
    pending = [k for k in range(L, 0, -1) if k not in stages]
    if pending:
        print(f"next: grow train CONFIG --out {run} --resume trains block {pending[0]} (r={ratios[pending[0] - 1]:.3f})")
    else:
        print("complete: every block is grown")


# ------------------------------------------------------------------------ parser

COMMANDS = {
    "train": cmd_train,
    "status": cmd_status,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grow",
        description="Grow a masked-diffusion language model one block at a time, right to left "
        "(depth = reverse diffusion time).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="grow a run, stage L first (resumable)",
                       description="Grow every block of CONFIG into the run directory --out. Each finished "
                       "stage is committed as RUN/stage-kk with a manifest; a stage without one does not exist.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=50 (repeatable; value is YAML)")
    p.add_argument("--resume", action="store_true", help="continue a run: stored stages are kept")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start afresh")
    p.add_argument("--stop-after", type=int, metavar="K", help="stop after committing the stage of block K")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("status", help="one line per stage of a run",
                       description="Show each block's stage: noise level, steps, tokens, held-out masked CE, "
                       "size on disk, and what a resume would do next.")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against its manifest")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as exc:
        print(f"grow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grow: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``grow status``: one line per stage of a run, the levels and memory tables, and what comes next."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="one line per stage of a run",
                       description="Show each block's stage: noise level, steps, tokens, held-out masked CE, "
                       "size on disk, and what a resume would do next.")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against its manifest")


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

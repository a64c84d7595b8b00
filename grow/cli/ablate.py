"""``grow ablate``: growth against the joint baseline, every part switched off in turn (grow.ablate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grow.errors import UserError


def add_ablate_parser(sub) -> None:
    from grow.ablate import arm_names

    p = sub.add_parser("ablate", help="growth against the joint baseline, every part switched off in turn",
                       description="Train the arms (one after another, or --jobs at a time) on the same data, shape, tokenizer, seed and "
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
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="arms trained and measured side by side, each "
                   "in its own process with the CPU cores shared out (default 1; 2 on a 2-core machine finishes "
                   "the ablation sooner, since an arm's evaluation and start-up use one core)")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="samples per sampler and arm (default 4)")
    p.add_argument("--steps", type=int, default=32, metavar="S", help="iterative/semi-ar steps (default 32)")
    p.add_argument("--no-export", action="store_true", help="skip exporting each arm with both merge modes")


def cmd_ablate(args: argparse.Namespace) -> None:
    from grow.ablate import run_ablation

    if args.budget is not None and args.budget < 1:
        raise UserError(f"--budget: expected a positive number of tokens, got {args.budget}")
    if args.samples < 0 or args.steps < 1:
        raise UserError("--samples must be >= 0 and --steps >= 1")
    if not 1 <= args.jobs <= 64:
        raise UserError(f"--jobs: expected 1 to 64 arms at a time, got {args.jobs}")
    if args.minutes is not None and not 0 < args.minutes < float("inf"):
        raise UserError(f"--minutes: expected a positive number of minutes, got {args.minutes:g}")

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    out = Path(args.out)
    run_ablation(args.config, out, sets=args.set or [], budget=args.budget, minutes=args.minutes, only=args.only,
                 samples=args.samples, steps=args.steps, exports=not args.no_export, jobs=args.jobs, log=log)
    print((out / "ablation.md").read_text())
    log(f"ablate: wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")

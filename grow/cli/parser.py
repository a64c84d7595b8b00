"""The ``grow`` argument parser: the top level here, each subcommand's flags beside its function."""

from __future__ import annotations

import argparse

from grow.cli.ablate import add_ablate_parser, cmd_ablate
from grow.cli.data import add_data_parser, cmd_data
from grow.cli.export import add_export_parser, cmd_export
from grow.cli.plan import add_plan_parser, cmd_plan
from grow.cli.sample_eval import add_eval_parser, add_sample_parser, cmd_eval, cmd_sample
from grow.cli.status import add_status_parser, cmd_status
from grow.cli.train import add_train_parser, cmd_train

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

    add_train_parser(sub)
    add_status_parser(sub)
    add_plan_parser(sub)
    add_sample_parser(sub)
    add_eval_parser(sub)
    add_data_parser(sub)
    add_export_parser(sub)
    add_ablate_parser(sub)
    return parser

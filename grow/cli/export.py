"""``grow export``: a complete run as one Hugging Face model, optionally pushed to the hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grow.errors import UserError


def add_export_parser(sub) -> None:
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

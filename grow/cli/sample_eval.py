"""``grow sample`` and ``grow eval``: a run or an export loaded as a denoiser, sampled or measured."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from grow.errors import UserError
from grow.store import write_text_atomic


def add_sample_parser(sub) -> None:
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


def add_eval_parser(sub) -> None:
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

"""``grow plan``: the command line of grow.plan (memory, FLOPs and time of every stage; --fit)."""

from __future__ import annotations

import argparse

from grow.errors import UserError


def add_plan_parser(sub) -> None:
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

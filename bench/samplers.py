"""Sampler throughput, side by side: depth (one forward pass) vs iterative (S full-stack steps).

    python bench/samplers.py                      # a freshly initialised configs/tiny.yaml model
    python bench/samplers.py RUN_OR_EXPORT        # a grown run or an export
    python bench/samplers.py --length 256 --batch 8 --steps 64 --modes depth,iterative

Every mode generates the same number of tokens from an empty prompt, at temperature 1,
``--repeats`` times after one warm-up call; the table shows the best wall time, generated
tokens per second, network runs (``forwards``), block evaluations and the speed-up over
iterative. A fresh model samples noise, but the cost is that of a trained one of its shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grow import sample as S  # noqa: E402


def fresh_model(config: Path):
    """An untrained model of ``config``'s shape (vocab 4096, mask id 2 as in a trained tokenizer)."""
    from grow.config import load_config
    from grow.model import GrowModel, hf_config

    cfg = load_config(config)
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    model = GrowModel(hf_config(cfg.model, vocab, {"mask": 2, "pad": 0, "eos": 1}))
    model.init_ends()
    for k in range(cfg.model.num_blocks, 0, -1):
        model.prepend_block(model.new_block(k))
    return model.eval(), 2, cfg.ratios(), f"fresh {config.name} model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="run or export directory (default: a fresh --config model)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="shape of a fresh model")
    parser.add_argument("--length", type=int, default=128, help="tokens generated per sample (default 128)")
    parser.add_argument("--batch", type=int, default=4, help="samples per call (default 4)")
    parser.add_argument("--steps", type=int, default=64, help="iterative steps; semi-ar spreads them over its "
                        "blocks (default 64)")
    parser.add_argument("--block-length", type=int, default=32, help="semi-ar block length (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode; the best counts")
    parser.add_argument("--modes", default=",".join(S.MODES), help="comma-separated modes (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a "
                        "busy machine 1 can be many times faster for small models")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        from grow.inference import load_denoiser

        loaded = load_denoiser(args.model, args.device)
        model, mask_id, ratios, name = loaded.model, loaded.mask_id, loaded.ratios, args.model
    else:
        model, mask_id, ratios, name = fresh_model(Path(args.config))
        model.to(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    length = min(args.length, model.config.max_position_embeddings)
    prompt = torch.zeros((args.batch, 0), dtype=torch.long, device=args.device)
    blocks = model.num_blocks - model.first_block + 1
    print(f"{name}: {blocks} blocks, hidden {model.config.hidden_size}, batch {args.batch} x {length} tokens, "
          f"{torch.get_num_threads()} threads, device {args.device}")

    rows = []
    for mode in modes:
        opts: dict = {"temperature": 1.0}
        if mode == "iterative":
            opts["steps"] = args.steps
        if mode == "semi-ar":
            opts["block_length"] = min(args.block_length, length)
            opts["steps"] = max(1, args.steps * opts["block_length"] // length)

        def call(seed: int):
            g = torch.Generator(device=args.device).manual_seed(seed)
            return S.generate(model, prompt, length, mode, mask_id=mask_id, ratios=ratios, generator=g, **opts)

        call(0)  # warm-up: allocator, kernels
        best, result = float("inf"), None
        for i in range(args.repeats):
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = call(i + 1)
            if args.device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rows.append((mode, best, args.batch * length / best, result.forwards, result.block_evals, opts.get("steps")))

    base = next((r[2] for r in rows if r[0] == "iterative"), None)
    print(f"{'mode':>10}  {'steps':>5}  {'forwards':>8}  {'block evals':>11}  {'seconds':>8}  {'tok/s':>10}  "
          f"{'vs iterative':>12}")
    for mode, seconds, tps, forwards, evals, steps in rows:
        speedup = f"{tps / base:>11.1f}x" if base else f"{'-':>12}"
        print(f"{mode:>10}  {steps if steps else '-':>5}  {forwards:>8}  {evals:>11}  {seconds:>8.3f}  "
              f"{tps:>10.1f}  {speedup}")


if __name__ == "__main__":
    main()

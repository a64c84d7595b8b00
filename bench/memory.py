"""Growth stage vs joint full training: model-state bytes, peak memory, step time.

    python bench/memory.py                      # tiny and 12 x 512, on CUDA if present else CPU
    python bench/memory.py --steps 5 --batch 8

For each shape it measures, in a fresh subprocess each (so the CPU peak RSS is the
measurement's own):
  growth       the deepest stage (k = 1): block 1 trains with spectral norm and gamma, blocks
               2..L are 4-bit NF4 with LoRA adapters, embeddings/head frozen (the worst stage);
  growth+ckpt  the same with the frozen suffix recomputed in backward (train.checkpoint_suffix);
  joint        the same model in plain float, every parameter trainable (full training).
All three run stage 1's noise level (r = 1: every position masked).
Model-state bytes are counted from the tensors (weights, grads, AdamW state); the peak is CUDA
max allocated, or on CPU the peak RSS minus the RSS after imports. Step time is the mean of
the measured steps after one warm-up step (forward + backward + optimizer step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

SHAPES = {
    "tiny (6 x 128)": dict(num_blocks=6, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=384),
    "wide (12 x 512)": dict(num_blocks=12, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1536),
}
VOCAB = 4096


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(shape: str, mode: str, steps: int, batch: int, seq: int) -> dict:
    import torch

    from grow.config import load_config
    from grow.curriculum import stage_specs
    from grow.memory import stage_account
    from grow.model import GrowModel, add_stability, fold, hf_config
    from grow.noise import corrupt, mask_scores, masked_ce, nested_mask
    from grow.quant import add_adapter, adapter_parameters, cast_ends, quantize_block

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sets = [f"model.{k}={v}" for k, v in SHAPES[shape].items()] + ["schedule.ratios=null", "train.steps=1"]
    cfg = load_config("configs/tiny.yaml", sets)
    torch.manual_seed(0)
    base = rss_bytes()
    model = GrowModel(hf_config(cfg.model, VOCAB, {"mask": 2, "pad": 0, "eos": 1})).to(device)
    model.init_ends()
    L = cfg.model.num_blocks
    if mode.startswith("growth"):
        for k in range(L, 1, -1):
            block = model.new_block(k)
            add_stability(block, cfg.stability)
            model.prepend_block(block)
            fold(block)
            block.requires_grad_(False)
        # Stage L (block 1) as grow.assemble lays it out: the suffix in 4-bit with an adapter each.
        for k in range(L, 1, -1):
            quantize_block(model.block(k), cfg.quant, device)
            add_adapter(model, k, cfg.lora)
            for p in adapter_parameters(model, k):
                p.requires_grad_(True)
        cast_ends(model, cfg.quant)
        model.freeze_ends(True)
        block = model.new_block(1)
        add_stability(block, cfg.stability)
        model.prepend_block(block)
        # growth+ckpt: recompute the frozen suffix in backward (train.checkpoint_suffix).
        model.checkpoint_blocks = frozenset(range(2, L + 1)) if mode == "growth+ckpt" else frozenset()
    else:
        for k in range(L, 0, -1):
            model.prepend_block(model.new_block(k))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, VOCAB, (batch, seq), device=device)
    # Stage 1's noise level for every mode: all positions masked, the head runs on all of them.
    mask = nested_mask(mask_scores(range(batch), seq, 0), 1.0).to(device)
    x = corrupt(ids, mask, 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = masked_ce(model.head(model.forward_from(model.embed(x))[mask]), ids[mask])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the grads: they are part of the state
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    if mode.startswith("growth"):
        account = stage_account(model, stage_specs(cfg)[-1], optimizer)
        state = account["model_state_bytes"]
    else:
        w = sum(p.numel() * p.element_size() for p in model.parameters())
        opt = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
        state = 2 * w + opt  # weights + grads + AdamW m, v
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes() - base
    return {"shape": shape, "mode": mode, "device": device.type, "trainable": sum(p.numel() for p in params),
            "state_bytes": state, "peak_bytes": peak, "step_s": sum(times) / len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.steps, args.batch, args.seq)))
        return
    from grow.units import format_bytes

    rows = {}
    for shape in SHAPES:
        for mode in ("growth", "growth+ckpt", "joint"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", shape, mode, "--steps", str(args.steps), "--batch",
                 str(args.batch), "--seq", str(args.seq)],
                capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
            ).stdout.strip().splitlines()[-1]
            rows[shape, mode] = json.loads(out)
    device = next(iter(rows.values()))["device"]
    print(f"growth stage k=1 (4-bit suffix + LoRA) vs joint full training; device {device}, "
          f"batch {args.batch} x {args.seq}, {args.steps} timed steps")
    print(f"{'shape':<16} {'':>18} {'trainable':>12} {'model state':>12} {'peak':>12} {'step':>9}")
    for shape in SHAPES:
        j = rows[shape, "joint"]
        for name in ("growth", "growth+ckpt", "joint"):
            r = rows[shape, name]
            print(f"{shape:<16} {name:>18} {r['trainable']:>12,} {format_bytes(r['state_bytes']):>12} "
                  f"{format_bytes(r['peak_bytes']):>12} {1000 * r['step_s']:>7.0f}ms")
        for name in ("growth", "growth+ckpt"):
            g = rows[shape, name]
            print(f"{shape:<16} {name + '/joint':>18} {g['trainable'] / j['trainable']:>12.3f} "
                  f"{g['state_bytes'] / j['state_bytes']:>12.3f} {g['peak_bytes'] / j['peak_bytes']:>12.3f} "
                  f"{g['step_s'] / j['step_s']:>9.2f}")


if __name__ == "__main__":
    main()

"""Planned vs measured memory of real growth stages (run it on a GPU machine).

    python bench/plan_vs_measured.py                                  # 125m shape, 4 blocks, 2 stages
    python bench/plan_vs_measured.py configs/1b.yaml --blocks 3 --steps 5 --batch 4

Grows the first ``--stages`` stages of CONFIG (shrunk to ``--blocks`` blocks, same width) with
``grow train`` in a subprocess, then prints, per stage, what ``grow plan`` predicts next to what
the stage's manifest measured: the model state counted from the real tensors, and the peak
(``torch.cuda.max_memory_allocated``, reset at the start of every stage). The target for the peak
is within 10 %. On a CPU-only machine the measured peak is the process RSS, which includes the
Python runtime and allocator caches and is not comparable; the script says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/125m.yaml")
    parser.add_argument("--blocks", type=int, default=4, help="shrink the model to this many blocks")
    parser.add_argument("--stages", type=int, default=2, help="grow this many stages (L, L-1, ...)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="trained tokenizer size")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from grow.config import load_config
    from grow.plan import plan
    from grow.units import format_bytes

    sets = [f"model.num_blocks={args.blocks}", "schedule.ratios=null", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", "train.micro_batch_size=null", f"data.vocab_size={args.vocab}",
            "train.log_every=1000", "train.eval_batches=1"]
    cfg = load_config(ROOT / args.config, sets)
    run = Path(args.out or tempfile.mkdtemp(prefix="grow-plan-vs-measured-")) / "run"
    stop = cfg.model.num_blocks - args.stages + 1
    cmd = [sys.executable, "-m", "grow", "train", str(ROOT / args.config), "--out", str(run),
           "--stop-after", f"block{stop:02d}", *[x for s in sets for x in ("--set", s)]]
    subprocess.run(cmd, cwd=ROOT, check=True)

    predicted = plan(cfg, gpus=1, micro_batch=args.batch)
    by_block = {s.block: s for s in predicted.stages}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n{args.config} shrunk to {cfg.model.num_blocks} blocks, batch {args.batch} x {cfg.data.seq_len}, "
          f"{cfg.train.precision}, device {device}")
    if device == "cpu":
        print("note: no CUDA device; the measured peak is the CPU process RSS and not comparable to the plan")
    print(f"{'block':>5} {'planned state':>14} {'measured state':>15} {'planned peak':>13} {'measured peak':>14} "
          f"{'peak ratio':>10}")
    for k in range(cfg.model.num_blocks, stop - 1, -1):
        index = cfg.model.num_blocks - k + 1  # grown right to left: stage i trains block L+1-i
        manifest = json.loads((run / f"stage-{index:02d}-block{k:02d}" / "manifest.json").read_text())
        memory, p = manifest["memory"], by_block[k]
        print(f"{k:>5} {format_bytes(p.model_states):>14} {format_bytes(memory['model_state_bytes']):>15} "
              f"{format_bytes(p.total):>13} {format_bytes(memory['peak_bytes']):>14} "
              f"{memory['peak_bytes'] / p.total:>10.3f}")


if __name__ == "__main__":
    main()

"""Training throughput and model FLOPs utilization (MFU) of every stage (run it on a GPU machine).

    python bench/throughput.py                                   # configs/125m.yaml, 20 steps a stage
    python bench/throughput.py configs/1b.yaml --blocks 6 --steps 20 --json out.json

Grows CONFIG with ``grow train`` in a subprocess, a few steps per stage, the final whole-stack
stage included, then prints per stage: the steady-state milliseconds per optimizer step (median
of the logged windows after the first, which holds the warm-up and the CUDA kernels' first
launches), tokens per second, the achieved TFLOP/s, and MFU.

The FLOPs are ``grow plan``'s model FLOPs of that stage (forward of every block the input passes,
the trained block's input and weight gradients, the frozen suffix's input gradients, adapters,
the head at the masked positions): work the stage needs, not work the kernels do. Dequantizing
the 4-bit suffix on every forward and the spectral-norm power iteration are not counted, so
they show up as lost MFU, which is the point. MFU is given against the datasheet's dense bf16
peak (``--peak``, default 989 TFLOP/s: H100/H200 SXM) and against a bf16 8192^3 matmul measured
in the same process, the ceiling a stage could reach on this card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def measured_matmul_tflops(n: int = 8192, repeats: int = 10) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/125m.yaml")
    parser.add_argument("--blocks", type=int, help="shrink the model to this many blocks (default: the config's)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage (final stage too)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per timed window")
    parser.add_argument("--batch", type=int, help="train.batch_size (default: the config's)")
    parser.add_argument("--peak", type=float, default=989.0, help="datasheet dense bf16 TFLOP/s of one GPU")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    from grow.config import load_config
    from grow.plan import plan
    from grow.store import list_stages

    sets = [f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.eval_batches=1",
            "schedule.ratios=null"]
    base = load_config(ROOT / args.config, [])
    if base.curriculum.final_steps:
        sets.append(f"curriculum.final_steps={args.steps}")
    if args.blocks:
        sets.append(f"model.num_blocks={args.blocks}")
    if args.batch:
        sets += [f"train.batch_size={args.batch}", "train.micro_batch_size=null"]
    sets += args.set
    run = Path(args.out or tempfile.mkdtemp(prefix="grow-throughput-")) / "run"
    cmd = [sys.executable, "-m", "grow", "train", str(ROOT / args.config), "--out", str(run),
           *[x for s in sets for x in ("--set", s)]]
    if not (run / "metrics.jsonl").is_file():  # an --out that already holds the run is only re-reported
        subprocess.run(cmd, cwd=ROOT, check=True)

    windows: dict[str, list[float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        windows.setdefault(row["stage"].split()[0], []).append(row["ms_per_step"])
    ceiling = measured_matmul_tflops()
    # The FLOPs of the head depend on the vocabulary the trained tokenizer really has (a BPE asked
    # for 32000 tokens of the Bible stops near 21000), not the size the config asked for.
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json")).get_vocab_size()
    cfg = load_config(ROOT / args.config, [*sets, f"model.vocab_size={vocab}"])
    predicted = plan(cfg, gpus=1)
    peaks = {s.path.name: s.manifest["memory"]["peak_bytes"] / 2**30 for s in list_stages(run).values()}
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    m = cfg.model
    print(f"\n{args.config}: {m.num_blocks} blocks x hidden {m.hidden_size}, vocab {vocab}, batch {cfg.train.batch_size} x "
          f"{cfg.data.seq_len} tokens, {cfg.train.precision}, quant {'nf4' if cfg.quant.enabled else 'off'}, "
          f"{args.steps} steps a stage (median of {args.log_every}-step windows after the first)")
    print(f"MFU against {args.peak:.0f} TFLOP/s (datasheet)"
          + (f" and against {ceiling:.0f} TFLOP/s (bf16 8192^3 matmul measured here)" if ceiling else ""))
    head = f"{'stage':<22} {'trains':>9} {'GFLOP/token':>11} {'ms/step':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6}"
    print(head + (f" {'of matmul':>9}" if ceiling else "") + f" {'peak GiB':>8}")
    rows = []
    for stage in predicted.stages:
        times = windows.get(stage.name, [])
        if not times:
            continue
        steady = times[1:] or times
        ms = statistics.median(steady)
        tok_s = tokens_per_step / (ms / 1000)
        tflops = tok_s * stage.flops_per_token / 1e12
        peak = peaks.get(stage.name)
        trains = ",".join(str(k) for k in stage.extra.get("trains", [])) or "adapters"
        if len(trains) > 9:
            trains = f"{len(stage.extra['trains'])} blocks"
        row = {"stage": stage.name, "trains": stage.extra.get("trains"), "flops_per_token": stage.flops_per_token,
               "ms_per_step": ms, "tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / args.peak,
               "mfu_of_matmul": tflops / ceiling if ceiling else None, "peak_gib": peak}
        rows.append(row)
        print(f"{stage.name:<22} {trains:>9} {stage.flops_per_token / 1e9:>11.3f} {ms:>8.1f} {tok_s:>9,.0f} "
              f"{tflops:>8.1f} {100 * row['mfu']:>5.1f}%"
              + (f" {100 * row['mfu_of_matmul']:>8.1f}%" if ceiling else "")
              + (f" {peak:>8.2f}" if peak is not None else f" {'-':>8}"))
    if rows:
        mean = sum(r["tflops"] for r in rows) / len(rows)
        print(f"mean over stages: {mean:.1f} TFLOP/s, MFU {100 * mean / args.peak:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "sets": sets, "peak_tflops": args.peak,
                                               "matmul_tflops": ceiling, "tokens_per_step": tokens_per_step,
                                               "stages": rows}, indent=2))


if __name__ == "__main__":
    main()

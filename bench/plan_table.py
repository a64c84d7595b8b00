"""Regenerate the README / docs/plan.md memory table: four shapes x four GPU setups.

    python bench/plan_table.py      # prints a markdown table (pure arithmetic, a few seconds)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SETUPS = [
    ("1×24 GiB", ["--gpus", "1", "--gpu-memory", "24GiB"]),
    ("1×80 GiB", ["--gpus", "1", "--gpu-memory", "80GiB"]),
    ("8×80 GiB ZeRO-2", ["--gpus", "8", "--gpu-memory", "80GiB", "--deepspeed", "ds_configs/zero2.json"]),
    ("8×80 GiB ZeRO-3", ["--gpus", "8", "--gpu-memory", "80GiB", "--deepspeed", "ds_configs/zero3.json"]),
]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from grow.units import format_bytes

    print("| shape | setup | grow: peak stage | grow: peak per GPU | fits | full training | fits | QLoRA everywhere | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in ("125m", "1b", "llama2-7b", "llama2-70b"):
        for name, flags in SETUPS:
            out = subprocess.run([sys.executable, "-m", "grow", "plan", f"configs/{shape}.yaml", *flags,
                                  "--micro-batch", "1", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
            d = json.loads(out.stdout)
            budget = d["setup"]["gpu_memory"] if "gpu_memory" in d["setup"] else None
            full, qlora = d["compare"]["full"]["bytes"]["total"], d["compare"]["qlora"]["bytes"]["total"]
            fits = lambda b: "yes" if budget is None or b <= budget else "**no**"  # noqa: E731
            n_fit = sum(s["fits"] for s in d["stages"])
            grow_fit = "yes" if d["fits"] else f"**no** ({n_fit} of {len(d['stages'])} stages fit)"
            print(f"| {shape} | {name} | {d['peak']['block']} | {format_bytes(d['peak']['total'])} | {grow_fit} "
                  f"| {format_bytes(full)} | {fits(full)} | {format_bytes(qlora)} | {fits(qlora)} |")


if __name__ == "__main__":
    main()

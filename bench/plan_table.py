"""Regenerate the README / docs/plan.md memory table: four shipped shapes x four GPU setups.

    python bench/plan_table.py      # prints the markdown table (pure arithmetic, a few seconds)

Every figure comes from ``grow.plan`` -- the code behind ``grow plan`` -- with the config's own
micro-batch (``train.micro_batch_size``), so each row says what
``grow plan configs/SHAPE.yaml SETUP`` says, and the ``--fit`` column what
``grow plan configs/SHAPE.yaml SETUP --fit`` finds. tests/test_plan.py checks that the README
and docs/plan.md hold exactly this output.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("125m", "1b", "llama2-7b", "llama2-70b")
# (name in the table, --gpus, --gpu-memory, --deepspeed)
SETUPS = [
    ("1×24 GiB", 1, "24GiB", None),
    ("1×80 GiB", 1, "80GiB", None),
    ("8×80 GiB ZeRO-2", 8, "80GiB", "ds_configs/zero2.json"),
    ("8×80 GiB ZeRO-3", 8, "80GiB", "ds_configs/zero3.json"),
]


def table() -> str:
    """The markdown table and its footnotes, one string."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from grow.config import load_config
    from grow.plan import fit, plan, read_deepspeed
    from grow.units import format_bytes, parse_bytes

    lines = [
        "| shape | setup | micro-batch × accumulation | grow: peak stage | grow: peak per GPU | fits | `--fit` "
        "| full training | fits | QLoRA everywhere | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for shape in SHAPES:
        cfg = load_config(ROOT / "configs" / f"{shape}.yaml")
        for name, gpus, memory, ds in SETUPS:
            options = dict(gpus=gpus, gpu_memory=parse_bytes(memory),
                           deepspeed=read_deepspeed(ROOT / ds) if ds else None)
            p = plan(cfg, **options)
            found = fit(cfg, **options)
            budget = p.gpu_memory
            yes = lambda b: "yes" if b <= budget else "**no**"  # noqa: E731
            n_fit = sum(s.fits for s in p.stages)
            grow_fit = "yes" if p.fits else f"**no** ({n_fit} of {len(p.stages)} stages fit)"
            if found.micro_batch is None:
                notes.append(f"{shape} on {name}: {found.summary().removeprefix('fit: ')}.")
                fitted = f"none ({len(notes)})"
            else:
                fitted = f"{found.micro_batch} × {found.accumulation}"
            lines.append(
                f"| {shape} | {name} | {p.micro_batch} × {p.accumulation} | {p.peak.name} | "
                f"{format_bytes(p.peak.total)} | {grow_fit} | {fitted} | {format_bytes(p.full.total)} | "
                f"{yes(p.full.total)} | {format_bytes(p.qlora.total)} | {yes(p.qlora.total)} |"
            )
    lines += [""] + [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

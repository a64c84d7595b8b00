"""Load a denoiser for sampling or evaluation: a grow run or an exported Hugging Face model.

Both come back as a ``GrowModel`` so every sampler and metric has one code path:

- a run (``RUN/grow.yaml``): the model is rebuilt from its committed stages exactly as
  ``grow train --resume`` would (``restore_suffix``: with quant/lora enabled the suffix runs
  in 4-bit with its LoRA adapters, the network the last stage trained), ratios from the
  run's config;
- an export (``DIR/config.json``): stock ``AutoModelForMaskedLM.from_pretrained`` (a
  ``EuroBertForMaskedLM``) whose modules are *moved*, not copied, into a ``GrowModel``:
  embedding, layers (= blocks 1..L), final norm, LM head, rotary embedding. Ratios come from
  ``DIR/grow.json`` (``{"schedule": [...]}``) when present.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from grow.errors import UserError
from grow.model import GrowModel

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class Loaded:
    """A denoiser ready to sample: the model (eval mode), its tokenizer and schedule r_1..r_L."""

    model: GrowModel
    tokenizer: Any
    ratios: list[float]
    source: Literal["run", "export"]
    path: Path = Path(".")
    config: Any = None
    """The run's ``GrowConfig`` (None for an export)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """An export's ``grow.json`` (empty when it has none)."""

    @property
    def mask_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def complete(self) -> bool:
        return self.model.first_block == 1


def load_denoiser(path: str | Path, device: torch.device | str = "cpu", *, log: Log = _stderr) -> Loaded:
    """The denoiser stored at ``path`` (a run directory or an exported model directory)."""
    path = Path(path)
    device = torch.device(device)
    if (path / "grow.yaml").is_file():
        loaded = _load_run(path, device, log)
    elif (path / "config.json").is_file():
        loaded = _load_export(path, log)
    else:
        raise UserError(
            f"RUN_OR_EXPORT: {path} is neither a grow run (no grow.yaml) nor an exported model (no config.json)"
        )
    loaded.model.to(device).eval()
    return loaded


def _load_run(run: Path, device: torch.device, log: Log) -> Loaded:
    from grow.stages import load_run

    # The network the last stage trained and measured: with quant/lora enabled that is the
    # 4-bit suffix with its adapters, its first block in full precision.
    cfg, model, tokenizer = load_run(run, device, log=log)
    first, L = model.first_block, cfg.model.num_blocks
    if first > 1:
        log(f"note: {run} is grown only to blocks {first}..{L} of {L}; sampling uses that suffix "
            f"(its first block was trained at r={cfg.ratios()[first - 1]:.3f})")
    return Loaded(model, tokenizer, cfg.ratios(), "run", run, config=cfg)


def _load_export(directory: Path, log: Log) -> Loaded:
    import transformers

    from grow.config import ScheduleConfig
    from grow.noise import make_schedule

    try:
        hf = transformers.AutoModelForMaskedLM.from_pretrained(str(directory))
    except Exception as exc:  # a broken or foreign directory: one line, not a traceback
        raise UserError(f"EXPORT: could not load {directory} as a masked LM: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise UserError(f"EXPORT: {directory} has no usable tokenizer: {str(exc).splitlines()[0]}") from None
    if tokenizer.mask_token_id is None:
        raise UserError(f"EXPORT: the tokenizer in {directory} has no mask token, which masked diffusion needs")
    model = wrap_hf(hf)
    L = model.num_blocks
    meta: dict[str, Any] = {}
    meta_path = directory / "grow.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        ratios = [float(r) for r in meta.get("schedule", [])]
        if len(ratios) != L:
            raise UserError(f"EXPORT: {meta_path} has {len(ratios)} schedule levels but the model has {L} layers")
    else:
        ratios = make_schedule(ScheduleConfig(), L)
        log(f"note: {directory} has no grow.json; assuming a linear schedule r = 1.0 -> 0.15 over {L} layers")
    return Loaded(model, tokenizer, ratios, "export", directory, meta=meta)


def wrap_hf(hf) -> GrowModel:
    """A ``GrowModel`` over an ``EuroBertForMaskedLM``'s own modules (shared, not copied).

    The shell is built on the meta device so nothing is allocated for the modules that are
    replaced at once by the Hugging Face model's.
    """
    with torch.device("meta"):
        model = GrowModel(hf.config)
    model.embed_tokens = hf.model.embed_tokens
    model.blocks = hf.model.layers
    model.norm = hf.model.norm
    model.lm_head = hf.lm_head
    model.rotary_emb = hf.model.rotary_emb
    if len(model.blocks) != model.num_blocks:
        raise UserError(f"EXPORT: config says {model.num_blocks} layers but the model has {len(model.blocks)}")
    return model

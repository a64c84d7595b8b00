"""Load a denoiser for sampling or evaluation: a grow run or an exported Hugging Face model.

Both come back as a ``GrowModel`` so every sampler and metric has one code path:

- a run (``RUN/grow.yaml``): the model is rebuilt from its committed stages exactly as the
  newest stage left it (``grow.stages.load_run``: with quant/lora enabled the frozen blocks
  run in 4-bit with their LoRA adapters), ratios and level paths from the run's config;
- an export (``DIR/config.json``): stock ``AutoModelForMaskedLM.from_pretrained`` (a
  ``EuroBertForMaskedLM``) whose modules are *moved*, not copied, into a ``GrowModel``:
  embedding, layers (= blocks 1..L), final norm, LM head, rotary embedding. Ratios and paths
  come from ``DIR/grow.json`` when present.

``Loaded.paths`` says which blocks serve each schedule level of a depth-tied model (the depth
and suffix samplers step through them); None for a model that only runs as a whole stack.
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
    paths: dict[int, tuple[int, int]] | None = None
    """Level k -> the blocks (first, last) that serve it, for a depth-tied model."""
    complete: bool = True
    """Every stage of the run is committed (always true of an export)."""

    @property
    def mask_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def corruption(self):
        """The run's corruption (``objective.corruption``; an export's ``grow.json``)."""
        from grow.corruption import corruption_for, corruption_named

        if self.config is not None:
            return corruption_for(self.config)
        return corruption_named(self.meta.get("corruption", "mask"))

    @property
    def time_input(self) -> bool:
        """The network is given the noise level (curriculum.conditioning: embedding)."""
        return self.model.time_embed is not None

    def logits_fn(self, first: int | None = None, last: int | None = None):
        """``(ids, t) -> logits`` of blocks first..last (default: the whole stack)."""
        model, timed = self.model, self.time_input
        return lambda ids, t: model(ids, start=first, end=last, t=t if timed else None)

    def level_path(self, k: int) -> tuple[int, int] | None:
        """The blocks serving level k that this model has, or None."""
        path = (self.paths or {}).get(k)
        if path is None or not (self.model.first_block <= path[0] and path[1] <= self.model.last_block):
            return None
        return path


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
    from grow.curriculum import level_paths, stage_specs
    from grow.stages import load_run

    # The network the newest stage trained and measured: with quant/lora enabled its frozen
    # blocks in 4-bit with their adapters, the blocks it trained in full precision.
    cfg, model, tokenizer, spec = load_run(run, device, log=log)
    complete = spec.index == len(stage_specs(cfg))
    if not complete:
        log(f"note: {run} is committed up to {spec.name} of {len(stage_specs(cfg))} stages; "
            f"using blocks {model.first_block}..{model.last_block} as that stage left them")
    return Loaded(model, tokenizer, cfg.ratios(), "run", run, config=cfg, paths=level_paths(cfg), complete=complete)


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
        log(f"note: {directory} has no grow.json; assuming a linear schedule r = 1.0 -> 0.15 over {L} layers "
            "and no level paths")
    paths = meta.get("paths")
    if "paths" not in meta and meta.get("format_version") == 1:
        paths = {k: (k, L) for k in range(1, L + 1)}  # every format-1 export was grown right to left
    paths = {int(k): tuple(v) for k, v in paths.items()} if paths else None
    return Loaded(model, tokenizer, ratios, "export", directory, meta=meta, paths=paths)


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

"""The network of a stage, rebuilt from the stage store: one builder for every curriculum.

Training, resume, evaluation, sampling and export all build a model the same way:

    state = RunState(committed stages)     where the current weights come from
    model = assemble(cfg, tokenizer, spec, state, device, training=...)

Each stage stores exactly what it trained, so after the committed stages

- block k's weights are in the latest stage that trained block k (folded, full precision),
  or converted it from a pretrained checkpoint (``grow.convert``);
- the embedding, final norm and head are in the latest stage that trained (or converted) them;
- the LoRA adapters of every frozen block are in the latest stage's adapter file (each stage
  stores the whole set: the ones it trained and the ones it kept frozen).

``assemble`` lays out the network of ``spec``: blocks ``first..last``; the ones ``spec``
trains in full precision (with spectral norm and the residual gain when ``training``); every
other block frozen, in 4-bit (``quant.enabled``) with its adapter (``lora.enabled``). With
``training=True`` it is the model a stage starts from (state = the stages before it); with
``training=False`` it is the model a stage left behind (state = up to and including it), in
eval mode -- exactly what that stage measured. A block that trains again after it was frozen
(a joint fine-tune, a later pass) first takes its adapter into its full-precision weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from grow.config import GrowConfig
from grow.convert import block_stability
from grow.corruption import corruption_for
from grow.curriculum import StageSpec
from grow.errors import UserError
from grow.model import GrowModel, add_stability, hf_config
from grow.quant import (ADAPTER_WEIGHTS, add_adapter, adapter_delta, cast_ends, load_adapter_state, quantize_block)
from grow.store import Stage

TIME_PREFIX = "grow.time_embed."
ENDS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def block_prefixes(block_id: int) -> tuple[str, str]:
    """Store keys of block k: its layer (EuroBERT's names) and its time embedding (grow's)."""
    return f"model.layers.{block_id - 1}.", f"{TIME_PREFIX}{block_id - 1}."


def special_ids(tokenizer) -> dict[str, int | None]:
    return {
        "mask": tokenizer.mask_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }


def build_model(cfg: GrowConfig, tokenizer) -> GrowModel:
    """An empty model (no block grown yet) of the run's shape."""
    vocab = cfg.model.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise UserError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    model = GrowModel(hf_config(cfg.model, vocab, special_ids(tokenizer)),
                      time_embedding=cfg.curriculum.conditioning == "embedding")
    corruption_for(cfg).install(model)  # gaussian: noise at [MASK] positions
    return model


@dataclass
class RunState:
    """Where the current tensors come from after ``stages`` (committed, in run order)."""

    stages: Sequence[Stage]
    _loaded: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def _weights(self, stage: Stage) -> dict[str, torch.Tensor]:
        if stage.name not in self._loaded:
            self._loaded[stage.name] = stage.weights()
        return self._loaded[stage.name]

    def _select(self, stage: Stage, want) -> dict[str, torch.Tensor]:
        """The tensors of ``stage`` whose names ``want`` accepts.

        A convert stage holds a whole pretrained model (138 GB for a 70B in bf16): its tensors
        are read one by one from the shards (safetensors' safe_open), so a stage rebuilding its
        network holds about one block of it in CPU memory at a time. Other stages are small and
        read whole, once.
        """
        if stage.name in self._loaded or not stage.spec.get("converted", False):
            return {k: v for k, v in self._weights(stage).items() if want(k)}
        import json

        from safetensors import safe_open

        from grow.store import INDEX

        shards: dict[str, list[str]] = {}
        for key, shard in json.loads((stage.path / INDEX).read_text())["weight_map"].items():
            if want(key):
                shards.setdefault(shard, []).append(key)
        out = {}
        for shard, keys in shards.items():
            with safe_open(str(stage.path / shard), framework="pt") as f:
                out.update({key: f.get_tensor(key) for key in keys})
        return out

    def _latest(self, trained) -> Stage | None:
        return next((s for s in reversed(self.stages) if trained(s.spec)), None)

    def block(self, block_id: int) -> dict[str, torch.Tensor] | None:
        """Block k's stored tensors (layer and time embedding), or None if no stage trained it."""
        stage = self._latest(lambda spec: block_id in spec["train"] or _converted(spec, block_id))
        if stage is None:
            return None
        prefixes = block_prefixes(block_id)
        return self._select(stage, lambda k: k.startswith(prefixes))

    def ends(self) -> dict[str, torch.Tensor] | None:
        stage = self._latest(lambda spec: spec["trains_ends"] or spec.get("converted", False))
        return None if stage is None else self._select(stage, lambda k: k in ENDS)

    def adapters(self) -> dict[str, torch.Tensor]:
        """Every frozen block's adapter as the latest stage stored them (peft keys)."""
        if not self.stages or not (self.stages[-1].path / ADAPTER_WEIGHTS).is_file():
            return {}
        return load_file(self.stages[-1].path / ADAPTER_WEIGHTS)


def _converted(spec: dict, block_id: int) -> bool:
    """A convert stage (grow.convert) stores blocks first..last without training them."""
    return spec.get("converted", False) and spec["first"] <= block_id <= spec["last"]


def assemble(cfg: GrowConfig, tokenizer, spec: StageSpec, state: RunState, device: torch.device | str,
             *, training: bool) -> GrowModel:
    """The network of stage ``spec`` holding the tensors of ``state`` (see the module docstring)."""
    device = torch.device(device)
    model = build_model(cfg, tokenizer).to(device)
    ends = state.ends()
    if ends is not None:
        model.load_ends(ends)
    elif training and spec.trains_ends:
        model.init_ends()
    else:
        raise ValueError(f"{spec.name}: no stored stage holds the embedding and head")
    adapters = state.adapters()
    for k in spec.blocks:
        stored = state.block(k)
        if stored is not None:
            layer, time = block_prefixes(k)
            if k in spec.train:
                stored = {**stored, **adapter_delta(stored, adapters, k, cfg.lora)}
                adapters = {n: v for n, v in adapters.items() if not _of_block(n, k)}
            block = model.load_block(k, stored)
            if model.time_embed is not None:
                model.time_embed[k - 1].load_state_dict({n[len(time):]: v for n, v in stored.items()
                                                         if n.startswith(time)})
        elif training and k in spec.train:
            block = model.new_block(k)
        else:
            raise ValueError(f"{spec.name}: block {k} is frozen but no stored stage trained it")
        if training and k in spec.train:
            add_stability(block, block_stability(cfg))
        model.set_block(k, block.to(device))
    model.to(device)
    _freeze(model, spec, cfg, device, adapters, training)
    model.checkpoint_blocks = frozenset(spec.frozen) if training and cfg.train.checkpoint_suffix else frozenset()
    model.train(training)
    return model


def _of_block(peft_key: str, block_id: int) -> bool:
    from grow.quant import PEFT_PREFIX

    return peft_key.startswith(f"{PEFT_PREFIX}{block_id - 1}.")


def _freeze(model: GrowModel, spec: StageSpec, cfg: GrowConfig, device: torch.device,
            adapters: dict[str, torch.Tensor], training: bool) -> None:
    """Frozen blocks into 4-bit with their adapters; then trainable flags per ``spec``."""
    if not spec.trains_ends:
        cast_ends(model, cfg.quant)
    for k in spec.frozen:
        if cfg.quant.enabled:
            quantize_block(model.block(k), cfg.quant, device)
        if cfg.lora.enabled:
            add_adapter(model, k, cfg.lora)
    if adapters and cfg.lora.enabled:
        load_adapter_state(model, {n: v.to(device) for n, v in adapters.items()})
    # After the adapters: peft marks everything but adapters untrainable when it injects one.
    model.requires_grad_(False)
    if not training:
        return
    if spec.trains_ends:
        model.freeze_ends(False)
    for k in spec.train:
        for module in model.block_modules(k):
            module.requires_grad_(True)
    for k in spec.adapters:
        for name, p in model.block(k).named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)

"""The memory account of a stage: what each part of the model state really occupies.

Bytes are counted from the tensors themselves, once per storage. A 4-bit linear counts its
packed weights and every tensor of its quantization state: absmax, the nested absmax of
double quantization, and the code tables (bitsandbytes 0.50 keeps a ~1.1 KB copy per
layer, which matters only for very narrow layers). The peak is measured:
``torch.cuda.max_memory_allocated`` on GPU (reset at the start of each stage), and on CPU
the process's peak resident set size so far (``ru_maxrss``: it never goes down, so a later
stage shows at least an earlier stage's peak).
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from grow.model import GrowModel


def _unique_bytes(tensors) -> tuple[int, int]:
    """(elements, bytes) of distinct storages among ``tensors``."""
    seen, numel, nbytes = set(), 0, 0
    for t in tensors:
        if t is None:
            continue
        # A ZeRO-3 parameter's own data is empty; this rank holds its partition in ds_tensor.
        t = getattr(t, "ds_tensor", t)
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        numel += t.numel()
        nbytes += t.untyped_storage().nbytes()
    return numel, nbytes


def quant_state_tensors(weight) -> list[torch.Tensor]:
    """A bitsandbytes 4-bit weight's data and every tensor of its (nested) quantization state."""
    out = [weight]  # the parameter itself: under ZeRO-3 its .data is empty and ds_tensor holds the partition
    state = getattr(weight, "quant_state", None)
    while state is not None:
        out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = state.state2 if getattr(state, "nested", False) else None
    return out


def fourbit_linears(module: nn.Module) -> list[nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]


def fourbit_account(modules: list[nn.Module]) -> dict:
    """Original parameter count and bytes (data + quantization state) of 4-bit linears."""
    params = sum(m.in_features * m.out_features for m in modules)
    tensors = [t for m in modules for t in quant_state_tensors(m.weight)]
    _, nbytes = _unique_bytes(tensors)
    return {"params": params, "bytes": nbytes, "bytes_per_param": nbytes / params if params else 0.0}


def stage_account(model: GrowModel, spec, optimizer: torch.optim.Optimizer | None) -> dict:
    """Parameters and bytes of every part of the model state while stage ``spec`` trains.

    ``trained``: the blocks the stage trains in full precision (with their time embeddings);
    ``frozen_4bit`` / ``frozen_full_precision``: the frozen blocks' weights (4-bit linears
    counted with their quantization state); ``adapters``: the frozen blocks' LoRA adapters.
    """
    own = [p for k in spec.train for m in model.block_modules(k) for p in m.parameters()]
    ends = [model.embed_tokens.weight, model.norm.weight, model.lm_head.weight]
    frozen = [model.block(k) for k in spec.frozen]
    adapters = [p for b in frozen for n, p in b.named_parameters() if "lora_" in n]
    fourbit = [m for b in frozen for m in fourbit_linears(b)]
    fourbit_ids = {id(m.weight) for m in fourbit}
    frozen_other = [p for b in frozen for n, p in b.named_parameters() if "lora_" not in n and id(p) not in fourbit_ids]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_tensors = []
    if optimizer is not None:
        for state in optimizer.state.values():
            optimizer_tensors += [t for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0]

    def part(tensors):
        n, b = _unique_bytes(tensors)
        return {"params": n, "bytes": b}

    account = {
        "trained": {**part(own), "params": sum(p.numel() for p in own)},
        "gradients": part(trainable),  # one gradient per trainable parameter, same dtype
        "optimizer_state": part(optimizer_tensors),
        "frozen_4bit": fourbit_account(fourbit),
        "frozen_full_precision": part(frozen_other),
        "adapters": {**part(adapters), "trainable_params": sum(p.numel() for p in adapters if p.requires_grad)},
        "ends": {**part(ends), "trainable": any(p.requires_grad for p in ends)},
        "trainable_params": sum(p.numel() for p in trainable),
    }
    account["model_state_bytes"] = sum(
        account[k]["bytes"] for k in ("trained", "gradients", "optimizer_state", "frozen_4bit",
                                      "frozen_full_precision", "adapters", "ends")
    )
    return account


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_kind": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return {"peak_bytes": rss if sys.platform == "darwin" else rss * 1024, "peak_kind": "cpu_process_max_rss"}

"""The frozen suffix in 4-bit (bitsandbytes) with LoRA alignment adapters (peft).

After stage k+1 commits, block k+1 is frozen: its folded full-precision weights are in the
store, and from stage k on it runs as bitsandbytes ``Linear4bit`` layers (NF4 by default,
double quantization on) that peft wraps with a small trainable LoRA adapter.

Adapter carry-forward (a design decision, see README "Adapters across stages"): every
suffix block owns exactly one adapter, created the first time it becomes part of a suffix
and kept from then on. In stage k the adapters of the ``lora.blocks`` blocks nearest the
trained block (all of them by default) are trainable, the rest frozen. Adapters are not
merged into the 4-bit weights between stages, because merging into NF4 re-quantizes and
loses exactly the small correction the adapter learned; they are merged once, at export.

bitsandbytes and peft are imported lazily so ``grow`` runs (with ``quant.enabled: false``
and ``lora.enabled: false``) without them, and so a missing backend is one clear line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from grow.config import LoraConfig, QuantConfig
from grow.errors import UserError
from grow.model import BLOCK_LINEARS, GrowModel, is_folded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# peft saves adapters of an EuroBertForMaskedLM under this prefix; ours are keyed the same way
# so that ``PeftModel.from_pretrained(EuroBertForMaskedLM, stage_dir)`` loads them.
PEFT_PREFIX = "base_model.model.model.layers."


def bnb():
    """bitsandbytes, or a one-line error naming the setting that needs it."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "quant.enabled: the 4-bit suffix needs bitsandbytes (pip install bitsandbytes), "
            "or set quant.enabled=false"
        ) from None
    return bitsandbytes


def peft_lib():
    try:
        import peft
    except ImportError:
        raise UserError("lora.enabled: LoRA adapters need peft (pip install peft), or set lora.enabled=false") from None
    return peft


def quantize_block(block: nn.Module, cfg: QuantConfig, device: torch.device) -> None:
    """Replace a folded block's linears by bitsandbytes 4-bit layers, in place.

    The quantization happens in bitsandbytes' ``Params4bit.to(device)``; it is a
    deterministic function of the full-precision weights, so a resumed run rebuilds the
    same 4-bit values from the stored stage.
    """
    if not is_folded(block):
        raise ValueError("fold a block before quantizing it")
    lib = bnb()
    for name in BLOCK_LINEARS:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        linear = getattr(parent, attr)
        q = lib.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=DTYPES[cfg.compute_dtype], compress_statistics=cfg.double_quant, quant_type=cfg.quant_type, device="meta",
        )
        # One 4-bit CPU path on every machine. On CPUs with AVX512-BF16, bitsandbytes >= 0.49
        # repacks a layer's weight *in place* into a CPU-only layout the first time it runs in
        # eval mode without grad (held-out CE, sampling, export checks), with bf16 absmax and
        # its own kernel. That layout needs out_features % 32 == 0 and in_features % blocksize
        # == 0 (a width-32 model fails with "shape '[32, 0]' is invalid"), and it changes the
        # numerics: the same config would give other held-out CE, export logits and stage files
        # depending on the CPU a run lands on. The path used instead (dequantize, then matmul)
        # takes every shape. bitsandbytes reads this flag, set in __init__ from has_avx512bf16();
        # versions without the packed path ignore the attribute.
        q.support_avx512bf16_for_cpu = False
        q.weight = lib.nn.Params4bit(
            linear.weight.data.detach().to("cpu", torch.float32), requires_grad=False,
            compress_statistics=cfg.double_quant, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
        )
        if linear.bias is not None:  # biases stay in full precision, as bitsandbytes keeps them
            q.bias = nn.Parameter(linear.bias.data.detach().to("cpu", torch.float32), requires_grad=False)
        try:
            q = q.to(device)
        except (RuntimeError, NotImplementedError) as exc:
            raise UserError(f"quant.enabled: bitsandbytes cannot quantize on {device}: {exc}") from None
        setattr(parent, attr, q)
    block.requires_grad_(False)


def is_quantized(block: nn.Module) -> bool:
    lib = bnb()
    return any(isinstance(m, lib.nn.Linear4bit) for m in block.modules())


def add_adapter(model: GrowModel, block_id: int, cfg: LoraConfig) -> None:
    """Give block ``block_id`` a fresh LoRA adapter (B = 0, so the function is unchanged)."""
    peft = peft_lib()
    # peft picks its bitsandbytes-aware LoRA layer only on models that say they are 4-bit.
    model.is_loaded_in_4bit = any(is_quantized(model.block(k)) for k in range(model.first_block, model.last_block + 1))
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=[f"blocks.{block_id - 1}.{_qualified(t)}" for t in cfg.targets],
    )
    with warnings.catch_warnings():
        # Adding one block's adapter at a time is deliberate; peft warns on every second call.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def _qualified(target: str) -> str:
    return next(name for name in BLOCK_LINEARS if name.endswith(target))


def adapter_blocks(model: GrowModel) -> list[int]:
    """Ids of blocks that carry an adapter."""
    return sorted(
        k for k in range(model.first_block, model.last_block + 1)
        if any("lora_A" in n for n, _ in model.block(k).named_parameters())
    )


def adapter_parameters(model: GrowModel, block_id: int) -> list[nn.Parameter]:
    return [p for n, p in model.block(block_id).named_parameters() if "lora_" in n]


def adapter_delta(stored: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], block_id: int,
                  cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Block ``block_id``'s stored linears with its adapter merged in: W + (B @ A) * alpha / r.

    For a block that trains again in full precision after it was frozen: the adapter's
    correction becomes part of the weights it continues from, and the adapter goes away.
    Only the linears that carry an adapter are returned.
    """
    merged = {}
    for name in BLOCK_LINEARS:
        a = adapters.get(f"{PEFT_PREFIX}{block_id - 1}.{name}.lora_A.weight")
        b = adapters.get(f"{PEFT_PREFIX}{block_id - 1}.{name}.lora_B.weight")
        if a is None or b is None:
            continue
        key = f"model.layers.{block_id - 1}.{name}.weight"
        weight = stored[key]
        merged[key] = (weight.float() + (b.float() @ a.float()) * (cfg.alpha / cfg.rank)).to(weight.dtype)
    return merged


def peft_key(name: str) -> str:
    """Our parameter name -> peft's saved key for an EuroBertForMaskedLM.

    ``blocks.3.self_attn.q_proj.lora_A.default.weight`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
    """
    return PEFT_PREFIX + name[len("blocks."):].replace(f".{ADAPTER_NAME}.", ".")


def load_adapter_state(model: GrowModel, state: dict[str, torch.Tensor]) -> None:
    peft = peft_lib()
    own = {"blocks." + k[len(PEFT_PREFIX):]: v for k, v in state.items()}
    result = peft.set_peft_model_state_dict(model, own, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys:
        raise ValueError(f"stored adapters do not fit the model: {result.unexpected_keys[:3]}")


def write_adapters(state: dict[str, torch.Tensor], cfg: LoraConfig, directory: Path) -> None:
    """peft's on-disk format: adapter_config.json + adapter_model.safetensors (keys from ``peft_key``)."""
    from safetensors.torch import save_file

    peft = peft_lib()
    blocks = sorted({int(k[len(PEFT_PREFIX):].split(".")[0]) + 1 for k in state})
    state = {k: v.detach().contiguous().cpu() for k, v in sorted(state.items())}
    save_file(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=[f"model.layers.{k - 1}.{_qualified(t)}" for k in blocks for t in cfg.targets],
    )
    config.save_pretrained(directory)
    # peft writes target_modules as a set; keep the file deterministic for the manifest hash.
    path = directory / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def cast_ends(model: GrowModel, cfg: QuantConfig) -> None:
    """Frozen embedding, final norm and head in ``quant.ends_dtype``."""
    dtype = DTYPES[cfg.ends_dtype]
    for module in (model.embed_tokens, model.lm_head):
        module.to(dtype)

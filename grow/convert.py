"""Start from a pretrained causal LM of the Llama family: Llama (2, 3), Mistral, Qwen2/2.5.

A decoder layer of these models and a grow block (EuroBERT's layer) compute the same function
-- RMSNorm pre-norm, RoPE, grouped-query attention, SwiGLU, the same parameter names -- except
for the attention mask: EuroBERT's is bidirectional. So the conversion is a copy:

    checkpoint (transformers' own classes)      grow / EuroBertForMaskedLM
    model.embed_tokens                      ->  model.embed_tokens   (+ a mask row if added)
    model.layers.i.*                        ->  model.layers.i.*     (block i + 1)
    model.norm                              ->  model.norm
    lm_head (or the tied embedding)         ->  lm_head              (+ a mask row if added)

and the converted model's logits equal the source model's when the source is run with every
position visible (tests/test_convert.py). What cannot be mapped that exactly is refused with one
line naming it: another architecture, an activation other than SiLU, MLP biases, a head
dimension other than hidden/heads, a RoPE type EuroBERT's rotary does not compute the same way,
sliding-window layers. Qwen2's q/k/v biases map onto EuroBERT's ``attention_bias`` (which also
gives o_proj a bias; it is set to zero). A Mistral sliding window at least as long as the
sequence is plain causal attention, so the converted model's context is capped at the window.

A tokenizer without a mask token gets one (``<|mask|>``, a new special token). Its embedding
row and its head row start at the mean of the existing rows (so the new token starts as an
"average" input and as an average prediction rather than one the model is sure of), and the
tokenizer is saved in the run. When the checkpoint's embedding already has spare rows past the
tokenizer (Qwen2 pads its vocabulary), the mask token takes the first one, which is
re-initialised the same way; otherwise one row is appended.

The conversion is the run's stage 1 (``convert``, 0 steps): it stores the converted blocks and
ends like any stage, so every later stage, resume, evaluation and export read them from the
store and the source checkpoint is needed only once. Spectral norm and the residual gain
would change a pretrained block's function (W / sigma(W) rescales every linear), so blocks
taken from a checkpoint train without them (``block_stability``).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from grow.errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2")
# RoPE types whose frequencies EuroBERT's rotary embedding computes from the same config fields
# (transformers' ROPE_INIT_FUNCTIONS); others (yarn, longrope, ...) are refused until tested.
ROPE_TYPES = ("default", "linear", "llama3")
MASK_TOKEN = "<|mask|>"
FIELD = "model.init_from"
# The ModelConfig fields a checkpoint decides.
ARCHITECTURE = ("num_blocks", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                "max_position_embeddings", "rope_theta", "rms_norm_eps", "vocab_size", "attention_bias",
                "rope_scaling")


class CheckpointUnavailable(UserError):
    """model.init_from cannot be read here (offline, not downloaded): ``grow plan`` can still plan
    a config that spells the architecture out."""


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def source_config(path: str):
    """The checkpoint's transformers config, or one line saying why there is none."""
    transformers = _quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(_local(path))
    except Exception as exc:  # OSError, ValueError, JSON errors: all mean "not a usable checkpoint"
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not Path(path).expanduser().exists():  # "runs/x" reads as a hub id too: say both
            why = f"no local directory {path!r}, and as a hub id: {why}"
        raise CheckpointUnavailable(f"{FIELD}: could not load a transformers config from {path!r}: {why}") from None


def _local(path: str) -> str:
    from grow.data.sources import looks_local

    p = Path(path).expanduser()
    if looks_local(path) and not p.exists():
        raise CheckpointUnavailable(f"{FIELD}: no such checkpoint directory: {path}")
    return str(p) if p.exists() else path


def architecture(src) -> dict[str, Any]:
    """The ModelConfig fields of the checkpoint ``src`` (a transformers config); refuses what
    does not map exactly."""
    kind = getattr(src, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"{FIELD}: architecture {kind!r} is not supported; expected one of {', '.join(SUPPORTED)} "
                        "(Llama-family decoders)")
    heads = src.num_attention_heads
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // heads
    if head_dim * heads != src.hidden_size:
        raise UserError(f"{FIELD}: head_dim={head_dim} with {heads} heads is not hidden_size={src.hidden_size}; "
                        "grow's blocks need hidden_size = heads * head_dim")
    if getattr(src, "hidden_act", "silu") != "silu":
        raise UserError(f"{FIELD}: activation {src.hidden_act!r} is not mapped; EuroBERT's MLP uses silu")
    if getattr(src, "mlp_bias", False):
        raise UserError(f"{FIELD}: MLP biases (mlp_bias: true) are not mapped")
    rope = dict(getattr(src, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{FIELD}: rope type {rope_type!r} is not mapped; expected one of {', '.join(ROPE_TYPES)}")
    if getattr(src, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UserError(f"{FIELD}: partial rotary embeddings (partial_rotary_factor) are not mapped")
    theta = rope.pop("rope_theta", getattr(src, "rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if v is not None} if rope_type != "default" else None
    layer_types = getattr(src, "layer_types", None) or []
    if kind == "qwen2" and (getattr(src, "use_sliding_window", False) or "sliding_attention" in layer_types):
        raise UserError(f"{FIELD}: sliding-window attention (use_sliding_window) is not mapped")
    max_positions = src.max_position_embeddings
    window = getattr(src, "sliding_window", None) if kind == "mistral" else None
    if window is not None:
        # Causal attention over at most `window` positions is full causal attention: cap there.
        max_positions = min(max_positions, window)
    bias = bool(getattr(src, "attention_bias", False)) or kind == "qwen2"
    return {
        "num_blocks": src.num_hidden_layers,
        "hidden_size": src.hidden_size,
        "num_heads": heads,
        "num_kv_heads": getattr(src, "num_key_value_heads", None) or heads,
        "intermediate_size": src.intermediate_size,
        "max_position_embeddings": max_positions,
        "rope_theta": float(theta),
        "rms_norm_eps": float(src.rms_norm_eps),
        "vocab_size": src.vocab_size,
        "attention_bias": bias,
        "rope_scaling": scaling,
    }


def source_tokenizer(path: str):
    """The checkpoint's tokenizer with a mask token, and whether one was added."""
    transformers = _quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(_local(path))
    except Exception as exc:
        raise UserError(f"{FIELD}: could not load the tokenizer of {path!r} (the run uses the checkpoint's own): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if tokenizer.mask_token_id is not None:
        return tokenizer, False
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer, True


def vocab_rows(src_vocab: int, tokenizer) -> int:
    """Rows of the converted embedding and head: the checkpoint's, plus one if the mask token
    falls past them."""
    return max(src_vocab, len(tokenizer))


def resolve_init_from(raw: dict[str, Any], stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """A raw config with ``model.init_from`` completed from the checkpoint.

    Fields the config leaves out take the checkpoint's values; one it gives must agree.
    ``stored`` is the model section of the run being resumed: when the checkpoint is no
    longer reachable it stands in for it (its stage 1 holds everything converted).
    """
    raw = copy.deepcopy(raw)
    model = raw["model"]
    path = model["init_from"]
    if not isinstance(path, str):
        raise UserError(f"{FIELD}: expected a checkpoint directory or hub id, got {path!r}")
    try:
        arch = architecture(source_config(path))
        tokenizer, _ = source_tokenizer(path)
        arch["vocab_size"] = vocab_rows(arch["vocab_size"], tokenizer)
    except CheckpointUnavailable:
        if not stored or stored.get("init_from") != path:
            raise
        arch = {name: stored.get(name) for name in ARCHITECTURE}
    for name, value in arch.items():
        given = model.get(name)
        if name in model and given is not None and given != value:
            raise UserError(f"model.{name}: {given!r} contradicts the checkpoint {path!r}, which has {value!r}; "
                            f"leave model.{name} out when model.init_from is set")
        model[name] = value
    data = raw.get("data") or {}
    if data.get("tokenizer", "train") not in ("train", path):
        raise UserError(f"data.tokenizer: {data['tokenizer']!r} contradicts {FIELD}; a converted model uses its "
                        "checkpoint's tokenizer (leave data.tokenizer out)")
    return raw


def block_stability(cfg):
    """The stability kit of the blocks a run trains: off for blocks taken from a checkpoint.

    Spectral norm divides every linear by its largest singular value and the residual gain
    scales each branch: both would change a pretrained block's function at step 0.
    """
    if cfg.model.init_from and cfg.model.init_blocks:
        return replace(cfg.stability, spectral_norm=False, gamma=1.0)
    return cfg.stability


# --------------------------------------------------------------------------- weights


def load_source(path: str):
    """The checkpoint as transformers' own causal-LM class loads it, on the CPU, in its stored dtype."""
    transformers = _quiet_transformers()
    transformers.utils.logging.disable_progress_bar()  # a bar per load tells a run's log nothing
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(_local(path), dtype="auto").eval()
    except Exception as exc:
        raise UserError(f"{FIELD}: could not load {path!r} with AutoModelForCausalLM: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


@torch.no_grad()
def converted_weights(source, tokenizer, added: bool, vocab_size: int, *, blocks: bool = True
                      ) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` (a loaded causal LM) under EuroBertForMaskedLM's names.

    Blocks only when ``blocks``. ``tokenizer`` is the run's; when its mask token was ``added``,
    the mask row of the embedding and of the head is set to the mean of the rows before it
    (a row that was padding in the checkpoint included).
    """
    embed = source.get_input_embeddings().weight
    if vocab_size < embed.shape[0]:
        raise UserError(f"model.vocab_size: {vocab_size} is smaller than the checkpoint's {embed.shape[0]} rows")
    weights = {"model.embed_tokens.weight": _rows(embed, vocab_size),
               "model.norm.weight": source.model.norm.weight.detach(),
               "lm_head.weight": _rows(source.get_output_embeddings().weight, vocab_size)}
    if added:
        mask = tokenizer.mask_token_id
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            w = weights[key]
            w[mask] = w[:mask].float().mean(0).to(w.dtype)
    if blocks:
        bias = source.config.model_type == "qwen2" or bool(getattr(source.config, "attention_bias", False))
        for i, layer in enumerate(source.model.layers):
            # The source's own tensors, not copies: the source is dropped right after.
            state = {f"model.layers.{i}.{k}": v.detach() for k, v in layer.state_dict().items()}
            o_bias = f"model.layers.{i}.self_attn.o_proj.bias"
            if bias and o_bias not in state:  # Qwen2: EuroBERT's attention_bias gives o_proj one too
                state[o_bias] = torch.zeros(layer.self_attn.o_proj.out_features, dtype=embed.dtype)
            weights.update(state)
    return weights


def _rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """A copy of ``matrix`` with zero rows appended up to ``rows``."""
    out = torch.zeros(rows, matrix.shape[1], dtype=matrix.dtype)
    out[:matrix.shape[0]] = matrix.detach()
    return out


def convert(path: str, tokenizer, added: bool, vocab_size: int, *, blocks: bool = True) -> dict[str, torch.Tensor]:
    """Load ``path`` through transformers and return its converted tensors (``converted_weights``)."""
    source = load_source(path)
    try:
        return converted_weights(source, tokenizer, added, vocab_size, blocks=blocks)
    finally:
        del source


# --------------------------------------------------------------------------- the convert stage


def converted_model(cfg, tokenizer, spec, weights: dict[str, torch.Tensor], device="cpu"):
    """The model stage ``convert`` leaves, built from its tensors before they are committed:
    exactly what ``load_run`` rebuilds from the committed stage (eval mode): every block frozen,
    in 4-bit with a zero LoRA adapter per quant/lora (full precision with quant.enabled false)."""
    from grow.assemble import RunState, assemble
    from grow.store import Stage

    pending = Stage(path=Path(f".{spec.name}.pending"), manifest={"stage": spec.to_dict()})
    state = RunState([pending])
    state._loaded[pending.name] = weights  # what the stage will store, without a round trip to disk
    return assemble(cfg, tokenizer, spec, state, device, training=False)


def commit_conversion(cfg, spec, run: Path, corpus, backend, log) -> None:
    """Stage ``convert``: load the checkpoint, store its converted tensors, measure them, commit.

    The held-out figures are those of the converted model as ``load_run`` rebuilds it from
    this stage (bidirectional, no training, every block frozen as the adapt stages hold them:
    4-bit when quant.enabled): the step-0 reference of the run. Memory: the checkpoint once in
    CPU memory in its stored dtype (the converted tensors share it), then one frozen model on
    the device -- what an adapt stage holds, less its one full-precision block.
    """
    import time

    from grow.evaluate import level_report
    from grow.memory import peak_bytes, reset_peak, stage_account
    from grow.stages import versions
    from grow.store import write_stage

    start = time.perf_counter()
    path = cfg.model.init_from
    src_cfg = source_config(path)
    _, added = source_tokenizer(path)
    tokenizer = corpus.tokenizer
    log(f"{spec.name}: converting {src_cfg.model_type} checkpoint {path} ({src_cfg.num_hidden_layers} layers, "
        f"{'blocks and ends' if spec.first <= spec.last else 'embedding, norm and head only'})"
        + (f"; added mask token {tokenizer.mask_token!r} (id {tokenizer.mask_token_id}), rows = mean of the others"
           if added else ""))
    weights = convert(path, tokenizer, added, cfg.model.vocab_size, blocks=spec.first <= spec.last)
    reset_peak(backend.device)
    model = converted_model(cfg, tokenizer, spec, weights, backend.device)
    from grow.engine import autocast

    with autocast(cfg, backend.device):
        own, levels = level_report(model, cfg, spec, corpus.heldout, corpus.mask_token_id, backend.device)
    memory = {**stage_account(model, spec, None), **peak_bytes(backend.device), "trainable_adapter_blocks": []}
    del model
    seconds = time.perf_counter() - start
    if backend.is_main:
        manifest = {
            "steps": 0, "tokens_seen": 0, "heldout_ce": own, "levels": levels, "final_train_loss": None,
            "losses": [], "train_seconds": seconds, "memory": memory, "world_size": backend.world,
            "data": {"source": cfg.data.source, "train_sequences": int(corpus.train.shape[0]),
                     "heldout_sequences": int(corpus.heldout.shape[0]), "position": 0},
            "converted_from": {"path": path, "model_type": src_cfg.model_type,
                               "layers": src_cfg.num_hidden_layers, "blocks": spec.first <= spec.last,
                               "mask_token_added": added, "mask_token": tokenizer.mask_token,
                               "mask_rows": "mean of the existing rows" if added else "the checkpoint's"},
            "schedule": cfg.ratios(), "config": cfg.to_dict(), "versions": versions(),
        }
        write_stage(run, spec.to_dict(), weights, manifest, max_shard_size=cfg.store.max_shard_size,
                    tokenizer=tokenizer)
        log(f"{spec.name} committed: held-out masked CE of the converted model at {spec.noise.describe()} is "
            f"{own:.4f} ({seconds:.1f} s)")
    backend.barrier()


def save_run_tokenizer(path: str, directory: Path, log) -> None:
    """Save the checkpoint's tokenizer (with its mask token) as the run's, unless the run has one."""
    from grow.data.tokenizer import has_tokenizer, save_tokenizer

    if has_tokenizer(Path(directory)):
        return
    tokenizer, added = source_tokenizer(path)
    if added:
        log(f"tokenizer: {path} has no mask token; added {tokenizer.mask_token!r} as id {tokenizer.mask_token_id}")
    save_tokenizer(tokenizer, Path(directory))

"""Export a grown run as ONE stock Hugging Face model: ``grow export RUN --out DIR``.

    DIR/
      config.json                      EuroBertConfig (model_type eurobert, dtype)
      model.safetensors | model-0000i-of-0000n.safetensors (+ index)   EuroBertForMaskedLM
      tokenizer.json, tokenizer_config.json, ...                       the run's tokenizer
      grow.json                        schedule r_1..r_L, sampling defaults, provenance
      README.md                        model card

``AutoModelForMaskedLM.from_pretrained(DIR)`` loads it with stock transformers, no remote
code: every block already *is* an ``EuroBertDecoderLayer`` whose spectral norm and residual
gain were folded into plain weights when it was frozen, so the export is a merge of the
LoRA adapters and a rename, nothing more.

Merge (``--merge-into``), for every linear of blocks 2..L that carries an adapter:

    dequantized (default)  W = dequant(NF4(W_k)) + (B @ A) * alpha / r
                           the 4-bit weight the suffix ran with during training, so the
                           export computes what training computed and measured;
    original               W = W_k + (B @ A) * alpha / r
                           the stored full-precision weight of stage k; the adapter learned
                           to correct the 4-bit weight, so this is a slightly different net.

W_k always comes from stage-kk (full precision); the delta is peft's own
``get_delta_weight`` on the loaded model's LoRA layers. peft's ``Linear4bit.merge`` is not
used: it re-quantizes the sum to NF4, which loses the very correction the adapter learned.

The directory is written into a hidden temporary sibling and renamed into place at the end,
so a failed export leaves nothing half-written and an old export is replaced only by a
complete new one. ``--push-to-hub`` uploads the finished directory; the hub token is taken
from huggingface_hub's usual places and never printed, logged, written or put in an error.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from grow.errors import UserError
from grow.model import BLOCK_LINEARS
from grow.quant import ADAPTER_NAME
from grow.store import (STORAGE_ERRORS, StorageError, fsync_dir, require_run, storage_reason,
                        write_json_atomic, write_text_atomic)

Log = Callable[[str], None]

MERGE_MODES = ("dequantized", "original")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GROW_JSON = "grow.json"
FORMAT_VERSION = 2  # 2: curriculum, level paths, per-level CE
SAMPLING_DEFAULTS = {"mode": "depth", "steps": 64, "temperature": 0.0}
CARD_TAGS = ("diffusion", "masked-diffusion", "grow")
# The self-check after writing: logits of the reloaded export against the grown model.
CHECK_SEQUENCES, CHECK_LENGTH, CHECK_MASKED = 2, 64, 0.5


class HubError(Exception):
    """An upload that failed after the local export was complete. The message is redacted."""


# --------------------------------------------------------------------------- input checks


_REPO_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's repo-id rules, ASCII only; a one-line UserError naming --push-to-hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None
    if not _REPO_ID.fullmatch(repo_id or ""):
        problem = "expected NAME or NAMESPACE/NAME using only letters, digits, '.', '_' and '-'"
    elif len(repo_id) > 96:
        problem = f"it has {len(repo_id)} characters, at most 96 are allowed"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc).rstrip(".").split(":")[0].lower()
    if problem is not None:
        raise UserError(f"--push-to-hub: {repo_id!r} is not a valid Hugging Face repo id: {problem}")


def check_out(out: Path, run: Path, overwrite: bool) -> Path:
    """The export directory, refused when it holds something and --overwrite was not given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    resolved, run_resolved = out.resolve(), run.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents:
        raise UserError(f"--out: {out} would replace the run {run} itself; choose another directory")
    # An export never writes into a run: not into this one, another one, a stage, or anything inside them.
    for place in (resolved, *resolved.parents):
        if (place / "grow.yaml").is_file():
            what = "is" if place == resolved else f"is inside {place}, which is"
            raise UserError(f"--out: {out} {what} a grow run; export to a directory outside every run")
    if resolved == Path.cwd().resolve():
        raise UserError(f"--out: {out} is the working directory; choose a directory to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {out} exists and is not empty; pass --overwrite to replace it")
    return out


# --------------------------------------------------------------------------- the merge


def _lora_layer(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft installed: no run of this machine can carry adapters
        return False
    return isinstance(module, LoraLayer)


def _is_4bit(linear) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no run of this machine ran in 4-bit
        return False
    return isinstance(linear, bnb.nn.Linear4bit)


def _dequantized(linear) -> torch.Tensor:
    """The full-precision weight a bitsandbytes 4-bit layer computes with."""
    import bitsandbytes as bnb

    weight = linear.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


@torch.no_grad()
def merged_linear(module, stored: torch.Tensor, merge_into: str) -> tuple[torch.Tensor, bool, bool]:
    """(merged fp32 weight, adapter merged?, base dequantized?) of one block linear.

    ``module`` is the linear as the loaded model runs it: plain ``nn.Linear``, bitsandbytes
    ``Linear4bit``, or a peft LoRA layer around either. ``stored`` is its stage weight.
    """
    lora = _lora_layer(module)
    base = module.get_base_layer() if lora else module
    dequantize = merge_into == "dequantized" and _is_4bit(base)
    weight = _dequantized(base) if dequantize else stored.float().clone()
    if weight.shape != stored.shape:
        raise ValueError(f"dequantized weight has shape {tuple(weight.shape)}, stored {tuple(stored.shape)}")
    merged = lora and ADAPTER_NAME in module.lora_A
    if merged:
        if module.merged_adapters:
            raise ValueError("adapters are already merged into the loaded model; load the run afresh")
        weight += module.get_delta_weight(ADAPTER_NAME).float().to(weight.device)
    return weight, merged, dequantize


@torch.no_grad()
def merged_state_dict(model, run_state, merge_into: str,
                      dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """EuroBertForMaskedLM weights of a complete run in ``dtype``, and what the merge did.

    ``model`` is ``load_run``'s model (the network the last stage left); ``run_state`` the
    run's ``grow.assemble.RunState``, whose stored full-precision weights are the base of
    every block. Merging happens in fp32; each tensor is cast as soon as it is final, so at
    most one block is held in fp32 besides the result.
    """
    if merge_into not in MERGE_MODES:
        raise UserError(f"--merge-into: expected one of {', '.join(MERGE_MODES)}, got {merge_into!r}")
    L = model.num_blocks
    state: dict[str, torch.Tensor] = {}
    adapters, dequantized = set(), set()
    for k in range(1, L + 1):
        stored = run_state.block(k)
        prefix = f"model.layers.{k - 1}."
        state.update({n: v.to(dtype) for n, v in stored.items() if n.startswith(prefix)})
        for name in BLOCK_LINEARS:
            key = f"{prefix}{name}.weight"
            weight, merged, dequantize = merged_linear(model.block(k).get_submodule(name), stored[key], merge_into)
            state[key] = weight.to(dtype)
            if merged:
                adapters.add(k)
            if dequantize:
                dequantized.add(k)
        del stored
    if merge_into == "dequantized":
        # The ends as training ran them (in quant.ends_dtype once they were frozen).
        ends = model.ends_state_dict()
    else:
        ends = run_state.ends()
    state.update({n: v.detach().to(dtype, copy=True) for n, v in ends.items()})
    return state, {"adapter_blocks": sorted(adapters), "dequantized_blocks": sorted(dequantized)}


def build_hf(config, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """A stock EuroBertForMaskedLM holding ``state`` (already in ``dtype``; no random init on the way)."""
    import copy

    from transformers import EuroBertForMaskedLM
    from transformers.models.eurobert.modeling_eurobert import EuroBertRotaryEmbedding

    config = copy.deepcopy(config)
    config.dtype = dtype
    with torch.device("meta"):
        hf = EuroBertForMaskedLM(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"merged weights do not fit EuroBertForMaskedLM: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    # Non-persistent buffers (RoPE's inv_freq) are not in a state dict: build them for real.
    hf.model.rotary_emb = EuroBertRotaryEmbedding(config=config)
    return hf.eval()


@torch.no_grad()
def logit_difference(reference: Callable[[torch.Tensor], torch.Tensor], exported, *, vocab_size: int,
                     mask_id: int, length: int, seed: int = 0) -> float:
    """Max |logit difference| of two denoisers on seeded random half-masked sequences."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (CHECK_SEQUENCES, length), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < CHECK_MASKED] = mask_id
    a = reference(ids).float()
    b = exported(input_ids=ids).logits.float()
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- metadata and card


def stage_records(stages: list) -> list[dict[str, Any]]:
    """One line per committed stage, from its manifest."""
    return [{"stage": s.name, "trains": s.spec["train"], "trains_ends": s.spec["trains_ends"],
             "adapters": s.spec["adapters"], "noise": s.spec["noise"], "level": s.spec["level"],
             "steps": s.manifest["steps"], "tokens_seen": s.manifest["tokens_seen"],
             "heldout_ce": s.manifest["heldout_ce"]} for s in stages]


def level_records(final_stage, ratios: list[float]) -> list[dict[str, Any]]:
    """Held-out CE per schedule level as the last stage left the model: whole stack and path."""
    levels = final_stage.manifest.get("levels", {})
    out = []
    for k, r in enumerate(ratios, start=1):
        entry = {"level": k, "ratio": r, "whole": levels.get("whole", {}).get(str(k))}
        if str(k) in levels.get("path", {}):
            entry["path"] = levels["path"][str(k)]
        out.append(entry)
    return out


CURRICULUM_TEXT = {
    "right_to_left": ("right to left (depth as reverse time): the first stage trained block {L} with the embedding, "
                      "final norm and shared LM head at the lightest noise; each later stage froze the blocks to its "
                      "right (in 4-bit, with LoRA adapters) and the ends, prepended the next block and trained it at "
                      "its heavier noise level, so that blocks k..{L} denoise level r_k through the shared head."),
    "left_to_right": ("left to right: each stage appended a block after the ones already grown and trained the "
                      "network 1..k"),
    "joint": "jointly: every block and the ends trained at once on noise levels t ~ U(0, 1)",
    "adapt": ("by adapting a pretrained causal LM (converted with bidirectional attention): each stage trained "
              "one of its {L} blocks in full precision while every other block ran frozen in 4-bit with LoRA "
              "adapters, through the whole stack"),
}


def export_command(run: Path, out: Path, *, dtype: str, merge_into: str, max_shard_size: str, overwrite: bool,
                   extra: Sequence[str] = ()) -> str:
    """The grow command line that reproduces an export (defaults spelled out)."""
    args = ["grow", "export", str(run), "--out", str(out), "--dtype", dtype, "--merge-into", merge_into,
            "--max-shard-size", max_shard_size]
    return shlex.join(args + (["--overwrite"] if overwrite else []) + list(extra))


def model_card(meta: dict[str, Any], *, name: str, parameters: int, quant: dict[str, Any]) -> str:
    """README.md: YAML front matter for the hub, then how the model was grown, how good it is
    per noise level, and how to use it."""
    L = len(meta["schedule"])
    tags = "".join(f"- {t}\n" for t in CARD_TAGS)
    cur = meta["curriculum"]
    grown = CURRICULUM_TEXT[cur["kind"]].format(L=L)
    if cur["kind"] == "left_to_right":
        grown += " at level r_k (time as depth)." if cur["time"] == "depth" else " on t ~ U(0, 1)."
    if cur["time"] == "input" and cur["kind"] == "right_to_left":
        grown += " Each block saw a band of noise levels around its r_k."
    if cur.get("final_steps"):
        grown += (" A final stage then trained the whole stack on t ~ U(0, 1), every block in 4-bit with LoRA "
                  "adapters (merged here), so that the whole model uses its context at every noise level.")
    stages = "\n".join(
        f"| {s['stage']} | {', '.join(f'B{k}' for k in s['trains']) or '-'}{' + ends' if s['trains_ends'] else ''} | "
        f"{_noise(s['noise'])} | {s['steps']:,} | {s['tokens_seen']:,} | {s['heldout_ce']:.4f} |"
        for s in meta["stages"]
    )
    levels = "\n".join(
        f"| {e['level']} | {e['ratio']:.3f} | {_ce(e['whole'])} | {_ce(e.get('path'))} |" for e in meta["levels"]
    )
    if meta["merge_into"] == "dequantized":
        merge = ("`dequantized`: each frozen block's LoRA delta (B·A·alpha/r) was added to the **dequantized "
                 f"{quant['quant_type'].upper()}** weight the block ran with during training, so this model "
                 "computes what training computed.")
    else:
        merge = ("`original`: each frozen block's LoRA delta (B·A·alpha/r) was added to the block's stored "
                 "**full-precision** weight. The adapters were trained against the 4-bit weights, so this model "
                 "differs slightly from the network training measured (see the check below).")
    if not meta["merge"]["adapter_blocks"]:
        merge += " This run had no adapters: the weights are the stored ones."
    check = meta["check"]
    sampling = meta["sampling"]
    depth_modes = (f"\ngrow sample {name} --mode depth --temperature {sampling['temperature']} --length 64   "
                   "# one forward pass, block k unmasks down to r_(k+1)") if meta.get("paths") else ""
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags:
{tags}---

# {name}

A masked-diffusion language model grown with `grow`, one transformer block at a time. It is a stock
`EuroBertForMaskedLM` ({L} layers, hidden size {meta['hidden_size']}, {parameters:,} parameters,
{meta['dtype']}): it loads with plain `transformers`, no remote code.

## How it was grown

Block k is tied to noise level r_k (the fraction of tokens masked), r_1 > ... > r_L. Growth ran
{grown} Each frozen block's spectral norm and residual gain were folded into plain weights.

| stage | trains | noise | steps | tokens seen | held-out masked CE at commit |
|---|---|---|---:|---:|---:|
{stages}

## Quality per noise level

Held-out masked cross-entropy (nats) of this model at each schedule level, measured by `grow` on
the run's held-out split when the last stage committed. **Whole stack** is what this model computes
when you run it (fill-mask, iterative and semi-autoregressive decoding, likelihoods); **path** is the
sub-network a depth-tied sampler uses for that level (blocks k..L grown right to left).

| level k | r_k | whole stack | path |
|---:|---:|---:|---:|
{levels}

## Merge

{merge}

Check at export: max |logit difference| against the grown model (as `grow` ran it) on
{CHECK_SEQUENCES} random sequences of {check['length']} tokens, {int(CHECK_MASKED * 100)}% masked:
**{check['max_abs_logit_diff']:.3g}**.

## Use

```python
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
ids = tokenizer("In the beginning", return_tensors="pt")["input_ids"]
masked = torch.cat([ids, torch.full((1, 16), tokenizer.mask_token_id)], dim=1)
logits = model(input_ids=masked).logits       # one denoising prediction for every position
```

Sampling with `grow`:

```bash
grow sample {name} --mode iterative --steps {sampling['steps']} --prompt "In the beginning"{depth_modes}
```

`grow.json` holds the schedule r_1..r_{L}, the level paths the depth samplers need, the sampling
defaults, the per-level figures above and the provenance of this export.

## Provenance

```bash
{meta['command']}
```

Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.
"""


def _noise(noise: dict[str, float]) -> str:
    return f"r = {noise['lo']:.3f}" if noise["lo"] == noise["hi"] else f"t ~ U({noise['lo']:.3f}, {noise['hi']:.3f})"


def _ce(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- the export


def export_run(
    run: Path,
    out: Path,
    *,
    dtype: str | None = None,
    merge_into: str = "dequantized",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    command_extra: Sequence[str] = (),
    card_name: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Write the merged model of a complete run to ``out``; returns the ``grow.json`` written.

    ``dtype`` None means the run's ``train.precision``. ``command_extra`` are further flags
    (hub options) recorded in the exported command line; ``card_name`` is what the model
    card loads the model as (the hub repo id when pushing; default ``out``).
    """
    from grow.units import parse_bytes

    run = require_run(Path(run))
    out = check_out(Path(out), run, overwrite)
    if merge_into not in MERGE_MODES:
        raise UserError(f"--merge-into: expected one of {', '.join(MERGE_MODES)}, got {merge_into!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        parse_bytes(max_shard_size)
    except ValueError as exc:
        raise UserError(f"--max-shard-size: {exc}") from None

    from grow.lock import DirLock

    with DirLock(out, "grow export", flag="--out"):
        return _export(run, out, dtype=dtype, merge_into=merge_into, max_shard_size=max_shard_size,
                       overwrite=overwrite, command_extra=command_extra, card_name=card_name, log=log)


def _export(run: Path, out: Path, *, dtype, merge_into, max_shard_size, overwrite, command_extra, card_name,
            log) -> dict[str, Any]:
    from grow.assemble import RunState
    from grow.curriculum import level_paths, stage_specs
    from grow.stages import committed, load_run, versions
    from grow.units import format_bytes

    out = check_out(out, run, overwrite)  # again, now that nobody else writes it
    cfg, model, tokenizer, _ = load_run(run, "cpu", require_complete=True)
    if model.time_embed is not None:
        raise UserError(f"RUN: {run} is conditioned on the noise level (curriculum.conditioning=embedding), which a "
                        "stock EuroBertForMaskedLM cannot express; sample and evaluate it with grow itself")
    if cfg.objective.corruption == "gaussian":
        raise UserError(f"RUN: {run} was trained with gaussian input noise at masked positions, which a stock "
                        "EuroBertForMaskedLM (it embeds [MASK]) cannot reproduce; sample and evaluate it with grow itself")
    dtype = dtype or cfg.train.precision
    L = model.num_blocks
    stages, _ = committed(run, stage_specs(cfg), verify=False)  # load_run has just verified every hash
    log(f"export: {run} ({L} blocks) -> {out}, merge into {merge_into} weights, {dtype}")
    state, merge = merged_state_dict(model, RunState(stages), merge_into, DTYPES[dtype])
    if merge["adapter_blocks"]:
        log(f"export: merged the LoRA adapters of blocks {_span(merge['adapter_blocks'])}"
            + (f" into dequantized {cfg.quant.quant_type.upper()} weights" if merge["dequantized_blocks"] else ""))

    hf = build_hf(model.config, state, DTYPES[dtype])
    del state
    parameters = sum(p.numel() for p in hf.parameters())
    final = out.resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        hf.save_pretrained(tmp, max_shard_size=max_shard_size)
        del hf
        _save_tokenizer(tokenizer, tmp, model.config.max_position_embeddings)
        length = min(CHECK_LENGTH, cfg.data.seq_len)
        diff = _check(model, tmp, DTYPES[dtype], vocab_size=model.config.vocab_size,
                      mask_id=tokenizer.mask_token_id, length=length, seed=cfg.train.seed)
        log(f"export: reloaded with AutoModelForMaskedLM; max |logit difference| against the grown model {diff:.3g}")
        meta = {
            "format_version": FORMAT_VERSION,
            "schedule": cfg.ratios(),
            "curriculum": {"kind": cfg.curriculum.kind, "time": cfg.curriculum.time,
                           "final_steps": cfg.curriculum.final_steps},
            "paths": {str(k): list(v) for k, v in (level_paths(cfg) or {}).items()} or None,
            "sampling": {**SAMPLING_DEFAULTS, "mode": "refine" if cfg.objective.corruption in ("uniform", "duo")
                         else "depth" if level_paths(cfg) else "iterative"},
            "corruption": cfg.objective.corruption,
            "merge_into": merge_into,
            "dtype": dtype,
            "seq_len": cfg.data.seq_len,
            "hidden_size": cfg.model.hidden_size,
            "stages": stage_records(stages),
            "levels": level_records(stages[-1], cfg.ratios()),
            "merge": merge,
            "check": {"max_abs_logit_diff": diff, "reference": "the grown model as grow runs it (load_run)",
                      "sequences": CHECK_SEQUENCES, "length": length, "masked": CHECK_MASKED},
            "run": _run_record(run, cfg),
            "versions": versions(),
            "command": export_command(run, out, dtype=dtype, merge_into=merge_into, max_shard_size=max_shard_size,
                                      overwrite=overwrite, extra=command_extra),
        }
        write_json_atomic(tmp / GROW_JSON, meta)
        write_text_atomic(tmp / "README.md", model_card(meta, name=card_name or str(out), parameters=parameters,
                                                       quant={"quant_type": cfg.quant.quant_type}))
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            # transformers writes shards 0600 through a temp file; an export is for sharing.
            path.chmod(0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _replace_dir(tmp, final)
    except STORAGE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{out} is as it was" if out.exists() else f"nothing was written to {out}"
        raise StorageError(f"writing the export {out} failed: {storage_reason(exc)}; {kept}, the run is "
                           "untouched; make room and run the export again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(f"export: wrote {out} ({format_bytes(size)}, {parameters:,} parameters)")
    return meta


def _save_tokenizer(tokenizer, directory: Path, max_length: int) -> None:
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(directory)
    # transformers 5 names its fast-tokenizer class TokenizersBackend; PreTrainedTokenizerFast
    # is the same class there and the name transformers 4 knows too.
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json_atomic(path, data)


def _run_record(run: Path, cfg) -> dict[str, Any]:
    quant = {"quant_type": cfg.quant.quant_type, "double_quant": cfg.quant.double_quant,
             "blocksize": cfg.quant.blocksize, "compute_dtype": cfg.quant.compute_dtype}
    lora = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.targets}
    return {"path": str(run), "seed": cfg.train.seed, "data": cfg.data.source, "precision": cfg.train.precision,
            "heldout_fraction": cfg.data.heldout_fraction, "quant": quant if cfg.quant.enabled else None,
            "lora": lora if cfg.lora.enabled else None}


def _check(model, directory: Path, dtype: torch.dtype, **kw) -> float:
    from transformers import AutoModelForMaskedLM

    exported = AutoModelForMaskedLM.from_pretrained(str(directory), dtype=dtype).eval()
    return logit_difference(model, exported, **kw)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is deleted only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _span(blocks: list[int]) -> str:
    return f"{blocks[0]}..{blocks[-1]}" if blocks == list(range(blocks[0], blocks[-1] + 1)) else ", ".join(
        map(str, blocks))


# --------------------------------------------------------------------------- the hub


def hub_token() -> str | None:
    """The token huggingface_hub would use (HF_TOKEN, or the login cache); only for redaction."""
    import huggingface_hub

    return huggingface_hub.get_token()


_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def redact(text: str, token: str | None) -> str:
    """``text`` without the token value, nor anything shaped like a hub token."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def retry_hint(repo_id: str, out: Path, revision: str | None, private: bool) -> str:
    args = ["hf", "upload", repo_id, str(out), "."]
    if revision:
        args += ["--revision", revision]
    if private:
        args += ["--private"]
    return shlex.join(args)


def push_to_hub(out: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                log: Log = print) -> None:
    """Upload a finished export. Any hub failure becomes a ``HubError`` with a redacted one-liner.

    The token is never passed here: ``HfApi`` finds it where ``hf auth login`` or HF_TOKEN put it.
    """
    import huggingface_hub

    token = hub_token()
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model", revision=revision,
                          commit_message=f"grow export {out.name}")
    except Exception as exc:  # any library error: never let its text (or traceback) out unredacted
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise HubError(redact(f"{type(exc).__name__}: {first[:300]}", token)) from None
    where = f" (branch {revision})" if revision else ""
    log(redact(f"export: pushed {out} to https://huggingface.co/{repo_id}{where}", token))

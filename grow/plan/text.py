"""The human-readable plan that ``grow plan`` prints (``--json`` prints ``Plan.to_dict`` instead)."""

from __future__ import annotations

import textwrap

from grow.config import GrowConfig
from grow.plan.counts import block_params, ends_params
from grow.plan.planner import Plan, StagePlan
from grow.units import format_bytes


def bytes_text(n: float) -> str:
    text = format_bytes(n)
    if "e+" in text:  # format_bytes' 3 significant digits print 1000..1023 of a unit as 1e+03
        value, unit = text.split()
        return f"{float(value):.0f} {unit}"
    return text


def _params(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


COLUMNS = ("stage", "r_max", "trainable", "weights", "grads", "optim", "ends", "suffix", "LoRA", "work",
           "act", "act-ckpt", "logits", "total", "fits", "GFLOP/tok")


def _row(s: StagePlan, label: str) -> list[str]:
    b = s.block_state
    return [
        label, f"{s.ratio:.3f}", _params(s.trainable_params), bytes_text(b.params), bytes_text(b.grads),
        bytes_text(b.optimizer), bytes_text(s.ends_state.gpu), bytes_text(s.suffix),
        bytes_text(s.lora_state.gpu), bytes_text(s.workspace), bytes_text(s.activations),
        bytes_text(s.activations_ckpt), bytes_text(s.logits), bytes_text(s.total),
        "yes" if s.fits else "NO", f"{s.flops_per_token / 1e9:.3g}",
    ]


def _suffix_text(cfg: GrowConfig) -> str:
    q, lora = cfg.quant, cfg.lora
    text = (f"{q.quant_type.upper()}, blocksize {q.blocksize}, double quant {'on' if q.double_quant else 'off'}"
            if q.enabled else "fp32 (quant off)")
    if not lora.enabled:
        return text + "; LoRA off"
    where = f"the {lora.blocks} nearest blocks" if lora.blocks else "every suffix block"
    return text + f"; LoRA r={lora.rank} on {', '.join(lora.targets)}, trainable on {where}"


def _batch_text(p: Plan) -> str:
    batch = p.cfg.train.batch_size
    if p.accumulation is None:
        return f"micro-batch x {p.par.gpus} GPU(s) does not divide train.batch_size {batch}"
    return f"x {p.par.gpus} GPU(s) x {p.accumulation} accumulation steps = train.batch_size {batch}"


def render(p: Plan) -> str:
    """The human-readable plan: header, one row per stage, peak, totals and the comparison."""
    cfg, m = p.cfg, p.cfg.model
    e = sum(ends_params(m, p.vocab).values())
    total_params = m.num_blocks * block_params(m) + e
    lines = [
        f"grow plan: {m.num_blocks} blocks x {_params(block_params(m))} params + ends {_params(e)} = "
        f"{_params(total_params)} params",
        f"  shape: hidden {m.hidden_size}, heads {m.num_heads} (kv {m.num_kv_heads}, head_dim {m.head_dim}), "
        f"intermediate {m.intermediate_size}, vocab {p.vocab}",
        f"  setup: {p.par.describe()}, {bytes_text(p.gpu_memory)} each; precision {cfg.train.precision}; "
        f"micro-batch {p.micro_batch} x seq {p.seq_len} per GPU ({_batch_text(p)})",
        f"  suffix: {_suffix_text(cfg)}; gradient checkpointing of the suffix: {'on' if p.grad_ckpt else 'off'}",
        "  assumptions:",
        *(textwrap.fill(note, width=110, initial_indent="    - ", subsequent_indent="      ")
          for note in p.assumptions),
        textwrap.fill(
            "columns: bytes per GPU; weights/grads/optim = the trained block after ZeRO (weights include "
            "spectral-norm buffers); ends = embedding + norm + head with their grads and optimizer when trained; "
            "LoRA = adapters with grads and optimizer; work = workspace (estimate); act / act-ckpt = activations "
            f"without / with checkpointing of the suffix (estimate); total uses {'act-ckpt' if p.grad_ckpt else 'act'}"
            "; GFLOP/tok = forward + backward" + (" + recompute" if p.grad_ckpt else "") + " per token",
            width=112, initial_indent="  ", subsequent_indent="    "),
        "",
    ]
    rows = [list(COLUMNS)] + [_row(s, s.name) for s in p.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    peak = p.peak
    lines += [
        "",
        f"peak: {peak.name} at {bytes_text(peak.total)} of {bytes_text(p.gpu_memory)} -- "
        + ("every stage fits" if p.fits
           else f"{sum(not s.fits for s in p.stages)} of {len(p.stages)} stages do NOT fit"),
    ]
    host = max(s.host for s in p.stages)
    if host:
        lines.append(f"host memory for offloaded states (peak stage, per GPU): {bytes_text(host)}")
    total = f"total: {p.total_tokens:,} tokens, {p.total_flops:.3g} FLOPs"
    seconds = p.seconds(p.total_flops)
    if seconds is not None:
        total += f", about {_duration(seconds)} at {p.throughput:g} TFLOPS x {p.par.gpus} GPU(s)"
    else:
        total += " (pass --throughput TFLOPS for a wall time)"
    lines += [total, "", "compare (same GPUs, ZeRO setup and micro-batch; logits at r_1):"]
    for other in (p.full, p.qlora):
        flops = p.total_tokens * other.flops_per_token
        sec = p.seconds(flops)
        lines.append(
            f"  {other.name:<20} trainable {_params(other.trainable_params):>6}, model states "
            f"{bytes_text(other.model_states)}, work {bytes_text(other.workspace)}, act "
            f"{bytes_text(other.selected_activations)}, logits {bytes_text(other.logits)} -> total "
            f"{bytes_text(other.total)}, fits: {'yes' if other.fits else 'NO'}; "
            f"{other.flops_per_token / 1e9:.3g} GFLOP/tok" + (f", {_duration(sec)} for the same tokens" if sec else "")
        )
    lines.append(
        f"  {'grow (this plan)':<20} peak {bytes_text(peak.total)}, fits: "
        f"{'yes' if p.fits else 'NO'}; "
        f"{p.total_flops / max(1, p.total_tokens) / 1e9:.3g} GFLOP/tok on average"
        + (f", {_duration(seconds)}" if seconds else "")
    )
    return "\n".join(lines)

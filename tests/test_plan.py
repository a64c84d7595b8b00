"""grow plan: its exact formulas against real tensors, its ZeRO and FLOP arithmetic, the CLI.

The planner is pure arithmetic; these tests build the modules it describes on CPU (GrowModel
blocks with spectral norm, bitsandbytes NF4 layers quantized by ``.to('cpu')``, peft
adapters, torch AdamW after a real step) and demand byte-exact agreement. Activation
estimates are not validated here, only their arithmetic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grow.cli import main
from grow.config import LoraConfig, QuantConfig, StabilityConfig, load_config
from grow.model import GrowModel, add_stability, hf_config
from grow.curriculum import stage_specs
from grow.plan import (
    Parallel,
    adamw_state_bytes,
    block_forward_flops,
    block_linears,
    block_params,
    ends_params,
    frozen_block_bytes,
    lora_params,
    lora_tensors,
    nf4_linear_bytes,
    fit,
    parse_deepspeed,
    plan,
    read_deepspeed,
    render,
    rope_bytes,
    trainable_states,
    trained_block_bytes,
)

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

CONFIGS = sorted(Path("configs").glob("*.yaml"))
# A medium shape beside the tiny one: 4 blocks, width 256, grouped-query attention (8 q / 2 kv heads).
MEDIUM = [
    "model.num_blocks=4", "model.hidden_size=256", "model.num_heads=8", "model.num_kv_heads=2",
    "model.intermediate_size=704", "model.max_position_embeddings=128", "data.seq_len=64",
    "data.vocab_size=512", "schedule.ratios=null", "train.batch_size=2", "train.steps=[10, 20, 30, 40]",
    "curriculum.final_steps=0",  # growth stages only: stages[-1] is the deepest growth stage
]


def tiny():
    return load_config("configs/tiny.yaml")


def medium(extra=()):
    return load_config("configs/tiny.yaml", [*MEDIUM, *extra])


def shapes():
    return [pytest.param(tiny(), id="tiny"), pytest.param(medium(), id="medium")]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_tensors(state) -> list[torch.Tensor]:
    """Every tensor a bitsandbytes QuantState holds, nested state included."""
    out = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif type(value).__name__ == "QuantState":
            out += quant_state_tensors(value)
    return out


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters + buffers + 4-bit quant states, each storage counted once."""
    seen, total = set(), 0
    tensors = [*module.parameters(), *module.buffers()]
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            tensors += quant_state_tensors(m.weight.quant_state)
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total


def grow_model(cfg) -> GrowModel:
    return GrowModel(hf_config(cfg.model, cfg.data.vocab_size, {"mask": 0}))


# --------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("cfg", shapes())
def test_block_and_ends_parameter_counts_equal_a_real_growmodel(cfg):
    model = grow_model(cfg)
    block = model.new_block(cfg.model.num_blocks)
    assert block_params(cfg.model) == sum(p.numel() for p in block.parameters())
    ends = ends_params(cfg.model, cfg.data.vocab_size)
    assert ends == {"embed": model.embed_tokens.weight.numel(), "norm": model.norm.weight.numel(),
                    "head": model.lm_head.weight.numel()}
    assert rope_bytes(cfg.model) == sum(nbytes(b) for b in model.buffers())


@pytest.mark.parametrize("cfg", shapes())
@pytest.mark.parametrize("spectral_norm, gamma", [(True, 0.5), (True, 1.0), (False, 0.5), (False, 1.0)])
def test_trained_block_bytes_equal_its_parameters_and_buffers(cfg, spectral_norm, gamma):
    stability = StabilityConfig(spectral_norm=spectral_norm, gamma=gamma)
    block = grow_model(cfg).new_block(1)
    add_stability(block, stability)
    measured = sum(nbytes(p) for p in block.parameters()) + sum(nbytes(b) for b in block.buffers())
    assert trained_block_bytes(cfg.model, stability) == measured
    if spectral_norm:  # what really exists: the original weight as a parameter, u and v as buffers
        names = {n for n, _ in block.named_buffers()}
        assert "self_attn.k_proj.parametrizations.weight.0._u" in names


@pytest.mark.parametrize("in_features, out_features", [(128, 128), (256, 64), (100, 60), (704, 256), (4096, 8)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_linear_formula_equals_a_real_linear4bit(in_features, out_features, double_quant, blocksize):
    quant = QuantConfig(double_quant=double_quant, blocksize=blocksize)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4", blocksize=blocksize)
    layer = layer.to("cpu")  # quantizes
    state = layer.weight.quant_state
    assert layer.weight.dtype == torch.uint8 and state.nested == double_quant
    measured = nbytes(layer.weight) + sum(nbytes(t) for t in quant_state_tensors(state))
    assert nf4_linear_bytes(in_features, out_features, quant) == measured == module_bytes(layer)


@pytest.mark.parametrize("cfg", shapes())
def test_frozen_block_bytes_equal_a_block_quantized_by_grow(cfg):
    from grow.quant import quantize_block

    block = grow_model(cfg).new_block(1)
    quantize_block(block, cfg.quant, torch.device("cpu"))
    assert frozen_block_bytes(cfg.model, cfg.quant) == module_bytes(block)
    off = QuantConfig(enabled=False)
    assert frozen_block_bytes(cfg.model, off) == 4 * block_params(cfg.model)


@pytest.mark.parametrize("cfg", shapes())
@pytest.mark.parametrize("rank, targets", [(8, None), (4, ["q_proj", "v_proj"]), (2, ["Wo", "W1", "W2"])])
def test_lora_parameter_count_equals_peft_adapters(cfg, rank, targets):
    lora = LoraConfig(rank=rank, **({"targets": targets} if targets else {}))
    block = grow_model(cfg).new_block(1)
    block.requires_grad_(False)
    block = peft.inject_adapter_in_model(
        peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets)), block)
    adapters = [p for n, p in block.named_parameters() if "lora_" in n]
    assert lora_params(cfg.model, lora) == sum(p.numel() for p in adapters)
    assert lora_tensors(lora) == len(adapters)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in adapters)


def adamw_after_one_step(params: list[torch.nn.Parameter]) -> int:
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum((p.float() ** 2).sum() for p in params).backward()
    opt.step()
    return sum(nbytes(t) for state in opt.state.values() for t in state.values())


@pytest.mark.parametrize("cfg", shapes())
def test_adamw_state_bytes_after_a_real_step_of_a_trained_block(cfg):
    block = grow_model(cfg).new_block(1)
    add_stability(block, cfg.stability)
    params = [p for p in block.parameters() if p.requires_grad]
    measured = adamw_after_one_step(params)
    assert adamw_state_bytes(block_params(cfg.model), len(params)) == measured
    assert trainable_states(block_params(cfg.model), len(params), Parallel()).optimizer == measured
    assert trainable_states(block_params(cfg.model), len(params), Parallel()).grads == sum(
        nbytes(p.grad) for p in params)


@pytest.mark.parametrize("stage", ["last", "suffix"])
def test_a_real_stage_on_cpu_has_exactly_the_planned_model_states(stage):
    """Build the medium shape's stage L, or stage L-2 with a 2-block NF4 suffix (one adapter
    trainable, one frozen) and bf16 ends, as grow does; then one AdamW step."""
    from grow.quant import add_adapter, adapter_parameters, cast_ends, quantize_block

    cfg = medium(["lora.blocks=1", "quant.ends_dtype=bf16"])
    L = cfg.model.num_blocks
    k = L if stage == "last" else L - 2
    model = grow_model(cfg)
    for block_id in range(L, k, -1):
        model.prepend_block(model.new_block(block_id))
    for block_id in range(k + 1, L + 1):
        model.block(block_id).requires_grad_(False)
    model.freeze_ends(k != L)
    for block_id in range(L, k, -1):
        quantize_block(model.block(block_id), cfg.quant, torch.device("cpu"))
        add_adapter(model, block_id, cfg.lora)
    if k < L:
        for block_id in range(k + 1, L + 1):  # lora.blocks=1: only the nearest adapter trains
            for p in adapter_parameters(model, block_id):
                p.requires_grad_(block_id == k + 1)
        cast_ends(model, cfg.quant)
    block = model.new_block(k)
    add_stability(block, cfg.stability)
    model.prepend_block(block)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw_after_one_step(params)
    grads = sum(nbytes(p.grad) for p in params)
    measured = module_bytes(model) + grads + optimizer

    planned = plan(cfg).stages[L - k]
    assert planned.block == k
    assert planned.model_states == measured
    assert planned.trainable_params == sum(p.numel() for p in params)
    assert planned.block_state.grads + planned.ends_state.grads + planned.lora_state.grads == grads
    assert planned.block_state.optimizer + planned.ends_state.optimizer + planned.lora_state.optimizer == optimizer


# --------------------------------------------------------------------------- ZeRO and precision


@pytest.mark.parametrize(
    "ds, block, adapters",
    [
        ({}, (4000, 4000, 8000, 0), (4000, 4000, 8000, 0)),
        ({"zero_optimization": {"stage": 1}}, (4000, 4000, 2000, 0), (4000, 4000, 2000, 0)),
        ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, (2000, 500, 3000, 0), (4000, 1000, 2000, 0)),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}, (500, 500, 3000, 0), (1000, 1000, 2000, 0)),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": True}},
         (2000, 500, 0, 3000), (4000, 1000, 0, 2000)),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                "offload_param": {"device": "cpu"}}, "bf16": {"enabled": True}},
         (0, 500, 0, 3500), (0, 1000, 0, 3000)),
    ],
)
def test_zero_partitioning_of_a_trainable_set(ds, block, adapters):
    """1000 parameters on 4 GPUs: (weights, grads, optimizer, host) bytes per GPU."""
    par = parse_deepspeed(ds, gpus=4, precision="bf16")
    s = trainable_states(1000, 9, par)
    assert (s.params, s.grads, s.optimizer, s.host) == block
    # Adapters stay fp32 (no separate master) whatever DeepSpeed does with the block's weights.
    a = trainable_states(1000, 2, par, always_fp32=True)
    assert (a.params, a.grads, a.optimizer, a.host) == adapters


def test_plain_pytorch_partitions_nothing_and_adamw_counts_step_tensors():
    s = trainable_states(1000, 9, Parallel(gpus=8))
    assert (s.params, s.grads, s.optimizer) == (4000, 4000, 8000 + 4 * 9)


def test_bf16_auto_follows_train_precision():
    assert parse_deepspeed({"bf16": {"enabled": "auto"}}, 1, "bf16").half
    assert not parse_deepspeed({"bf16": {"enabled": "auto"}}, 1, "fp32").half


def test_zero3_partitions_the_trained_block_and_the_packed_suffix():
    cfg = medium()
    one = plan(cfg, gpus=1, deepspeed={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    eight = plan(cfg, gpus=8, deepspeed={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    two = plan(cfg, gpus=8, deepspeed={"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    a, b = one.stages[-1], eight.stages[-1]
    assert a.suffix == 3 * frozen_block_bytes(cfg.model, cfg.quant) == two.stages[-1].suffix
    assert b.suffix == 3 * frozen_block_bytes(cfg.model, cfg.quant, shards=8) < a.suffix
    # Only the packed weights and norms are divided; the quantization state stays whole.
    packed = sum(math.ceil(lin.params / 2) for lin in block_linears(cfg.model))
    assert a.suffix - b.suffix == 3 * (packed - sum(math.ceil(math.ceil(lin.params / 2) / 8)
                                                   for lin in block_linears(cfg.model))
                                       + 8 * cfg.model.hidden_size - 8 * math.ceil(cfg.model.hidden_size / 8))
    assert b.block_state.optimizer == math.ceil(12 * block_params(cfg.model) / 8)
    assert b.lora_state.optimizer == math.ceil(8 * 3 * lora_params(cfg.model, cfg.lora) / 8)
    assert any("ZeRO-3" in note for note in eight.assumptions)


# --------------------------------------------------------------------------- activations, FLOPs, time


def test_activation_terms_follow_the_documented_formulas():
    cfg = medium(["train.precision=bf16"])
    m, B, T, V = cfg.model, 2, 64, 512
    p = plan(cfg, grad_ckpt=False)
    h, kv, inter = 256, 64, 704
    # Trained block under bf16 autocast: fp32 norm inputs, normalized inputs (the residual stream is
    # fp32) and rsqrt; bf16 q/k/v/output, fp32 LSE; gate/silu/up/product; a copy per q/k/v/gate/up input.
    trained = B * T * (2 * (4 * h + 4 * h + 4) + 2 * (2 * h + 2 * kv) + 4 * m.num_heads + 2 * 4 * inter + 2 * 5 * h)
    # Frozen NF4 block under bf16 autocast: fp32 norm inputs + rsqrt, bf16 q/k/v/output, fp32 LSE,
    # fp32 gate/silu/up (bitsandbytes returns its input's dtype); its trainable adapter: a bf16
    # copy of the input per q/k/v/gate/up target, down_proj's input, A x per target.
    frozen_lora = B * T * (4 * 2 * (h + 1) + 2 * (2 * h + 2 * kv) + 4 * m.num_heads + 4 * 3 * inter
                           + 2 * (5 * h + inter + 8 * 7))
    last, first = p.stages[0], p.stages[-1]
    assert last.activations == last.activations_ckpt == trained
    assert first.activations == trained + 3 * frozen_lora
    # Checkpointed: the fp32 boundary hidden states + one block recomputed (less its input).
    assert first.activations_ckpt == trained + B * T * 3 * h * 4 + frozen_lora - B * T * h * 4
    r = first.ratio
    assert first.logits == B * math.ceil(r * T) * (V * (2 + 4) + 2 * h * 2)
    assert last.logits == B * math.ceil(cfg.ratios()[-1] * T) * (V * 6 + 4 * h)
    # Checkpointing saves memory once the suffix has more than one block.
    assert all(s.activations_ckpt <= s.activations for s in p.stages)
    assert p.stages[-1].activations_ckpt < p.stages[-1].activations
    assert p.stages[-1].total == (p.stages[-1].model_states + p.stages[-1].workspace + p.stages[-1].activations
                                  + p.stages[-1].logits)


def saved_bytes_per_token(cfg, adapter: str, batch: int, device: str = "cpu") -> int:
    """Bytes autograd saves in one forward of a frozen block built as grow builds a stage's suffix
    (grow.quant: NF4 + peft LoRA), under the stage's precision (grow.engine.autocast).

    Each storage is counted once; parameters, buffers and the rope tables (computed once per
    forward and shared by every block) are left out.
    """
    from grow.quant import add_adapter, quantize_block

    device = torch.device(device)
    model, k = grow_model(cfg).to(device), cfg.model.num_blocks
    model.prepend_block(model.new_block(k))
    block = model.block(k).requires_grad_(False)
    if adapter == "trained":  # the stage's trained block: full precision, stability kit, all trainable
        add_stability(block, cfg.stability)
        block.requires_grad_(True)
        return saved_in_forward(model, block, cfg, batch, device)
    if cfg.quant.enabled:
        quantize_block(block, cfg.quant, device)
    if adapter != "none":
        add_adapter(model, k, cfg.lora)
    model.requires_grad_(False)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name and adapter == "trainable")
    return saved_in_forward(model, block, cfg, batch, device)


def saved_in_forward(model, block, cfg, batch: int, device: torch.device) -> int:
    from grow.engine import autocast

    T = cfg.data.seq_len
    hidden = torch.randn(batch, T, cfg.model.hidden_size, device=device, requires_grad=True) * 1.0  # a block's output
    positions = torch.arange(T, device=device).unsqueeze(0)
    rope = model.rotary_emb(hidden, position_ids=positions)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *rope]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with autocast(cfg, device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden, position_embeddings=rope, position_ids=positions)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("adapter", ["trainable", "frozen", "none"])
def test_frozen_block_activations_equal_what_autograd_saves(precision, quantized, adapter):
    """The planner's per-token bytes of a frozen block equal what autograd keeps for backward.

    Under bf16 autocast over fp32 weights a 4-bit block keeps its MLP activations in fp32
    (bitsandbytes returns its input's dtype) and one bf16 copy of the input per adapter: 1.75x
    the all-bf16 estimate this formula replaced, and the size of the gap measured on an H200.
    Per token = the difference between batch 2 and batch 1, so per-weight tensors (autocast's
    casts of the adapter weights) drop out. o_proj is left out of the targets: on CPU the fused
    attention output's layout follows q's, and whether o_proj's adapter input is that tensor or
    a copy depends on it; with CUDA's flash kernel it is the same tensor, as the planner counts.
    """
    from grow.plan.counts import frozen_block_activation_bytes

    cfg = medium([f"train.precision={precision}", f"quant.enabled={str(quantized).lower()}",
                  "lora.targets=[q_proj, k_proj, v_proj, gate_proj, up_proj, down_proj]"])
    T = cfg.data.seq_len
    measured = saved_bytes_per_token(cfg, adapter, 2) - saved_bytes_per_token(cfg, adapter, 1)
    a = 2 if precision == "bf16" else 4
    planned = frozen_block_activation_bytes(cfg.model, a, cfg.lora if adapter == "trainable" else None,
                                            quantized=quantized)
    assert measured == T * planned


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_trained_block_activations_equal_what_autograd_saves(precision):
    """The same for the block a stage trains (fp32 master weights, spectral norm, residual gain):
    under bf16 autocast its norms keep fp32 tensors and each of q/k/v/gate/up its own bf16 copy."""
    from grow.plan.counts import trained_block_activation_bytes

    cfg = medium([f"train.precision={precision}"])
    measured = saved_bytes_per_token(cfg, "trained", 2) - saved_bytes_per_token(cfg, "trained", 1)
    a = 2 if precision == "bf16" else 4
    assert measured == cfg.data.seq_len * trained_block_activation_bytes(cfg.model, a)


@pytest.mark.gpu
def test_frozen_block_activations_on_cuda_equal_what_autograd_saves():
    """On CUDA, with every LoRA target (o_proj's adapter input is the attention output there: peft
    does not round-trip it through fp32 under CUDA autocast), the count holds as on CPU -- and a
    math SDPA backend, which keeps a T x T matrix, would break it."""
    from grow.plan.counts import frozen_block_activation_bytes

    cfg = medium(["train.precision=bf16", "data.seq_len=128", "model.max_position_embeddings=128"])
    measured = saved_bytes_per_token(cfg, "trainable", 2, "cuda") - saved_bytes_per_token(cfg, "trainable", 1, "cuda")
    assert measured == cfg.data.seq_len * frozen_block_activation_bytes(cfg.model, 2, cfg.lora)


def test_flops_per_token_and_wall_time():
    cfg = medium(["lora.enabled=false"])
    T, h, V = 64, 256, 512
    p = plan(cfg, grad_ckpt=False, throughput=100.0, gpus=2)
    F = block_forward_flops(cfg.model, T)
    assert F == 2 * (256 * 256 * 2 + 2 * 256 * 64 + 3 * 256 * 704) + 4 * T * h
    ratios = cfg.ratios()
    for s in p.stages:
        suffix = cfg.model.num_blocks - s.block
        head = 2 * h * V * math.ceil(ratios[s.block - 1] * T) / T
        expected = (F + suffix * F + head) + (2 * F + suffix * F + (2 if suffix == 0 else 1) * head)
        assert s.flops_per_token == pytest.approx(expected, rel=1e-12)
    with_ckpt = plan(cfg, grad_ckpt=True)
    assert with_ckpt.stages[-1].flops_per_token == pytest.approx(p.stages[-1].flops_per_token + 3 * F)
    tokens = [cfg.steps_for(s.block) * cfg.train.batch_size * T for s in p.stages]
    assert [s.tokens for s in p.stages] == tokens
    expected_seconds = sum(t * s.flops_per_token for t, s in zip(tokens, p.stages)) / (100e12 * 2)
    assert p.to_dict()["totals"]["seconds"] == pytest.approx(expected_seconds)


def test_comparison_rows_bracket_the_growth():
    cfg = load_config("configs/llama2-7b.yaml")
    p = plan(cfg, gpus=1, gpu_memory=80 * 2**30, micro_batch=1)
    n = 32 * block_params(cfg.model) + sum(ends_params(cfg.model, 32000).values())
    assert p.full.trainable_params == n
    assert p.full.model_states == 16 * n + 4 * (9 * 32 + 3) + rope_bytes(cfg.model)
    assert p.qlora.suffix == 32 * frozen_block_bytes(cfg.model, cfg.quant)
    assert p.qlora.trainable_params == 32 * lora_params(cfg.model, cfg.lora)
    # The trade the comparison shows: grow's peak is far below full training on one 80 GiB GPU.
    assert not p.full.fits and all(s.fits for s in p.stages)
    assert p.peak.block == 1 and p.peak.total < p.full.total


# --------------------------------------------------------------------------- CLI


def run(*args):
    return main(["plan", *map(str, args)])


def test_cli_table_has_a_row_per_stage_and_the_peak(capsys):
    assert run("configs/tiny.yaml", "--gpu-memory", "24GiB") == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("stage-")]
    assert [r[0] for r in rows] == [f"stage-0{i}-block0{7 - i}" for i in range(1, 7)]
    assert all(r[-2] in ("yes", "NO") for r in rows)
    assert "peak: stage-06-block01" in out and "full joint training" in out and "QLoRA everywhere" in out
    assert "24 GiB" in out


def test_llama2_70b_on_8_gpus_with_zero3_plans_every_stage(tmp_path, capsys):
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
                              "train_micro_batch_size_per_gpu": 1}))
    assert run("configs/llama2-70b.yaml", "--gpus", 8, "--deepspeed", ds, "--json", "--throughput", 400) == 0
    data = json.loads(capsys.readouterr().out)
    # 80 growth stages, block 80 first, then the final whole-stack stage (no single block)
    assert [s["block"] for s in data["stages"]] == [*range(80, 0, -1), None]
    assert data["stages"][-1]["name"] == "stage-81-whole"
    assert all(s["bytes"]["total"] > 0 and s["flops_per_token"] > 0 for s in data["stages"])
    assert data["setup"]["zero_stage"] == 3 and data["setup"]["gpus"] == 8
    assert data["totals"]["tokens"] > 0 and data["totals"]["seconds"] > 0
    assert data["peak"]["total"] == max(s["bytes"]["total"] for s in data["stages"])
    assert data["compare"]["full"]["trainable_params"] == data["shape"]["total_params"]


def test_render_prints_every_stage_of_a_deep_model():
    text = render(plan(load_config("configs/llama2-70b.yaml"), micro_batch=1))
    rows = [line for line in text.splitlines() if line.lstrip().startswith("stage-")]
    assert len(rows) == 81


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_plans(path, tmp_path):
    from test_convert import shipped_config

    cfg = shipped_config(path, tmp_path)
    p = plan(cfg)
    # One planned row per stage the curriculum yields (joint runs have one, left-to-right
    # with periodic joint stages more than num_blocks), each named like its stage directory.
    assert [s.name for s in p.stages] == [spec.name for spec in stage_specs(cfg)]
    assert p.peak.total > 0


@pytest.mark.parametrize("name, shape", [
    ("125m.yaml", (12, 768, 12, 4, 2048, 32000)),
    ("1b.yaml", (22, 2048, 32, 4, 5632, 32000)),
    ("llama2-7b.yaml", (32, 4096, 32, 32, 11008, 32000)),
    ("llama2-70b.yaml", (80, 8192, 64, 8, 28672, 32000)),
])
def test_shipped_shapes(name, shape):
    cfg = load_config(Path("configs") / name)
    m = cfg.model
    assert (m.num_blocks, m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size) == shape
    assert cfg.train.precision == "bf16" and cfg.quant.enabled and cfg.lora.enabled
    assert cfg.schedule.ratios is None and cfg.schedule.r_max == 1.0 and cfg.schedule.r_min == 0.15
    assert cfg.data.vocab_size == m.vocab_size
    if m.num_blocks >= 22:
        assert cfg.train.checkpoint_suffix


# --------------------------------------------------------------------------- what fits


def test_fit_is_the_largest_micro_batch_that_fits_and_divides_the_batch_per_gpu():
    cfg = medium(["train.batch_size=24", "train.precision=bf16"])
    # A budget between the plans at micro-batch 5 and 6: 5 fits, 4 is the largest divisor of 24/2 = 12.
    budget = (plan(cfg, gpus=2, micro_batch=5).peak.total + plan(cfg, gpus=2, micro_batch=6).peak.total) // 2
    found = fit(cfg, gpus=2, gpu_memory=budget)
    assert (found.largest, found.micro_batch, found.accumulation) == (5, 4, 3)
    assert found.plan.micro_batch == 4 and found.plan.fits and found.plan.accumulation == 3
    assert not plan(cfg, gpus=2, gpu_memory=budget, micro_batch=6).fits
    assert found.summary().startswith("fit: micro-batch 4 per GPU x 2 GPUs x gradient accumulation 3 "
                                      "= train.batch_size 24; every stage fits")
    assert "micro-batch 5 fits too, but does not divide the 12 sequences per GPU" in found.summary()
    # All of it fits: the whole share of the batch on each GPU, no accumulation.
    assert fit(cfg, gpus=2, gpu_memory=2**40).micro_batch == 12


def test_when_nothing_fits_fit_names_the_changes_that_would_each_checked():
    cfg = load_config("configs/llama2-70b.yaml")
    found = fit(cfg, gpus=1, gpu_memory=24 * 2**30)
    assert found.micro_batch is None and found.largest == 0 and found.plan.micro_batch == 1
    assert found.summary() == ("fit: nothing fits even at micro-batch 1 on 1 GPU of 24 GiB: stage-80-block01 needs 66 GiB "
                               "per GPU; it would fit with --gpus 8 under ZeRO-3 (--deepspeed ds_configs/zero3.json)")
    zero3 = read_deepspeed("ds_configs/zero3.json")
    assert plan(cfg, gpus=8, gpu_memory=24 * 2**30, deepspeed=zero3, micro_batch=1).fits
    assert not plan(cfg, gpus=4, gpu_memory=24 * 2**30, deepspeed=zero3, micro_batch=1).fits


def test_fit_suggests_suffix_checkpointing_and_offload_where_they_suffice():
    cfg = medium(["train.precision=bf16", "train.checkpoint_suffix=false"])
    plain, ckpt = plan(cfg, micro_batch=1), plan(cfg, micro_batch=1, grad_ckpt=True)
    assert ckpt.peak.total < plain.peak.total
    found = fit(cfg, gpu_memory=(plain.peak.total + ckpt.peak.total) // 2)
    assert found.micro_batch is None and "train.checkpoint_suffix=true" in found.helps
    hopeless = fit(cfg, gpu_memory=2**20)
    assert hopeless.helps == [] and hopeless.summary().endswith("shorten data.seq_len or use GPUs with more memory")


def test_fit_on_the_70b_shape_and_one_80gib_gpu_prints_a_micro_batch_and_every_stage_fits(capsys):
    assert run("configs/llama2-70b.yaml", "--gpus", 1, "--gpu-memory", "80GiB", "--fit") == 0
    out = capsys.readouterr().out
    assert "-- every stage fits" in out
    assert out.rstrip().splitlines()[-1].startswith(
        "fit: micro-batch 1 per GPU x 1 GPU x gradient accumulation 512 = train.batch_size 512; every stage fits")
    assert run("configs/llama2-70b.yaml", "--gpus", 1, "--gpu-memory", "80GiB", "--fit", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fit"]["micro_batch"] == data["setup"]["micro_batch"] == 1 and data["fits"]
    assert data["fit"]["accumulation"] == data["setup"]["accumulation"] == 512


def test_the_readme_quickstart_plan_fits(capsys):
    line = next(line for line in Path("README.md").read_text().splitlines()
                if line.startswith("grow plan configs/llama2-70b.yaml"))
    assert run(*line.split()[2:]) == 0
    assert "-- every stage fits" in capsys.readouterr().out


# What the README and the configs' comments name for each shipped shape: it must fit as shipped.
NAMED_SETUPS = [
    ("125m", 1, "24GiB", None), ("1b", 1, "24GiB", None), ("1b", 8, "80GiB", "ds_configs/zero3.json"),
    ("llama2-7b", 1, "80GiB", None), ("llama2-7b", 8, "80GiB", "ds_configs/zero2.json"),
    ("llama2-70b", 1, "80GiB", None), ("llama2-70b", 8, "80GiB", "ds_configs/zero3.json"),
]


@pytest.mark.parametrize("shape, gpus, memory, ds", NAMED_SETUPS, ids=lambda v: str(v))
def test_shipped_configs_fit_the_setups_named_for_them_out_of_the_box(shape, gpus, memory, ds):
    from grow.units import parse_bytes

    cfg = load_config(f"configs/{shape}.yaml")
    p = plan(cfg, gpus=gpus, gpu_memory=parse_bytes(memory), deepspeed=read_deepspeed(ds) if ds else None)
    assert p.fits and p.accumulation is not None
    assert p.micro_batch == (cfg.train.micro_batch_size or cfg.train.batch_size // gpus)


def test_readme_and_docs_hold_the_table_bench_plan_table_prints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_table", "bench/plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.table()
    assert table in Path("README.md").read_text()
    assert table in Path("docs/plan.md").read_text()


def test_each_stage_is_planned_from_its_spec_alone():
    """Planning the same stages in another order gives the same rows: nothing but the spec matters."""
    import dataclasses

    from grow.curriculum import stage_specs

    cfg = medium()
    specs = stage_specs(cfg)
    assert [(s.train, s.trains_ends, len(s.frozen)) for s in specs] == [((4,), True, 0), ((3,), False, 1),
                                                                        ((2,), False, 2), ((1,), False, 3)]
    forward, backward = plan(cfg, specs=specs), plan(cfg, specs=specs[::-1])
    assert [s.to_dict() for s in forward.stages] == [s.to_dict() for s in backward.stages[::-1]]
    # The index and label only name the stage: stage 1's spec under another name costs the same.
    renamed = plan(cfg, specs=[dataclasses.replace(specs[0], index=9, label="other")]).stages[0]
    assert renamed.name == "stage-09-other"
    same = {"name": "", "label": ""}
    assert renamed.to_dict() | same == forward.stages[0].to_dict() | same


CURRICULUM_PLANS = {
    "right_to_left+bands+embedding+final": ["curriculum.time=input", "curriculum.conditioning=embedding",
                                            "curriculum.final_steps=2", "lora.blocks=1"],
    "left_to_right+joint": ["curriculum.kind=left_to_right", "curriculum.joint_every=2", "curriculum.joint_steps=2"],
    "left_to_right+window": ["curriculum.kind=left_to_right", "lora.blocks=1", "curriculum.anchor_ends=false"],
    "joint": ["curriculum.kind=joint", "curriculum.time=input"],
}


@pytest.mark.parametrize("name", CURRICULUM_PLANS)
def test_every_stage_of_every_curriculum_has_exactly_the_planned_model_states(tmp_path, corpus_file, name):
    """Each stage of a real (tiny, 3-block) run rebuilt as grow.assemble builds it for training,
    one AdamW step, every byte counted: the plan of that stage says the same."""
    from conftest import grow_in_process, tiny_config
    from grow.assemble import RunState, assemble
    from grow.curriculum import stage_specs
    from grow.stages import committed

    cfg = tiny_config(corpus_file, blocks=3, steps=2, extra=["quant.ends_dtype=bf16", *CURRICULUM_PLANS[name]])
    run = tmp_path / "run"
    corpus = grow_in_process(run, cfg)
    specs = stage_specs(cfg)
    stages, _ = committed(run, specs)
    planned = plan(cfg, micro_batch=1).stages
    for i, spec in enumerate(specs):
        torch.manual_seed(0)
        model = assemble(cfg, corpus.tokenizer, spec, RunState(stages[:i]), "cpu", training=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw_after_one_step(params)
        grads = sum(nbytes(p.grad) for p in params)
        p = planned[i]
        assert p.name == spec.name
        assert p.trainable_params == sum(q.numel() for q in params), spec.name
        assert p.model_states == module_bytes(model) + grads + optimizer, spec.name


def bad_shape(tmp_path, model: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {{{model}}}\n")
    return path


@pytest.mark.parametrize(
    "make_args, flag",
    [
        (lambda tmp: [bad_shape(tmp, "hidden_size: 100, num_heads: 3")], "model.num_heads"),
        (lambda tmp: [bad_shape(tmp, "hidden_size: 128, num_heads: 4, num_kv_heads: 3")], "model.num_kv_heads"),
        (lambda tmp: ["configs/tiny.yaml", "--gpu-memory", "lots"], "--gpu-memory"),
        (lambda tmp: ["configs/tiny.yaml", "--gpu-memory", "0GiB"], "--gpu-memory"),
        (lambda tmp: ["configs/tiny.yaml", "--gpus", "0"], "--gpus"),
        (lambda tmp: ["configs/tiny.yaml", "--gpus", "-2"], "--gpus"),
        (lambda tmp: ["configs/tiny.yaml", "--deepspeed", tmp / "missing.json"], "--deepspeed"),
        (lambda tmp: ["configs/tiny.yaml", "--deepspeed", write(tmp / "bad.json", "{stage: 2")], "--deepspeed"),
        (lambda tmp: ["configs/tiny.yaml", "--deepspeed", write(tmp / "list.json", "[1, 2]")], "--deepspeed"),
        (lambda tmp: ["configs/tiny.yaml", "--deepspeed",
                      write(tmp / "s5.json", '{"zero_optimization": {"stage": 5}}')], "--deepspeed"),
        (lambda tmp: ["configs/tiny.yaml", "--grad-ckpt", "yes"], "--grad-ckpt"),
        (lambda tmp: ["configs/tiny.yaml", "--micro-batch", "0"], "--micro-batch"),
        (lambda tmp: ["configs/tiny.yaml", "--seq-len", "4096"], "--seq-len"),
        (lambda tmp: ["configs/tiny.yaml", "--throughput", "-1"], "--throughput"),
        (lambda tmp: ["configs/tiny.yaml", "--fit", "--micro-batch", "2"], "--micro-batch"),
        (lambda tmp: ["configs/llama2-70b.yaml", "--fit", "--gpus", "3"], "--gpus"),
        (lambda tmp: ["configs/llama2-70b.yaml", "--deepspeed",
                      write(tmp / "m3.json", '{"train_micro_batch_size_per_gpu": 3}')], "train.micro_batch_size"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, make_args, flag):
    assert run(*make_args(tmp_path)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("grow: error: ") and flag in err and len(err.splitlines()) == 1
    assert captured.out == ""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

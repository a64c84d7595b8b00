"""The 4-bit suffix (bitsandbytes) and LoRA adapters (peft): real layers, no mocks."""

import sys

import pytest
import torch

from conftest import grow_in_process, tiny_config
from grow.config import ModelConfig, QuantConfig, StabilityConfig
from grow.errors import UserError
from grow.memory import fourbit_account, fourbit_linears
from grow.model import GrowModel, add_stability, fold, hf_config
from grow.quant import quantize_block


def _model(hidden, blocks=2, vocab=64):
    cfg = ModelConfig(num_blocks=blocks, hidden_size=hidden, num_heads=4, intermediate_size=hidden * 3)
    return GrowModel(hf_config(cfg, vocab, {"mask": 2, "pad": 0, "eos": 1}))


def _folded_block(model, k=1):
    block = model.new_block(k)
    add_stability(block, StabilityConfig())
    model.prepend_block(block)
    fold(block)
    return block


def test_double_quantized_nf4_costs_qlora_bits_on_wide_layers():
    torch.manual_seed(0)
    model = _model(512)
    block = _folded_block(model)
    quantize_block(block, QuantConfig(), torch.device("cpu"))
    account = fourbit_account(fourbit_linears(block))
    # 4 bits + an 8-bit absmax per 64 weights + fp32 per 256 absmax = 4.127 bits = 0.5159 B;
    # bitsandbytes also keeps ~1.1 KB of code tables per layer, negligible at this width.
    assert account["params"] == sum(p.numel() for n, p in _model(512).new_block(1).named_parameters() if "proj" in n)
    assert 0.5159 <= account["bytes_per_param"] <= 0.53


def test_without_double_quant_costs_more():
    torch.manual_seed(0)
    a, b = _folded_block(_model(256)), _folded_block(_model(256))
    quantize_block(a, QuantConfig(double_quant=True), torch.device("cpu"))
    quantize_block(b, QuantConfig(double_quant=False), torch.device("cpu"))
    assert fourbit_account(fourbit_linears(a))["bytes"] < fourbit_account(fourbit_linears(b))["bytes"]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantized_block_approximates_the_full_precision_block(quant_type):
    torch.manual_seed(0)
    model = _model(128, blocks=1)
    model.init_ends()
    block = _folded_block(model)
    ids = torch.randint(0, 64, (2, 16))
    model.eval()
    reference = model.forward_from(model.embed(ids))
    quantize_block(block, QuantConfig(quant_type=quant_type), torch.device("cpu"))
    approx = model.forward_from(model.embed(ids))
    rel = ((approx - reference).norm() / (reference - model.embed(ids)).norm()).item()
    assert 0 < rel < 0.25  # 4-bit noise on the branch outputs, not on the residual stream
    assert all(not p.requires_grad for p in block.parameters())


def test_quantizing_the_same_weights_twice_is_bitwise_identical():
    torch.manual_seed(0)
    model = _model(64)
    block = _folded_block(model)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    a, b = model.load_block(1, {f"model.layers.0.{k}": v for k, v in state.items()}), model.load_block(
        1, {f"model.layers.0.{k}": v for k, v in state.items()})
    quantize_block(a, QuantConfig(), torch.device("cpu"))
    quantize_block(b, QuantConfig(), torch.device("cpu"))
    for la, lb in zip(fourbit_linears(a), fourbit_linears(b)):
        assert torch.equal(la.weight.data, lb.weight.data)
        assert torch.equal(la.weight.quant_state.absmax, lb.weight.quant_state.absmax)


def test_missing_bitsandbytes_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"^quant\.enabled: the 4-bit suffix needs bitsandbytes"):
        quantize_block(_folded_block(_model(32)), QuantConfig(), torch.device("cpu"))


def test_missing_peft_is_one_clear_line(monkeypatch):
    from grow.config import LoraConfig
    from grow.quant import add_adapter

    monkeypatch.setitem(sys.modules, "peft", None)
    model = _model(32)
    _folded_block(model)
    with pytest.raises(UserError, match=r"^lora\.enabled"):
        add_adapter(model, 1, LoraConfig())


def test_suffix_checkpointing_keeps_activation_memory_flat_in_depth():
    """Saved-for-backward bytes of a forward through the frozen suffix, with and without recompute."""
    torch.manual_seed(0)

    def saved_bytes(depth, checkpoint):
        model = _model(64, blocks=depth + 1)
        model.init_ends()
        for k in range(depth + 1, 1, -1):
            _folded_block(model, k).requires_grad_(False)
        trained = model.new_block(1)
        model.prepend_block(trained)
        model.checkpoint_blocks = frozenset(range(2, model.num_blocks + 1)) if checkpoint else frozenset()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 64, (2, 32))).sum()
        return total

    plain = [saved_bytes(d, False) for d in (2, 4)]
    ckpt = [saved_bytes(d, True) for d in (2, 4)]
    hidden = 2 * 32 * 64 * 4  # one block-boundary hidden state in fp32
    assert ckpt[1] - ckpt[0] <= 2 * 2 * hidden  # two more blocks: at most their boundary inputs (+ rope)
    assert plain[1] - plain[0] > 4 * (ckpt[1] - ckpt[0])  # without recompute every block's internals stay


def test_stage_adapters_are_saved_in_peft_format_and_load_with_peft(tmp_path, corpus_file):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import EuroBertForMaskedLM

    from grow.assemble import build_model
    from grow.store import list_stages

    cfg = tiny_config(corpus_file, blocks=2)
    run = tmp_path / "run"
    corpus = grow_in_process(run, cfg)
    stage = list_stages(run, verify=True)[2]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(stage.manifest["files"])
    stored = load_file(stage.path / "adapter_model.safetensors")
    assert stored and all(k.startswith("base_model.model.model.layers.1.") for k in stored)
    hf = EuroBertForMaskedLM(build_model(cfg, corpus.tokenizer).config)
    peft_model = PeftModel.from_pretrained(hf, stage.path)
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(stored)
    for name, tensor in stored.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key], tensor), name


def test_4bit_suffix_with_adapters_keeps_heldout_ce_within_3_percent_of_full_precision(tmp_path, corpus_file):
    """The same stage 2 (block 1) after the same stage 1 (block 2), with block 2 frozen in NF4 or
    in fp32 (adapters on both).

    Tolerance: NF4 moves each frozen weight by ~9 % of its size (RMS), but block 2 enters the
    residual stream through pre-norm branches scaled by gamma, and the adapters absorb part of
    the error; on the demo config the measured gaps are +0.004 % and -0.03 % (README). 3 % leaves room for the
    noise of a 40-step run.
    """
    import shutil

    from grow.data import load_corpus
    from grow.stages import grow_run
    from grow.store import list_stages

    extra = ["train.steps=40", "model.hidden_size=64", "model.intermediate_size=128"]
    base = tmp_path / "base"
    base.mkdir()
    cfg = tiny_config(corpus_file, blocks=2, extra=extra)
    corpus = load_corpus(cfg.data, base / "tokenizer", 0, log=lambda s: None)
    grow_run(cfg, base, corpus, log=lambda s: None, stop_after="1")
    ce = {}
    for quant in (True, False):
        run = tmp_path / f"quant-{quant}"
        shutil.copytree(base, run)
        cfg = tiny_config(corpus_file, blocks=2, extra=[*extra, f"quant.enabled={str(quant).lower()}"])
        grow_run(cfg, run, corpus, log=lambda s: None)
        stage = list_stages(run, verify=True)[2]
        assert (stage.manifest["memory"]["frozen_4bit"]["params"] > 0) == quant
        ce[quant] = stage.manifest["heldout_ce"]
    assert ce[True] != ce[False]  # the 4-bit suffix really is a different network
    assert abs(ce[True] - ce[False]) / ce[False] < 0.03, ce


# --------------------------------------------------------------------------- one CPU path on every machine
#
# bitsandbytes decides per layer whether a CPU forward in eval mode without grad repacks the
# weight in place into its AVX512-BF16 layout: ``Linear4bit.__init__`` sets
# ``support_avx512bf16_for_cpu = has_avx512bf16()``. Forcing that function to return True makes
# every layer bitsandbytes creates take the packed path, as it would on such a CPU; forcing
# False is a CPU without the feature. Either way grow must end on its one path.


def _cpu_feature(monkeypatch, present: bool) -> None:
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: present)
    assert bitsandbytes.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu is present  # the switch is live


def _layer_state(block) -> list[torch.Tensor]:
    state = []
    for layer in fourbit_linears(block):
        qs = layer.weight.quant_state
        assert not getattr(qs, "packing_format_for_cpu", False)
        state += [layer.weight.data.clone(), qs.absmax.clone()]
    return state


# Widths and GQA shapes the config accepts, including ones whose linears are no multiple of 32 or
# of the blocksize (the packed layout needs both): hidden, heads, kv heads, intermediate, blocksize.
SHAPES = [(32, 4, 2, 64, 64), (48, 4, 1, 128, 64), (96, 4, 2, 256, 64), (136, 4, 1, 368, 64),
          (136, 2, 1, 100, 128), (30, 3, 1, 70, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_every_accepted_width_runs_4bit_in_train_and_eval_mode_with_the_packed_path_forced(monkeypatch, shape):
    from grow.config import LoraConfig
    from grow.quant import add_adapter

    _cpu_feature(monkeypatch, True)
    hidden, heads, kv, inter, blocksize = shape
    torch.manual_seed(0)
    cfg = ModelConfig(num_blocks=2, hidden_size=hidden, num_heads=heads, num_kv_heads=kv, intermediate_size=inter)
    model = GrowModel(hf_config(cfg, 64, {"mask": 2, "pad": 0, "eos": 1}))
    model.init_ends()
    block = _folded_block(model, 2)
    quantize_block(block, QuantConfig(blocksize=blocksize), torch.device("cpu"))
    add_adapter(model, 2, LoraConfig(rank=2))
    assert [layer.support_avx512bf16_for_cpu for layer in fourbit_linears(block)] == [False] * 7
    before = _layer_state(block)
    h = model.embed(torch.randint(0, 64, (2, 8))).detach()

    model.eval()
    with torch.no_grad():
        inference = model.forward_from(h)  # where bitsandbytes would repack
    after = _layer_state(block)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # no in-place change of layout
    model.train()
    x = h.clone().requires_grad_(True)
    training = model.forward_from(x)
    training.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The same dequantize-then-matmul with or without grad, so the same numbers.
    torch.testing.assert_close(inference, training.detach(), rtol=1e-6, atol=1e-6)


def test_the_same_stage_files_and_heldout_ce_whether_the_cpu_would_pack_or_not(tmp_path, monkeypatch):
    """Grow a width-32 model with its 4-bit suffix as on a CPU with AVX512-BF16 and on one without.

    Held-out CE at the end of stage 1 runs the 4-bit block 2 in eval mode without grad, the
    forward that bitsandbytes would repack (and, at width 32, fail: shape '[32, 0]'). Afterwards
    the grown run is evaluated again in eval mode.
    """
    import yaml
    from conftest import write_corpus

    from grow.evaluate import heldout_ce
    from grow.stages import load_run
    from grow.store import list_stages

    corpus_file = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_config(corpus_file, blocks=2, steps=3)
    assert cfg.model.hidden_size == 32 and cfg.quant.enabled and cfg.lora.enabled
    result = {}
    for packed in (True, False):
        _cpu_feature(monkeypatch, packed)
        run = tmp_path / f"packed-{packed}"
        corpus = grow_in_process(run, cfg)
        (run / "grow.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # as grow train writes it
        stages = list_stages(run, verify=True)
        files = {(k, name): (s.path / name).read_bytes()
                 for k, s in stages.items() for name in s.manifest["files"]}
        manifests = {k: {key: s.manifest[key] for key in ("losses", "heldout_ce", "files")}
                     for k, s in stages.items()}
        _, model, _, _ = load_run(run)
        assert not model.training
        ce = heldout_ce(lambda x, t: model(x), corpus.heldout, cfg.ratios()[0], mask_token_id=corpus.tokenizer.mask_token_id,
                        seed=cfg.train.seed, batch_size=4, batches=2)
        state = _layer_state(model.block(2))
        result[packed] = files, manifests, ce, state
    (files_on, manifests_on, ce_on, state_on), (files_off, manifests_off, ce_off, state_off) = result[True], result[False]
    assert sorted(files_on) == sorted(files_off) and {k for k, _ in files_on} == {1, 2}
    assert ("adapter_model.safetensors" in {n for _, n in files_on})
    for key in files_on:
        assert files_on[key] == files_off[key], key  # bitwise
    assert manifests_on == manifests_off
    assert ce_on == ce_off
    assert all(torch.equal(a, b) for a, b in zip(state_on, state_off))


def test_the_kernel_hub_message_of_bitsandbytes_is_dropped_and_nothing_else(caplog):
    """bitsandbytes logs it at import on AVX512-BF16 CPUs only; this CPU may not, so emit it here."""
    import logging

    import grow  # noqa: F401  (installs the filter)
    from grow.quiet import BNB_CPU_LOGGER

    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
        logger.warning("Failed to load something else: %s", "why")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load something else: why"]


def test_the_filter_is_in_place_before_bitsandbytes_is_first_imported():
    import subprocess

    code = ("import sys, logging, grow; assert 'bitsandbytes' not in sys.modules; "
            "from grow.quiet import BNB_CPU_LOGGER; print(len(logging.getLogger(BNB_CPU_LOGGER).filters))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"

"""Model, stages and the stage store: the right-to-left growth mechanics."""


import pytest
import torch

from conftest import grow_in_process, tiny_config
from grow.config import StabilityConfig
from grow.model import GrowModel, add_stability, fold, hf_config, is_folded
from grow.stages import build_model, restore_suffix, stage_specs, train_stage
from grow.store import INDEX, MANIFEST, list_stages, read_stage, stage_dir, stage_problem, sha256_file


def small_model(blocks=3):
    from grow.config import ModelConfig

    cfg = ModelConfig(num_blocks=blocks, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return GrowModel(hf_config(cfg, 50, {"mask": 2, "pad": 0, "eos": 1}))


def test_prepend_freeze_and_tap_api():
    torch.manual_seed(0)
    model = small_model(3)
    model.init_ends()
    assert model.first_block == 4
    for k in (3, 2):
        block = model.new_block(k)
        model.prepend_block(block)
        assert model.first_block == k and model.block(k) is block
    model.freeze_suffix(3)
    assert not any(p.requires_grad for p in model.block(3).parameters())
    assert all(p.requires_grad for p in model.block(2).parameters())
    ids = torch.randint(0, 50, (2, 8))
    h = model.forward_from(model.embed(ids), start=2, end=2)
    assert torch.allclose(model.head(model.forward_from(h, start=3)), model(ids, start=2), atol=1e-6)
    assert model(ids, start=3).shape == (2, 8, 50)  # tap the head after the suffix alone
    with pytest.raises(IndexError):
        model.block(1)


def test_fold_preserves_the_function_and_makes_a_stock_layer():
    torch.manual_seed(0)
    model = small_model(1)
    model.init_ends()
    block = model.new_block(1)
    add_stability(block, StabilityConfig(gamma=0.4, power_iterations=2))
    model.prepend_block(block)
    ids = torch.randint(0, 50, (2, 8))
    model.train()
    model(ids)  # one power iteration in training mode
    model.eval()
    before = model(ids)
    assert not is_folded(block)
    fold(block)
    assert is_folded(block)
    assert torch.allclose(before, model(ids), atol=1e-6)
    # Spectral norm then gain: the largest singular value of a branch output is gamma.
    sigma = torch.linalg.matrix_norm(block.self_attn.o_proj.weight, ord=2)
    assert abs(sigma.item() - 0.4) < 0.05
    assert set(block.state_dict()) == set(model.load_block(1, model.block_state_dict(1)).state_dict())


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("quant", [True, False])
def test_stage_trains_only_block_k_and_adapters_and_leaves_the_suffix_bitwise_unchanged(tmp_path, corpus_file, quant):
    from grow.quant import adapter_blocks, is_quantized
    from grow.stages import Backend

    cfg = tiny_config(corpus_file, blocks=3, extra=[f"quant.enabled={str(quant).lower()}"])
    run = tmp_path / "run"
    corpus = grow_in_process(run, cfg, stop_after=2)  # blocks 3 and 2 stored
    model = build_model(cfg, corpus.tokenizer)
    restore_suffix(model, list_stages(run), cfg, torch.device("cpu"))
    _, _, s1 = stage_specs(cfg)
    assert s1.block == 1 and not s1.trains_ends
    assert is_quantized(model.block(3)) == quant and not is_quantized(model.block(2))
    frozen3 = {k: v for k, v in _snapshot(model.block(3)).items() if "lora_" not in k}
    ends = {k: v.clone() for k, v in model.ends_state_dict().items()}
    adapter3 = {k: v for k, v in _snapshot(model.block(3)).items() if "lora_" in k}
    result = train_stage(model, s1, corpus, cfg, Backend(cfg), log=lambda s: None)
    assert is_quantized(model.block(2)) == quant  # block 2 joined the 4-bit suffix for stage 1
    after = _snapshot(model.block(3))
    for name, tensor in frozen3.items():
        assert torch.equal(tensor, after[name]), name  # 4-bit data and quant state untouched
    for name, tensor in ends.items():
        assert torch.equal(tensor, model.ends_state_dict()[name]), name
    assert any(not torch.equal(v, after[k]) for k, v in adapter3.items())  # the adapter did learn
    assert adapter_blocks(model) == [2, 3]
    block_params = sum(p.numel() for p in model.block(1).parameters())
    adapter_params = sum(p.numel() for k in (2, 3) for n, p in model.block(k).named_parameters() if "lora_" in n)
    memory = result.memory
    assert memory["trainable_params"] == block_params + adapter_params
    assert memory["adapters"]["trainable_params"] == adapter_params
    assert memory["block"]["params"] == block_params
    assert memory["optimizer_state"]["bytes"] == 2 * 4 * (block_params + adapter_params)  # AdamW m, v in fp32
    # Only block 1 and the adapters were trained, so only they are in the snapshot (+ block 1 buffers).
    assert all(k.startswith("blocks.0.") or "lora_" in k for k in result.snapshot)
    if quant:
        # Far below fp32 even at width 32, where the per-layer code tables still weigh in.
        assert memory["suffix_4bit"]["params"] > 0 and memory["suffix_4bit"]["bytes_per_param"] < 1.5
    assert result.heldout_ce > 0 and model.first_block == 1


def test_run_directory_layout_and_manifest(tmp_path, corpus_file):
    cfg = tiny_config(corpus_file)
    run = tmp_path / "run"
    corpus = grow_in_process(run, cfg)
    stages = list_stages(run, verify=True)
    assert sorted(stages) == [1, 2]
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    adapter_files = {"adapter_config.json", "adapter_model.safetensors"}
    for k, stage in stages.items():
        files = {p.name for p in stage.path.iterdir()}
        expected = {"model.safetensors", INDEX, MANIFEST} | tokenizer_files | (adapter_files if k < 2 else set())
        assert files == expected, files
        m = stage.manifest
        assert m["block"] == k and m["ratio"] == cfg.ratios()[k - 1] and m["steps"] == cfg.steps_for(k)
        assert m["tokens_seen"] == cfg.steps_for(k) * cfg.train.batch_size * cfg.data.seq_len
        assert m["heldout_ce"] > 0 and m["config"]["model"]["num_blocks"] == 2 and "torch" in m["versions"]
        assert set(m["files"]) == files - {MANIFEST}
        for name, entry in m["files"].items():
            assert sha256_file(stage.path / name) == entry["sha256"]
    weights2, weights1 = stages[2].weights(), stages[1].weights()
    assert "model.embed_tokens.weight" in weights2 and "lm_head.weight" in weights2
    assert all(k.startswith("model.layers.0.") for k in weights1)
    # A rebuilt model computes exactly what the stored stages say.
    model = build_model(cfg, corpus.tokenizer)
    restore_suffix(model, stages, cfg, torch.device("cpu"))
    assert model.first_block == 1 and torch.equal(model.block(1).mlp.up_proj.weight,
                                                   weights1["model.layers.0.mlp.up_proj.weight"])


def test_a_stage_without_manifest_or_with_a_bad_hash_does_not_exist(tmp_path, corpus_file):
    run = tmp_path / "run"
    grow_in_process(run, tiny_config(corpus_file, blocks=1))
    path = stage_dir(run, 1)
    assert read_stage(path) is not None
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the tensor data
    shard.write_bytes(bytes(data))
    assert "sha256" in stage_problem(path) and list_stages(run, verify=True) == {}
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert "bytes" in stage_problem(path, verify=False)
    (path / MANIFEST).unlink()
    assert stage_problem(path) == "no manifest (incomplete write)"


def test_consistency_loss_changes_only_stages_with_a_suffix(tmp_path, corpus_file):
    """lambda > 0 adds MSE(block k output, embedding of the sample at r_{k+1}): stage L has no
    r_{L+1}, so its losses are unchanged; stage k < L trains differently."""
    losses = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"w{weight}"
        grow_in_process(run, tiny_config(corpus_file, blocks=2, extra=[f"stability.consistency_weight={weight}"]))
        losses[weight] = {k: s.manifest["losses"] for k, s in list_stages(run).items()}
    assert losses[0.0][2] == losses[1.0][2]
    assert all(b > a for a, b in zip(losses[0.0][1][:1], losses[1.0][1][:1]))  # the extra term adds to the loss
    assert losses[0.0][1] != losses[1.0][1]


def test_bf16_autocast_stage_on_cpu(tmp_path, corpus_file):
    run = tmp_path / "run"
    grow_in_process(run, tiny_config(corpus_file, blocks=2, extra=["train.precision=bf16", "quant.compute_dtype=bf16"]))
    stages = list_stages(run, verify=True)
    assert sorted(stages) == [1, 2]
    # Master weights and the store stay fp32; only the compute ran in bf16.
    assert all(t.dtype == torch.float32 for t in stages[1].weights().values())
    assert all(torch.isfinite(torch.tensor(stages[k].manifest["losses"])).all() for k in stages)

"""Model, stages and the stage store: the right-to-left growth mechanics."""


import pytest
import torch

from conftest import grow_in_process, tiny_config
from grow.config import StabilityConfig
from grow.model import GrowModel, add_stability, fold, hf_config, is_folded
from grow.assemble import RunState, assemble
from grow.curriculum import stage_specs
from grow.stages import committed, train_stage
from grow.store import INDEX, MANIFEST, list_stages, read_stage, stage_problem, sha256_file


def small_model(blocks=3):
    from grow.config import ModelConfig

    cfg = ModelConfig(num_blocks=blocks, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return GrowModel(hf_config(cfg, 50, {"mask": 2, "pad": 0, "eos": 1}))


def test_prepend_append_and_tap_api():
    torch.manual_seed(0)
    model = small_model(3)
    model.init_ends()
    assert (model.first_block, model.last_block) == (4, 0)
    for k in (3, 2):
        block = model.new_block(k)
        model.prepend_block(block)
        assert model.first_block == k and model.block(k) is block
    ids = torch.randint(0, 50, (2, 8))
    h = model.forward_from(model.embed(ids), start=2, end=2)
    assert torch.allclose(model.head(model.forward_from(h, start=3)), model(ids, start=2), atol=1e-6)
    assert model(ids, start=3).shape == (2, 8, 50)  # tap the head after the suffix alone
    assert model(ids, end=2).shape == (2, 8, 50)  # ... or after a prefix
    with pytest.raises(IndexError):
        model.block(1)
    fresh = small_model(4)
    fresh.set_block(1, fresh.new_block(1))
    fresh.set_block(2, fresh.new_block(2))  # appending: left to right
    assert (fresh.first_block, fresh.last_block) == (1, 2)
    with pytest.raises(ValueError, match="gap"):
        fresh.set_block(4, fresh.new_block(4))  # a hole at block 3 is refused


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
    corpus = grow_in_process(run, cfg, stop_after="2")  # blocks 3 and 2 stored
    specs = stage_specs(cfg)
    state = RunState(committed(run, specs)[0])
    before = assemble(cfg, corpus.tokenizer, specs[1], state, "cpu", training=False)  # as stage 2 left it
    assert is_quantized(before.block(3)) == quant and not is_quantized(before.block(2))
    frozen3 = {k: v for k, v in _snapshot(before.block(3)).items() if "lora_" not in k}
    ends = {k: v.clone() for k, v in before.ends_state_dict().items()}
    adapter3 = {k: v for k, v in _snapshot(before.block(3)).items() if "lora_" in k}
    s1 = specs[2]
    assert (s1.first, s1.last, s1.train, s1.adapters, s1.trains_ends) == (1, 3, (1,), (2, 3), False)
    model, result = train_stage(s1, corpus, cfg, Backend(cfg), state, log=lambda s: None)
    assert is_quantized(model.block(2)) == quant  # block 2 joined the 4-bit suffix for stage 3
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
    assert memory["trained"]["params"] == block_params
    assert memory["optimizer_state"]["bytes"] == 2 * 4 * (block_params + adapter_params)  # AdamW m, v in fp32
    # Only block 1 and the adapters were trained, so only they are in the snapshot (+ block 1 buffers).
    assert all(k.startswith("blocks.0.") or "lora_" in k for k in result.snapshot)
    if quant:
        # Far below fp32 even at width 32, where the per-layer code tables still weigh in.
        assert memory["frozen_4bit"]["params"] > 0 and memory["frozen_4bit"]["bytes_per_param"] < 1.5
    assert result.heldout_ce > 0 and model.first_block == 1


def test_run_directory_layout_and_manifest(tmp_path, corpus_file):
    cfg = tiny_config(corpus_file)
    run = tmp_path / "run"
    corpus = grow_in_process(run, cfg)
    stages = list_stages(run, verify=True)
    assert sorted(stages) == [1, 2]
    # (grow.yaml and train.log are the CLI's; this run was grown in-process)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "stage-01-block02", "stage-02-block01",
                                                      "tokenizer"]
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    adapter_files = {"adapter_config.json", "adapter_model.safetensors"}
    for i, stage in stages.items():
        k = 3 - i  # stage 1 trains block 2, stage 2 block 1
        files = {p.name for p in stage.path.iterdir()}
        expected = {"model.safetensors", INDEX, MANIFEST} | tokenizer_files | (adapter_files if k < 2 else set())
        assert files == expected, files
        m = stage.manifest
        assert m["stage"]["train"] == [k] and m["stage"]["noise"]["lo"] == cfg.ratios()[k - 1]
        assert m["steps"] == cfg.steps_for(k)
        assert m["tokens_seen"] == cfg.steps_for(k) * cfg.train.batch_size * cfg.data.seq_len
        assert m["heldout_ce"] > 0 and m["config"]["model"]["num_blocks"] == 2 and "torch" in m["versions"]
        assert set(m["levels"]["whole"]) == {"1", "2"} and set(m["levels"]["path"]) == {str(j) for j in range(k, 3)}
        assert set(m["files"]) == files - {MANIFEST}
        for name, entry in m["files"].items():
            assert sha256_file(stage.path / name) == entry["sha256"]
    weights2, weights1 = stages[1].weights(), stages[2].weights()
    assert "model.embed_tokens.weight" in weights2 and "lm_head.weight" in weights2
    assert all(k.startswith("model.layers.0.") for k in weights1)
    # A rebuilt model computes exactly what the stored stages say.
    model = assemble(cfg, corpus.tokenizer, stage_specs(cfg)[1], RunState(list(stages.values())), "cpu",
                     training=False)
    assert model.first_block == 1 and torch.equal(model.block(1).mlp.up_proj.weight,
                                                   weights1["model.layers.0.mlp.up_proj.weight"])


def test_a_stage_without_manifest_or_with_a_bad_hash_does_not_exist(tmp_path, corpus_file):
    run = tmp_path / "run"
    grow_in_process(run, tiny_config(corpus_file, blocks=1))
    path = run / "stage-01-block01"
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
        losses[weight] = {i: s.manifest["losses"] for i, s in list_stages(run).items()}
    assert losses[0.0][1] == losses[1.0][1]  # stage 1 trains block L
    assert all(b > a for a, b in zip(losses[0.0][2][:1], losses[1.0][2][:1]))  # the extra term adds to the loss
    assert losses[0.0][2] != losses[1.0][2]


def test_bf16_autocast_stage_on_cpu(tmp_path, corpus_file):
    run = tmp_path / "run"
    grow_in_process(run, tiny_config(corpus_file, blocks=2, extra=["train.precision=bf16", "quant.compute_dtype=bf16"]))
    stages = list_stages(run, verify=True)
    assert sorted(stages) == [1, 2]
    # Master weights and the store stay fp32; only the compute ran in bf16.
    assert all(t.dtype == torch.float32 for t in stages[1].weights().values())
    assert all(torch.isfinite(torch.tensor(stages[k].manifest["losses"])).all() for k in stages)

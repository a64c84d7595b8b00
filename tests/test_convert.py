"""Converting a pretrained Llama-family causal LM (model.init_from): tiny random checkpoints of
LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM saved with save_pretrained, converted,
and compared with the source run with every position visible."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

from grow.config import load_config
from grow.convert import convert, source_tokenizer
from grow.curriculum import stage_specs
from grow.errors import UserError

TEXT = ["In the beginning God created the heavens and the earth.", "The earth was formless and empty.",
        "God said, Let there be light, and there was light.", "God saw the light, and saw that it was good."] * 4
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)


def make_tokenizer(mask: bool = False) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["[UNK]", "[PAD]", "[EOS]"] + (["[MASK]"] if mask else [])
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                   **({"mask_token": "[MASK]"} if mask else {}))


def make_checkpoint(path, kind: str = "llama", *, extra_rows: int = 0, mask: bool = False, seed: int = 0, **overrides):
    """A tiny random causal LM of ``kind`` and its tokenizer, saved in ``path``."""
    tokenizer = make_tokenizer(mask)
    cls, config_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
                       "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[kind]
    torch.manual_seed(seed)
    model = cls(config_cls(**{**SHAPE, "vocab_size": len(tokenizer) + extra_rows, **overrides}))
    if kind == "qwen2":  # non-zero q/k/v biases, so the test sees them mapped
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def config_for(path, *sets):
    # Full precision: the exact conversion (the 4-bit copy the adapt stages freeze is tested there).
    return load_config(None, [f"model.init_from={path}", "curriculum.kind=adapt", "curriculum.time=input",
                              "data.seq_len=32", "quant.enabled=false", *sets])


@torch.no_grad()
def source_logits(model, ids: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """The source model's logits; non-causal = an all-visible 4D mask (every position sees every other)."""
    if causal:
        return model(ids).logits
    B, T = ids.shape
    visible = torch.zeros(B, 1, T, T, dtype=model.dtype)  # additive: 0 everywhere = nothing masked
    return model(ids, attention_mask=visible).logits


def converted(path, *sets):
    from grow.convert import converted_model

    cfg = config_for(path, *sets)
    tokenizer, added = source_tokenizer(str(path))
    spec = stage_specs(cfg)[0]
    weights = convert(str(path), tokenizer, added, cfg.model.vocab_size, blocks=True)
    return cfg, tokenizer, added, converted_model(cfg, tokenizer, spec, weights)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_converted_logits_equal_the_source_under_a_non_causal_mask(tmp_path, kind):
    source, _ = make_checkpoint(tmp_path, kind)
    cfg, tokenizer, added, model = converted(tmp_path)
    assert cfg.model.num_blocks == 3 and cfg.model.hidden_size == 32 and cfg.model.num_kv_heads == 2
    assert cfg.model.attention_bias == (kind == "qwen2")
    ids = torch.randint(0, len(tokenizer) - 1, (2, 24), generator=torch.Generator().manual_seed(0))
    V = source.config.vocab_size
    with torch.no_grad():
        ours = model(ids)[..., :V]
    bidirectional = source_logits(source, ids, causal=False)
    torch.testing.assert_close(ours, bidirectional, rtol=1e-4, atol=1e-4)
    # ...and the source's own causal function is another one: the mask is what changed.
    assert (ours - source_logits(source, ids, causal=True)).abs().max() > 1e-3


def test_llama3_rope_scaling_maps_exactly(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    source, _ = make_checkpoint(tmp_path, "llama", rope_parameters=rope)
    cfg, tokenizer, _, model = converted(tmp_path)
    assert cfg.model.rope_scaling["rope_type"] == "llama3" and cfg.model.rope_theta == 50000.0
    ids = torch.randint(0, len(tokenizer) - 1, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :source.config.vocab_size], source_logits(source, ids, causal=False),
                                   rtol=1e-4, atol=1e-4)


def test_tied_embeddings_give_an_untied_head_with_the_same_weights(tmp_path):
    source, _ = make_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    _, tokenizer, _, model = converted(tmp_path)
    V = source.config.vocab_size
    torch.testing.assert_close(model.lm_head.weight[:V], source.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()


def test_a_tokenizer_without_mask_token_gets_one_with_mean_rows(tmp_path):
    source, original = make_checkpoint(tmp_path, "llama")
    assert original.mask_token_id is None
    cfg, tokenizer, added, model = converted(tmp_path)
    V = len(original)
    assert added and tokenizer.mask_token_id == V and cfg.model.vocab_size == V + 1
    assert model.embed_tokens.weight.shape[0] == V + 1
    torch.testing.assert_close(model.embed_tokens.weight[V], source.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(model.lm_head.weight[V], source.lm_head.weight.mean(0))
    torch.testing.assert_close(model.embed_tokens.weight[:V], source.model.embed_tokens.weight)


def test_padded_vocabulary_gives_the_mask_token_a_spare_row(tmp_path):
    source, original = make_checkpoint(tmp_path, "qwen2", extra_rows=5)
    cfg, tokenizer, added, model = converted(tmp_path)
    mask = tokenizer.mask_token_id
    assert added and mask == len(original) and cfg.model.vocab_size == len(original) + 5
    torch.testing.assert_close(model.embed_tokens.weight[mask], source.model.embed_tokens.weight[:mask].mean(0))


def test_a_checkpoint_mask_token_keeps_its_row(tmp_path):
    source, original = make_checkpoint(tmp_path, "llama", mask=True)
    cfg, tokenizer, added, model = converted(tmp_path)
    assert not added and cfg.model.vocab_size == len(original)
    torch.testing.assert_close(model.embed_tokens.weight, source.model.embed_tokens.weight)


@pytest.mark.parametrize("kind,overrides,message", [
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("llama", {"mlp_bias": True}, "MLP biases"),
    ("llama", {"head_dim": 16}, "head_dim=16"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "rope type 'yarn'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "sliding-window"),
])
def test_what_does_not_map_exactly_is_refused_in_one_line(tmp_path, kind, overrides, message):
    make_checkpoint(tmp_path, kind, **overrides)
    with pytest.raises(UserError, match=message) as err:
        config_for(tmp_path)
    assert "\n" not in str(err.value)


def test_another_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        config_for(tmp_path)


def test_mistral_sliding_window_caps_the_context(tmp_path):
    make_checkpoint(tmp_path, "mistral", sliding_window=64)
    assert config_for(tmp_path).model.max_position_embeddings == 64
    with pytest.raises(UserError, match="data.seq_len: 96 exceeds"):
        config_for(tmp_path, "data.seq_len=96")


def test_architecture_comes_from_the_checkpoint_and_a_contradiction_is_one_line(tmp_path):
    make_checkpoint(tmp_path, "llama")
    cfg = config_for(tmp_path, "model.hidden_size=32")  # agreeing is fine
    assert cfg.model.num_blocks == 3 and len(cfg.ratios()) == 3
    with pytest.raises(UserError, match=r"model.num_blocks: 6 contradicts the checkpoint .* which has 3"):
        config_for(tmp_path, "model.num_blocks=6")
    with pytest.raises(UserError, match="model.init_from: no such checkpoint directory"):
        config_for(tmp_path / "missing")


def test_adapt_needs_a_checkpoint():
    with pytest.raises(UserError, match="curriculum.kind: adapt trains the blocks of a pretrained model"):
        load_config(None, ["curriculum.kind=adapt"])


def shipped_config(path, tmp_path):
    """A shipped config as a test can load it offline: tiny-adapt.yaml takes a tiny checkpoint
    made here; the 7B/70B adapt configs name hub checkpoints out of reach, so their spelled-out
    shape is taken as it is (what grow plan does)."""
    from pathlib import Path

    from grow.convert import CheckpointUnavailable

    if Path(path).name == "tiny-adapt.yaml":
        make_checkpoint(tmp_path, "llama")
        return load_config(path, [f"model.init_from={tmp_path}"])
    try:
        return load_config(path)
    except CheckpointUnavailable:
        return load_config(path, checkpoint=False)

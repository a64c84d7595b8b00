"""Samplers on tiny in-process models, the loader (run and export), and ``grow sample``."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import EuroBertForMaskedLM, PreTrainedTokenizerFast

from conftest import WORDS, tiny_overrides, write_corpus
from grow import sample as S
from grow.cli import main
from grow.config import ModelConfig
from grow.data import train_tokenizer
from grow.errors import UserError
from grow.inference import load_denoiser
from grow.model import GrowModel, hf_config
from grow.assemble import special_ids

MAX_POS = 64
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------- helpers (also used by test_evaluate)


def make_tokenizer():
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(40)]
    return train_tokenizer(datasets.Dataset.from_dict({"text": docs}), 300)


def make_model(tokenizer, blocks: int = 3, width: int = 32, seed: int = 0, init_std: float = 0.2) -> GrowModel:
    """A fully grown GrowModel with random weights (a larger init than training's, so the
    predictions are peaked enough for confidence ordering to matter)."""
    cfg = ModelConfig(num_blocks=blocks, hidden_size=width, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=MAX_POS, init_std=init_std)
    torch.manual_seed(seed)
    model = GrowModel(hf_config(cfg, len(tokenizer), special_ids(tokenizer)))
    model.init_ends()
    for k in range(blocks, 0, -1):
        model.prepend_block(model.new_block(k))
    return model.eval()


def make_export(model: GrowModel, tokenizer, directory, ratios=None):
    """The export layout: a stock EuroBertForMaskedLM directory + tokenizer + grow.json."""
    hf = EuroBertForMaskedLM(model.config)
    state = dict(model.ends_state_dict())
    for k in range(model.first_block, model.last_block + 1):
        state.update(model.block_state_dict(k))
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if ratios is not None:
        paths = {str(k): [k, len(ratios)] for k in range(1, len(ratios) + 1)}  # grown right to left
        (directory / "grow.json").write_text(json.dumps({"format_version": 2, "schedule": list(ratios),
                                                         "paths": paths}))
    return directory


def linear_ratios(L: int) -> list[float]:
    return [round(1.0 - 0.8 * i / max(1, L - 1), 6) for i in range(L)]


def count_block_calls(model):
    calls = {k: 0 for k in range(model.first_block, model.num_blocks + 1)}
    handles = []
    for k in calls:
        def hook(module, args, output, k=k):
            calls[k] += 1
        handles.append(model.block(k).register_forward_hook(hook))
    return calls, handles


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Width-32 models gain nothing from intra-op threads, and on a busy 2-core machine
    spinning OpenMP workers make them 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def mask_id(tokenizer):
    return tokenizer.mask_token_id


def prompt_of(tokenizer, text="in the beginning god", n=2):
    return S.prompt_batch(tokenizer(text, add_special_tokens=False)["input_ids"], n)


def run_mode(model, mode, prompt, mask_id, seed=0, length=20, **kw):
    opts = dict(steps=12, block_length=8, temperature=1.0)
    opts.update(kw)
    g = torch.Generator().manual_seed(seed)
    return S.generate(model, prompt, length, mode, mask_id=mask_id, ratios=linear_ratios(model.num_blocks),
                      generator=g, **opts)


# --------------------------------------------------------------------------- every mode


@pytest.mark.parametrize("mode", S.MODES)
def test_each_mode_completes_and_keeps_the_prompt(model, tokenizer, mask_id, mode):
    prompt = prompt_of(tokenizer)
    result = run_mode(model, mode, prompt, mask_id)
    assert result.tokens.shape == (2, prompt.shape[1] + 20)
    assert torch.equal(result.tokens[:, : prompt.shape[1]], prompt)
    assert not (result.tokens == mask_id).any()
    # the trace replays to the final tokens
    replayed = torch.full_like(result.generated, mask_id)
    for entry in result.trace:
        for row in range(2):
            for pos, tok in zip(entry["positions"][row], entry["tokens"][row]):
                replayed[row, pos - prompt.shape[1]] = tok
            for pos in entry["remasked"][row]:
                replayed[row, pos - prompt.shape[1]] = mask_id
    assert torch.equal(replayed, result.generated)
    # same seed, same samples; another seed, other samples
    assert torch.equal(run_mode(model, mode, prompt, mask_id).tokens, result.tokens)
    assert not torch.equal(run_mode(model, mode, prompt, mask_id, seed=1).tokens, result.tokens)


@pytest.mark.parametrize("mode", S.MODES)
def test_run_and_its_export_sample_the_same(cli_run, tmp_path, mode):
    run = load_denoiser(cli_run)
    export = load_denoiser(make_export(run.model, run.tokenizer, tmp_path / "export", run.ratios))
    assert export.source == "export" and export.ratios == run.ratios
    prompt = prompt_of(run.tokenizer, "in the beginning")
    a = run_mode(run.model, mode, prompt, run.mask_id)
    b = run_mode(export.model, mode, prompt, export.mask_id)
    assert torch.equal(a.tokens, b.tokens)
    assert a.forwards == b.forwards


def test_export_modules_are_the_hf_models_own(model, tokenizer, tmp_path):
    loaded = load_denoiser(make_export(model, tokenizer, tmp_path / "e", linear_ratios(3)))
    m = loaded.model
    assert type(m.block(1)).__name__ == "EuroBertDecoderLayer" and m.first_block == 1
    x = prompt_of(tokenizer, n=1)
    assert torch.allclose(m(x), model(x), atol=1e-6)
    assert not any(p.is_meta for p in m.parameters())


# --------------------------------------------------------------------------- depth and suffix


def test_depth_is_one_pass_of_exactly_L_block_evaluations(model, tokenizer, mask_id):
    calls, handles = count_block_calls(model)
    try:
        length, ratios = 20, linear_ratios(3)
        result = S.depth(model, prompt_of(tokenizer), length, mask_id=mask_id, ratios=ratios)
    finally:
        for h in handles:
            h.remove()
    assert calls == {1: 1, 2: 1, 3: 1}
    assert result.forwards == 1 and result.block_evals == 3
    # after block k, r_{k+1} of the generated span is still masked (none after block L)
    left = [e["masked_left"] for e in result.trace]
    assert left == [2 * math.ceil(ratios[1] * length), 2 * math.ceil(ratios[2] * length), 0]
    assert [e["block"] for e in result.trace] == [1, 2, 3]


def test_depth_writes_tokens_back_into_the_residual_stream(model, tokenizer, mask_id):
    """The stream entering block k+1 equals block k's output + embed(new) - embed(mask)."""
    prompt, length, ratios = prompt_of(tokenizer, n=1), 12, linear_ratios(3)
    seen = []
    handle = model.block(2).register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].clone()),
                                                      with_kwargs=True)
    try:
        result = S.depth(model, prompt, length, mask_id=mask_id, ratios=ratios)
    finally:
        handle.remove()
    x = torch.cat([prompt, torch.full((1, length), mask_id)], 1)
    h1 = model.forward_from(model.embed(x), 1, 1)
    first = result.trace[0]
    pos, tok = torch.tensor(first["positions"][0]), torch.tensor(first["tokens"][0])
    expected = h1.clone()
    expected[0, pos] += model.embed(tok) - model.embed(torch.tensor([mask_id]))
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_suffix_runs_blocks_k_to_L_at_step_k(model, tokenizer, mask_id):
    calls, handles = count_block_calls(model)
    try:
        result = S.suffix(model, prompt_of(tokenizer), 20, mask_id=mask_id, ratios=linear_ratios(3))
    finally:
        for h in handles:
            h.remove()
    assert calls == {1: 1, 2: 2, 3: 3}
    assert result.forwards == 3 and result.block_evals == 6


# --------------------------------------------------------------------------- iterative


def test_logits_cache_gives_identical_samples_with_fewer_forwards(model, tokenizer, mask_id):
    prompt, length, steps = prompt_of(tokenizer), 8, 32  # steps > length: most steps unmask nothing
    runs = {}
    for cache in (True, False):
        g = torch.Generator().manual_seed(3)
        runs[cache] = S.iterative(model, prompt, length, mask_id=mask_id, steps=steps, temperature=1.0,
                                  top_p=0.9, generator=g, cache=cache)
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert runs[False].forwards == steps
    assert runs[True].forwards == length  # one forward per distinct sequence that still had masks
    assert sum(e["cached"] for e in runs[True].trace) == steps - length


def test_iterative_follows_the_linear_schedule(model, tokenizer, mask_id):
    length, steps = 20, 5
    result = S.iterative(model, prompt_of(tokenizer), length, mask_id=mask_id, steps=steps)
    assert [e["masked_left"] for e in result.trace] == [2 * math.ceil((1 - s / steps) * length) for s in range(1, 6)]
    assert result.block_evals == 3 * result.forwards


def test_threshold_unmasks_everything_confident_at_once(model, tokenizer, mask_id):
    result = S.iterative(model, prompt_of(tokenizer), 16, mask_id=mask_id, steps=16, threshold=1e-9)
    assert result.forwards == 1 and not (result.tokens == mask_id).any()


def test_remasking_spares_the_prompt_and_still_finishes(model, tokenizer, mask_id):
    prompt = prompt_of(tokenizer)
    g = torch.Generator().manual_seed(0)
    result = S.iterative(model, prompt, 16, mask_id=mask_id, steps=8, remask=0.5, temperature=1.0, generator=g)
    remasked = [p for e in result.trace for row in e["remasked"] for p in row]
    assert remasked and min(remasked) >= prompt.shape[1]
    assert result.trace[-1]["remasked"] == [[], []]  # decayed to 0 at the last step
    assert torch.equal(result.tokens[:, : prompt.shape[1]], prompt)
    assert not (result.tokens == mask_id).any()


# --------------------------------------------------------------------------- semi-autoregressive


def test_prefix_cache_matches_the_uncached_frozen_prefix_computation(model, tokenizer, mask_id):
    prefix = prompt_of(tokenizer, "in the beginning god created the heavens")
    block = torch.randint(3, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    block[:, ::2] = mask_id
    cached = S.cached_logits(model, S.prefix_cache(model, prefix), block)
    frozen = S.frozen_prefix_logits(model, prefix, block)
    assert torch.allclose(cached, frozen, atol=1e-5)
    # the approximation is real: with full bidirectional attention the prefix sees the block
    exact = model(torch.cat([prefix, block], 1))[:, prefix.shape[1]:]
    assert not torch.allclose(cached, exact, atol=1e-5)


def test_semi_ar_cached_equals_frozen_prefix_and_exact_mode_runs(model, tokenizer, mask_id):
    prompt = prompt_of(tokenizer)
    out = {}
    for mode in ("cached", "frozen", "exact"):
        g = torch.Generator().manual_seed(0)
        out[mode] = S.semi_ar(model, prompt, 24, mask_id=mask_id, block_length=8, steps=4, temperature=1.0,
                              generator=g, prefix_mode=mode)
    assert torch.equal(out["cached"].tokens, out["frozen"].tokens)
    assert out["cached"].extra["prefills"] == 3 and out["cached"].forwards == 3 * 4 + 3
    assert not (out["exact"].tokens == mask_id).any()


def test_semi_ar_goes_past_the_context_with_a_bounded_window(model, tokenizer, mask_id):
    prompt = prompt_of(tokenizer, n=1)
    seen = []
    handle = model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        result = S.semi_ar(model, prompt, 2 * MAX_POS, mask_id=mask_id, block_length=16, steps=2, context=8)
    finally:
        handle.remove()
    assert result.tokens.shape[1] == prompt.shape[1] + 2 * MAX_POS and not (result.tokens == mask_id).any()
    assert result.extra["window"] == 8
    assert max(seen) <= max(prompt.shape[1] + 8, 16)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("call, flag", [
    (lambda m, p, k: S.generate(m, p, 0, "depth", mask_id=k, ratios=linear_ratios(3)), "--length"),
    (lambda m, p, k: S.generate(m, p, MAX_POS, "iterative", mask_id=k), "--prompt"),
    (lambda m, p, k: S.generate(m, p, 8, "diagonal", mask_id=k), "--mode"),
    (lambda m, p, k: S.generate(m, p, 8, "iterative", mask_id=k, steps=0), "--steps"),
    (lambda m, p, k: S.generate(m, p, 8, "iterative", mask_id=k, top_p=0.0), "--top-p"),
    (lambda m, p, k: S.generate(m, p, 8, "iterative", mask_id=k, temperature=-1), "--temperature"),
    (lambda m, p, k: S.generate(m, p, 8, "iterative", mask_id=k, threshold=1.5), "--threshold"),
    (lambda m, p, k: S.generate(m, p, 8, "iterative", mask_id=k, remask=1.0), "--remask"),
    (lambda m, p, k: S.generate(m, p, 8, "semi-ar", mask_id=k, block_length=0), "--block-length"),
    (lambda m, p, k: S.generate(m, p, 8, "depth", mask_id=k, ratios=linear_ratios(3), remask=0.2), "--remask"),
])
def test_bad_inputs_are_one_line_errors_naming_the_flag(model, tokenizer, mask_id, call, flag):
    with pytest.raises(UserError, match=flag):
        call(model, prompt_of(tokenizer), mask_id)


def test_unknown_mode_fails_at_parse_time_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "somewhere", "--mode", "diagonal"])
    assert exc.value.code == 2
    assert "depth" in capsys.readouterr().err


def test_loader_errors(tmp_path, cli_run, model, tokenizer, capsys):
    with pytest.raises(UserError, match="neither a grow run"):
        load_denoiser(tmp_path)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    shutil.copy(cli_run / "grow.yaml", empty / "grow.yaml")
    with pytest.raises(UserError, match="has no complete stage"):
        load_denoiser(empty)
    assert main(["sample", str(empty), "--length", "4"]) == 2
    assert "has no complete stage" in capsys.readouterr().err
    # an export without grow.json gets the default linear schedule, and says so
    export = make_export(model, tokenizer, tmp_path / "plain")
    lines = []
    loaded = load_denoiser(export, log=lines.append)
    assert loaded.ratios == [1.0, 0.575, 0.15] and "linear schedule" in lines[0]
    # a tokenizer without a mask token cannot drive masked diffusion
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="[EOS]").save_pretrained(export)
    with pytest.raises(UserError, match="no mask token"):
        load_denoiser(export)


def test_partially_grown_run_loads_its_suffix_and_says_so(cli_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cli_run, partial)
    shutil.rmtree(partial / "stage-02-block01")
    lines = []
    loaded = load_denoiser(partial, log=lines.append)
    assert loaded.model.first_block == 2 and not loaded.complete
    assert any("blocks 2..2" in line for line in lines)
    result = run_mode(loaded.model, "depth", prompt_of(loaded.tokenizer, "god"), loaded.mask_id, length=8)
    assert result.block_evals == 1 and not (result.tokens == loaded.mask_id).any()


# --------------------------------------------------------------------------- the CLI on a real run


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-run")
    corpus = write_corpus(base / "corpus.txt")
    run = base / "run"
    sets = tiny_overrides(corpus, blocks=2, steps=5) + ["--set", "quant.enabled=false", "--set", "lora.enabled=false"]
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(run)] + sets) == 0
    return run


def test_cli_sample_json_and_text(cli_run, capsys):
    capsys.readouterr()
    args = ["sample", str(cli_run), "--prompt", "in the beginning", "--length", "12", "--seed", "1"]
    assert main(args + ["--mode", "iterative", "--steps", "6", "--num-samples", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["mode"] == "iterative" and len(record["samples"]) == 2
    assert len(record["trace"]) == 6 and record["forwards"] == 6 and record["tokens_per_s"] > 0
    assert all(s["text"].startswith("in the beginning") for s in record["samples"])
    assert main(args + ["--mode", "semi-ar", "--block-length", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("in the beginning")
    # --show animates only on a terminal; captured output gets the final text
    assert main(args + ["--mode", "semi-ar", "--block-length", "4", "--show"]) == 0
    assert capsys.readouterr().out == text

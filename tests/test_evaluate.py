"""Evaluation: the MDLM bound, sample statistics, per-stage CE curves, ``grow eval`` and the bench."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_corpus
from grow.cli import main
from grow.errors import UserError
from grow.evaluate import evaluate_denoiser, heldout_ce, mdlm_elbo, parse_ratios, plot_report, sample_stats
from grow.inference import Loaded, load_denoiser
from test_sample import CONFIGS, linear_ratios, make_export, make_model

ROOT = Path(__file__).resolve().parents[1]


# The same module-scoped fixtures as the sampler tests (one intra-op thread, a tiny model).
from test_sample import _one_thread, model, tokenizer  # noqa: E402,F401  (pytest fixtures)


def heldout_ids(vocab: int, rows: int = 24, T: int = 32) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, T), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- the bound


def test_elbo_of_a_uniform_model_is_log_V(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere: the uniform distribution
    V = model.config.vocab_size
    elbo = mdlm_elbo(lambda x, t: model(x), heldout_ids(V), mask_token_id=tokenizer.mask_token_id, seed=0,
                     batch_size=8, batches=3)
    assert abs(elbo.nats_per_token - math.log(V)) < 1e-5
    assert abs(elbo.bits_per_token - math.log2(V)) < 1e-5
    assert elbo.perplexity_bound == pytest.approx(V, rel=1e-4)
    assert elbo.sequences == 24 and elbo.tokens == 24 * 32
    # the literal 1/t-weighted Bernoulli estimator has the same expectation, more variance
    bern = mdlm_elbo(lambda x, t: model(x), heldout_ids(V, rows=256), mask_token_id=tokenizer.mask_token_id, seed=0,
                     batch_size=64, batches=4, masking="bernoulli")
    assert bern.nats_per_token == pytest.approx(math.log(V), rel=0.15)


def test_elbo_is_zero_for_an_oracle_and_deterministic_per_seed(tokenizer, model):
    ids = heldout_ids(len(tokenizer))
    V = model.config.vocab_size

    def oracle(x, t):  # sees through the masks: perfect predictions
        return torch.nn.functional.one_hot(ids[: x.shape[0]], V).float() * 100

    assert mdlm_elbo(oracle, ids, mask_token_id=2, seed=0, batch_size=24, batches=1).nats_per_token < 1e-6
    kw = dict(mask_token_id=tokenizer.mask_token_id, batch_size=8, batches=3)
    fn = lambda x, t: model(x)  # noqa: E731
    a, b = mdlm_elbo(fn, ids, seed=1, **kw), mdlm_elbo(fn, ids, seed=1, **kw)
    assert a.nats_per_token == b.nats_per_token
    assert mdlm_elbo(fn, ids, seed=2, **kw).nats_per_token != a.nats_per_token


# --------------------------------------------------------------------------- statistics


def test_sample_stats_on_known_sequences():
    eos = 1
    stats = sample_stats([[5, 6, 7, 8, 5, 6, 7, 8], [9, 9, eos, 4, 4]], stop_ids=(eos,))
    # unigrams: 5 6 7 8 5 6 7 8 9 9 -> 5 distinct of 10; bigrams: 7 + 1 -> {56,67,78,85,99} 5 of 8
    assert stats["distinct_1"] == pytest.approx(0.5)
    assert stats["distinct_2"] == pytest.approx(5 / 8)
    # 4-grams of sample 1: 5678 6785 7856 8567 5678 -> 1 repeat of 5; sample 2 has none (length 2)
    assert stats["repetition"] == pytest.approx(0.2)
    assert stats["mean_length"] == pytest.approx(5.0)


def test_parse_ratios():
    assert parse_ratios("1.0,0.15,0.5") == [0.15, 0.5, 1.0]
    for bad in ("", "0.5,abc", "0,0.5", "1.5"):
        with pytest.raises(UserError, match="--ratios"):
            parse_ratios(bad)


# --------------------------------------------------------------------------- a whole report


def test_report_per_level_path_and_whole_stack(tokenizer, model, tmp_path):
    ratios = linear_ratios(3)
    loaded = Loaded(model, tokenizer, ratios, "export", tmp_path, paths={k: (k, 3) for k in (1, 2, 3)})
    ids = heldout_ids(len(tokenizer))
    report = evaluate_denoiser(loaded, ids, grid=[0.2, 1.0], batches=2, batch_size=8, samples=2, steps=8,
                               sample_length=16)
    kw = dict(mask_token_id=tokenizer.mask_token_id, seed=0, batch_size=8, batches=2)
    assert [(e["level"], e["ratio"], e["path_blocks"]) for e in report["levels"]] == [
        (1, ratios[0], [1, 3]), (2, ratios[1], [2, 3]), (3, ratios[2], [3, 3])]
    for e in report["levels"]:
        k, r = e["level"], e["ratio"]
        assert e["path"] == pytest.approx(heldout_ce(lambda x, t: model(x, start=k), ids, r, **kw))
        assert e["whole"] == pytest.approx(heldout_ce(lambda x, t: model(x), ids, r, **kw))
        assert "commit" not in e  # an export has no manifests
    # level 1's path is the whole stack, so it has no curve of its own
    assert sorted(report["grid"]) == ["2", "3", "whole"]
    assert report["levels"][0]["path"] == report["levels"][0]["whole"]
    for mode in ("depth", "suffix", "iterative", "semi-ar"):
        s = report["samples"][mode]
        assert s["tokens_per_s"] > 0 and len(s["texts"]) == 2 and 0 < s["distinct_1"] <= 1
    plot_report(report, tmp_path / "ce.png")
    assert (tmp_path / "ce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- grow eval on a run and its export


@pytest.fixture(scope="module")
def run_and_corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-run")
    corpus = write_corpus(base / "corpus.txt")
    run = base / "run"
    sets = tiny_overrides(corpus, blocks=2, steps=5) + ["--set", "quant.enabled=false", "--set", "lora.enabled=false"]
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(run)] + sets) == 0
    return run, corpus


def test_cli_eval_on_a_run_reproduces_the_manifests(run_and_corpus, tmp_path, capsys):
    run, _ = run_and_corpus
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    # the run's train.eval_batches (2) and batch size: the stage's own measurement
    assert main(["eval", str(run), "--ratios", "0.2,0.6,1.0", "--samples", "2", "--steps", "4",
                 "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    for entry, stage in zip(report["levels"], ("stage-02-block01", "stage-01-block02")):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        # no 4-bit suffix and no adapters: nothing drifts after commit
        assert entry["commit"] == manifest["heldout_ce"] and entry["commit_stage"] == stage
        assert entry["path"] == pytest.approx(manifest["heldout_ce"], rel=1e-5) and abs(entry["drift"]) < 1e-5
    assert [g["ratio"] for g in report["grid"]["whole"]] == [0.2, 0.6, 1.0]
    assert report["elbo"]["bits_per_token"] > 0 and set(report["samples"]) == {"depth", "suffix", "iterative",
                                                                              "semi-ar"}
    assert "MDLM bound" in capsys.readouterr().out


def test_cli_eval_on_an_export(run_and_corpus, tmp_path, capsys):
    run, corpus = run_and_corpus
    loaded = load_denoiser(run)
    export = make_export(loaded.model, loaded.tokenizer, tmp_path / "export", loaded.ratios)
    out = tmp_path / "eval.json"
    assert main(["eval", str(export), "--data", corpus, "--batches", "1", "--samples", "0",
                 "--ratios", "0.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "export" and report["samples"] == {}
    # no seq_len in grow.json: 128 cut to the model's 64 positions
    assert report["heldout"]["seq_len"] == 64


# --------------------------------------------------------------------------- the bench


def test_bench_prints_depth_and_iterative_side_by_side(capsys):
    spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "bench" / "samplers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--length", "16", "--steps", "8", "--repeats", "1", "--batch", "1"])
    out = capsys.readouterr().out
    assert "depth" in out and "iterative" in out and "tok/s" in out

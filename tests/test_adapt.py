"""The adapt curriculum and warm-started growth from a tiny random Llama / Qwen2 checkpoint, from
the command line: convert, adapt block by block, resume, export to a stock EuroBertForMaskedLM."""

from __future__ import annotations

import json

import pytest
import torch

from grow.cli import main
from grow.config import load_config
from grow.curriculum import stage_specs
from grow.store import list_stages
from test_convert import make_checkpoint


def run_cli(*args):
    return main([str(a) for a in args])


def adapt_sets(corpus: str, ckpt, *extra: str) -> list[str]:
    sets = {"model.init_from": ckpt, "data.source": corpus, "data.seq_len": 32, "data.heldout_fraction": 0.1,
            "train.steps": 3, "train.batch_size": 4, "train.warmup_steps": 1, "train.log_every": 3,
            "train.eval_batches": 1, "train.device": "cpu", "lora.rank": 2}
    out = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    for item in extra:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    from conftest import write_corpus

    base = tmp_path_factory.mktemp("adapt")
    corpus = write_corpus(base / "corpus.txt")
    ckpt = base / "llama"
    make_checkpoint(ckpt, "llama")
    run = base / "run"
    sets = adapt_sets(corpus, ckpt)
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", run, *sets) == 0
    return run, ckpt, corpus, sets


def test_adapt_specs_orders_and_passes(tmp_path):
    make_checkpoint(tmp_path, "llama")
    sets = [f"model.init_from={tmp_path}", "data.seq_len=32"]
    specs = stage_specs(load_config("configs/tiny-adapt.yaml", sets))
    assert [s.label for s in specs] == ["convert", "block03", "block02", "block01"]
    assert specs[0].converted and specs[0].steps == 0 and specs[0].train == () and specs[0].frozen == (1, 2, 3)
    for s in specs[1:]:
        assert (s.first, s.last) == (1, 3) and len(s.train) == 1 and s.noise.lo == 0.0 and s.noise.hi == 1.0
        assert set(s.adapters) == {1, 2, 3} - set(s.train)
    assert [s.trains_ends for s in specs[1:]] == [True, False, False]
    up = stage_specs(load_config("configs/tiny-adapt.yaml", [*sets, "curriculum.order=ascending",
                                                             "curriculum.passes=2"]))
    assert [s.label for s in up] == ["convert", "block01", "block02", "block03", "block01p2", "block02p2", "block03p2"]
    rnd = [s.train[0] for s in stage_specs(load_config("configs/tiny-adapt.yaml", [*sets, "curriculum.order=random",
                                                                                  "curriculum.passes=2"]))[1:]]
    assert sorted(rnd[:3]) == sorted(rnd[3:]) == [1, 2, 3]
    again = [s.train[0] for s in stage_specs(load_config("configs/tiny-adapt.yaml", [
        *sets, "curriculum.order=random", "curriculum.passes=2"]))[1:]]
    assert rnd == again  # seeded by train.seed
    hybrid = stage_specs(load_config("configs/tiny-adapt.yaml", [*sets, "curriculum.time=depth"]))
    assert hybrid[1].level == 3 and 0 < hybrid[1].noise.lo < hybrid[1].noise.hi < 0.6  # a band around r_3


def test_adapt_run_commits_convert_then_one_block_per_stage(adapted):
    run, ckpt, _, _ = adapted
    stages = list_stages(run, verify=True)
    assert [stages[i].name for i in sorted(stages)] == ["stage-01-convert", "stage-02-block03", "stage-03-block02",
                                                        "stage-04-block01"]
    convert = stages[1].manifest
    assert convert["steps"] == 0 and convert["converted_from"]["mask_token_added"]
    assert convert["converted_from"]["model_type"] == "llama"
    # The run's tokenizer is the checkpoint's plus the mask token.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == len(AutoTokenizer.from_pretrained(str(ckpt)))
    # Each adapt stage stores exactly the block it trained (+ the ends in the first one).
    w2 = stages[2].weights()
    assert {k.split(".")[2] for k in w2 if k.startswith("model.layers.")} == {"2"} and "lm_head.weight" in w2
    w3 = stages[3].weights()
    assert {k.split(".")[2] for k in w3 if k.startswith("model.layers.")} == {"1"} and "lm_head.weight" not in w3
    assert all(stages[i].manifest["heldout_ce"] > 0 for i in stages)


def test_converted_blocks_train_without_stability_parametrizations(adapted, tmp_path):
    """Step 0 of an adapt stage computes the converted model's function: spectral norm and the
    residual gain are off for blocks taken from a checkpoint."""
    from torch.nn.utils import parametrize

    from grow.assemble import RunState, assemble
    from grow.data import load_tokenizer

    run, ckpt, corpus, sets = adapted
    cfg = load_config("configs/tiny-adapt.yaml", [*sets[1::2], "quant.enabled=false"])
    assert cfg.stability.spectral_norm and cfg.stability.gamma == 0.5  # tiny.yaml's kit, for grown blocks
    tokenizer = load_tokenizer(run / "tokenizer")
    specs = stage_specs(cfg)
    stages = list_stages(run)
    converted = assemble(cfg, tokenizer, specs[0], RunState([stages[1]]), "cpu", training=False)
    start = assemble(cfg, tokenizer, specs[1], RunState([stages[1]]), "cpu", training=True)
    assert not any(parametrize.is_parametrized(m) for m in start.block(3).modules())
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    start.eval()
    with torch.no_grad():
        torch.testing.assert_close(start(ids), converted(ids), rtol=1e-5, atol=1e-5)


def test_adapt_resume_between_stages_equals_an_uninterrupted_run(adapted, tmp_path):
    run, _, _, sets = adapted
    split = tmp_path / "split"
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", split, "--stop-after", "block03", *sets) == 0
    assert sorted(list_stages(split)) == [1, 2]
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", split, "--resume", *sets) == 0
    a, b = list_stages(run), list_stages(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for k in a:
        wa, wb = a[k].weights(), b[k].weights()
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), k


def test_adapt_export_round_trip_and_sample(adapted, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, EuroBertForMaskedLM

    run, _, _, _ = adapted
    out = tmp_path / "export"
    assert run_cli("export", run, "--out", out) == 0
    hf = AutoModelForMaskedLM.from_pretrained(str(out))
    assert type(hf) is EuroBertForMaskedLM and len(hf.model.layers) == 3
    meta = json.loads((out / "grow.json").read_text())
    assert meta["check"]["max_abs_logit_diff"] < 1e-4
    assert meta["stages"][0]["stage"] == "stage-01-convert" and meta["stages"][0]["steps"] == 0
    assert "pretrained causal LM" in (out / "README.md").read_text()
    capsys.readouterr()
    assert run_cli("sample", out, "--mode", "iterative", "--length", 8, "--steps", 4) == 0
    assert capsys.readouterr().out.strip()


def test_qwen2_biases_survive_adapt_4bit_and_export(tmp_path):
    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    make_checkpoint(tmp_path / "qwen", "qwen2", num_hidden_layers=2)
    run, out = tmp_path / "run", tmp_path / "export"
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", run, *adapt_sets(corpus, tmp_path / "qwen")) == 0
    assert run_cli("export", run, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True
    assert json.loads((out / "grow.json").read_text())["check"]["max_abs_logit_diff"] < 1e-4


def test_warm_started_growth_takes_the_ends_and_optionally_the_blocks(tmp_path):
    """Right-to-left growth from a checkpoint: ends only (blocks fresh) or block k from layer k."""
    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    source, _ = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    for blocks in (False, True):
        run = tmp_path / f"run-{blocks}"
        sets = adapt_sets(corpus, tmp_path / "llama", "curriculum.kind=right_to_left", "curriculum.time=depth",
                          f"model.init_blocks={str(blocks).lower()}")
        assert run_cli("train", "configs/tiny-adapt.yaml", "--out", run, *sets) == 0
        stages = list_stages(run, verify=True)
        assert [stages[i].name for i in sorted(stages)] == ["stage-01-convert", "stage-02-block02", "stage-03-block01"]
        stored = stages[1].weights()
        V = source.config.vocab_size
        torch.testing.assert_close(stored["model.embed_tokens.weight"][:V], source.model.embed_tokens.weight)
        assert any(k.startswith("model.layers.") for k in stored) == blocks
        assert stages[1].manifest["converted_from"]["blocks"] == blocks
    # Joint training from the checkpoint: one stage after convert, every block from its layer.
    run = tmp_path / "joint"
    sets = adapt_sets(corpus, tmp_path / "llama", "curriculum.kind=joint")
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", run, *sets) == 0
    assert [s.name for s in list_stages(run, verify=True).values()] == ["stage-01-convert", "stage-02-joint"]


def test_status_shows_the_convert_stage(adapted, capsys):
    run, _, _, _ = adapted
    capsys.readouterr()
    assert run_cli("status", run) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("stage-01"))
    assert row[:2] == ["stage-01-convert", "converted"] and row[3] == "0" and row[-1] == "done"


@pytest.mark.parametrize("name, blocks", [("llama2-7b-adapt.yaml", 32), ("llama2-70b-adapt.yaml", 80)])
def test_plan_of_7b_and_70b_adapt_on_one_80gb_gpu(name, blocks, capsys):
    """Offline, the hub checkpoint is out of reach: grow plan plans the shape the config spells out."""
    assert run_cli("plan", f"configs/{name}", "--gpus", 1, "--gpu-memory", "80GiB") == 0
    out = capsys.readouterr().out
    assert "note: model.init_from: could not load" in out.splitlines()[0]
    rows = [line.split() for line in out.splitlines() if line.startswith("stage-")]
    assert len(rows) == blocks + 1 and rows[0][0] == "stage-01-convert" and rows[0][2] == "0"
    assert rows[1][0] == f"stage-02-block{blocks:02d}" and all(r[-2] == "yes" for r in rows)
    assert "every stage fits" in out
    flat = " ".join(out.split())  # assumption lines wrap
    assert "stage 1 (convert) loads meta-llama/" in flat and "converted blocks train without spectral norm" in flat


def test_run_state_reads_a_convert_stage_one_block_at_a_time(adapted):
    from grow.assemble import RunState

    run, _, _, _ = adapted
    stages = list_stages(run)
    whole = stages[1].weights()
    state = RunState([stages[1]])
    block = state.block(2)
    assert block.keys() == {k for k in whole if k.startswith("model.layers.1.")}
    assert all(torch.equal(block[k], whole[k]) for k in block)
    assert state.ends().keys() == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert not state._loaded  # nothing was read whole


def test_resume_after_the_checkpoint_is_gone(adapted, tmp_path, capsys):
    """Stage 1 holds everything converted: a resumed run no longer needs the checkpoint."""
    import shutil

    _, ckpt, corpus, _ = adapted
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    run = tmp_path / "run"
    sets = adapt_sets(corpus, copy)
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", run, "--stop-after", "convert", *sets) == 0
    shutil.rmtree(copy)
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", tmp_path / "fresh", *sets) == 2
    assert "model.init_from: no such checkpoint directory" in capsys.readouterr().err
    assert run_cli("train", "configs/tiny-adapt.yaml", "--out", run, "--resume", *sets) == 0
    assert sorted(list_stages(run, verify=True)) == [1, 2, 3, 4]

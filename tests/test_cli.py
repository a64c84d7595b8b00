"""The command line as a user meets it: train, status, resume, and one-line errors."""

import pytest
import torch

from conftest import tiny_overrides
from grow.cli import COMMANDS, build_parser, main
from grow.store import list_stages


def run_cli(*args):
    return main([str(a) for a in args])


def test_parser_and_command_table_agree():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_two_stage_run_then_status(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "configs/tiny.yaml", "--out", run, *tiny_overrides(corpus_file)) == 0
    out = capsys.readouterr().out
    assert "stage-01-block02 committed" in out and "stage-02-block01 committed" in out
    assert "stage-01-block02 r=0.200 | step" in out and "loss" in out and "tok/s" in out  # metrics lines
    assert sorted(list_stages(run, verify=True)) == [1, 2]
    assert (run / "grow.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert run_cli("status", run, "--verify") == 0
    out = capsys.readouterr().out
    sections = out.split("\n\n")
    rows = [line.split() for line in sections[0].splitlines() if line.startswith("stage-")]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [("stage-01-block02", "B2+ends", "r=0.200", "done"),
                                                         ("stage-02-block01", "B1", "r=1.000", "done")]
    levels = [line.split() for line in sections[1].splitlines()[2:]]
    # level, r_k, CE at commit, path now, drift, whole stack, "blocks", k..L
    assert [(r[0], r[1], r[-1]) for r in levels] == [("1", "1.000", "1..2"), ("2", "0.200", "2..2")]
    assert float(levels[0][2]) == float(rows[1][5]) and float(levels[1][2]) == float(rows[0][5])
    assert float(levels[0][3]) == float(levels[0][5])  # level 1's path is the whole stack
    memory = [line.split() for line in sections[2].splitlines() if line.startswith("stage-")]
    assert [m[0] for m in memory] == ["stage-01-block02", "stage-02-block01"]
    # Columns from the right: B/param, adapters, peak (number + unit), peak kind.
    assert memory[0][-5] == "0.000" and float(memory[1][-5]) > 0  # stage 1 has no frozen 4-bit block yet
    assert "complete" in out.splitlines()[-1]


def test_resume_between_stages_equals_an_uninterrupted_run(tmp_path, corpus_file):
    full, split = tmp_path / "full", tmp_path / "split"
    sets = tiny_overrides(corpus_file, blocks=3)
    assert run_cli("train", "configs/tiny.yaml", "--out", full, *sets) == 0
    assert run_cli("train", "configs/tiny.yaml", "--out", split, "--stop-after", "block03", *sets) == 0
    assert sorted(list_stages(split)) == [1]
    assert run_cli("train", "configs/tiny.yaml", "--out", split, "--resume", *sets) == 0
    a, b = list_stages(full), list_stages(split)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for k in a:
        wa, wb = a[k].weights(), b[k].weights()
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), k
        assert a[k].manifest["heldout_ce"] == b[k].manifest["heldout_ce"]


def test_existing_out_is_not_touched_without_resume_or_overwrite(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    assert run_cli("train", "configs/tiny.yaml", "--out", run, *tiny_overrides(corpus_file)) == 2
    err = capsys.readouterr().err
    assert err.startswith("grow: error: --out:") and "--resume" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_resume_refuses_changed_architecture(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus_file, blocks=2)
    assert run_cli("train", "configs/tiny.yaml", "--out", run, "--stop-after", 1, *sets) == 0
    capsys.readouterr()
    for change, key in [("model.hidden_size=64", "model.hidden_size"), ("schedule.r_min=0.1", "schedule.r_min"),
                        ("curriculum.kind=left_to_right", "curriculum.kind"),
                        ("quant.quant_type=fp4", "quant.quant_type"), ("lora.rank=4", "lora.rank"),
                        ("lora.targets=[q_proj]", "lora.targets")]:
        assert run_cli("train", "configs/tiny.yaml", "--out", run, "--resume", *sets, "--set", change) == 2
        err = capsys.readouterr().err
        assert "architecture-critical" in err and key in err, change
    # A field added to grow since the run started counts at its default, not as a change.
    import yaml

    stored = yaml.safe_load((run / "grow.yaml").read_text())
    del stored["curriculum"]["anchor"]
    (run / "grow.yaml").write_text(yaml.safe_dump(stored))
    (run / "run.json").unlink()  # that older grow did not hash grow.yaml either (an edited one is refused)
    # Steps, learning rate and logging may change.
    assert run_cli("train", "configs/tiny.yaml", "--out", run, "--resume", *sets, "--set", "train.lr=1e-4",
                   "--set", "train.log_every=1") == 0


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda tmp, corpus: ["--set", "schedule.ratios=[0.2, 0.5]"], "schedule.ratios: must be strictly decreasing"),
        (lambda tmp, corpus: ["--set", "stability.gamma=2"], "stability.gamma"),
        (lambda tmp, corpus: ["--set", "model.widht=2"], "model.widht: unknown field"),
        (lambda tmp, corpus: ["--set", f"data.source={(tmp / 'empty.txt').write_text('') or tmp / 'empty.txt'}"],
         "data.source"),
        (lambda tmp, corpus: ["--set", f"data.source={tmp / 'missing.txt'}"], "data.source"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, corpus_file, capsys, make_args, match):
    run = tmp_path / "run"
    code = run_cli("train", "configs/tiny.yaml", "--out", run, *tiny_overrides(corpus_file), *make_args(tmp_path, corpus_file))
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run.exists()


def test_tokenizer_without_mask_token_is_refused(tmp_path, corpus_file, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    code = run_cli("train", "configs/tiny.yaml", "--out", tmp_path / "run", *tiny_overrides(corpus_file),
                   "--set", f"data.tokenizer={tmp_path / 'tok'}")
    assert code == 2 and "data.tokenizer" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_status_of_a_non_run(tmp_path, capsys):
    assert run_cli("status", tmp_path) == 2
    assert "not a grow run" in capsys.readouterr().err


# tiny-adapt.yaml starts from a pretrained checkpoint: tests/test_adapt.py runs it.
VARIANTS = sorted(p.name for p in __import__("pathlib").Path("configs").glob("tiny-*.yaml")
                  if p.name != "tiny-adapt.yaml")


@pytest.mark.parametrize("config", VARIANTS)
def test_every_shipped_tiny_variant_grows_and_samples_from_the_cli(tmp_path, corpus_file, capsys, config):
    """Each curriculum/time combination (configs/tiny-*.yaml), shrunk to 2 blocks and a few steps."""
    from grow.config import load_config
    from grow.corruption import corruption_for
    from grow.curriculum import level_paths, stage_specs
    from grow.sample import modes_for

    run = tmp_path / "run"
    sets = [*tiny_overrides(corpus_file, steps=3), "--set", "curriculum.joint_steps=2"]
    if load_config(f"configs/{config}").curriculum.final_steps:  # the variant keeps its final stage, shortened
        sets += ["--set", "curriculum.final_steps=2"]
    assert run_cli("train", f"configs/{config}", "--out", run, *sets) == 0
    cfg = load_config(f"configs/{config}", sets[1::2])
    assert sorted(list_stages(run, verify=True)) == list(range(1, len(stage_specs(cfg)) + 1))
    assert run_cli("status", run) == 0 and "complete" in capsys.readouterr().out
    corruption = corruption_for(cfg)
    mode = modes_for(corruption, level_paths(cfg) is not None)[0]  # depth, iterative or refine
    assert run_cli("sample", run, "--mode", mode, "--length", 8, "--steps", 4) == 0
    if corruption.replaces_tokens:  # a replacement model never saw [MASK]
        assert run_cli("sample", run, "--mode", "iterative", "--length", 8) == 2
        assert "use --mode refine" in capsys.readouterr().err
    elif level_paths(cfg) is None:  # a whole-stack model has no levels to step through
        assert run_cli("sample", run, "--mode", "depth", "--length", 8) == 2
        assert "--mode: depth steps through noise levels tied to blocks" in capsys.readouterr().err

"""grow ablate: arms are ordinary runs on one budget, measured alike; a killed ablation continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_overrides
from grow.ablate import ARMS, Ngram, budget_sets, choose_arms, stage_steps
from grow.cli import main
from grow.config import load_config
from grow.errors import UserError


def sets_of(corpus, **kw):
    return tiny_overrides(corpus, **kw)[1::2]


def test_every_arm_gets_the_budget_in_its_own_stages(corpus_file):
    base = sets_of(corpus_file, blocks=3, steps=[4, 4, 8])
    for arm in ARMS:
        sets = [*base, "curriculum.final_steps=4", *arm.sets]
        cfg = load_config("configs/tiny.yaml", [*sets, *budget_sets("configs/tiny.yaml", sets, 4 * 32 * 40)])
        # 40 steps of 4 x 32 tokens, up to rounding of each stage's share
        assert abs(stage_steps(cfg) - 40) <= 3, arm.name


def test_the_ngram_judge_prefers_the_corpus_to_noise():
    import torch

    rows = torch.tensor([[1, 2, 3, 4] * 8] * 16)
    judge = Ngram(rows, vocab_size=10)
    assert judge.perplexity([[1, 2, 3, 4, 1, 2]]) < 1.5 < judge.perplexity([[4, 3, 2, 1, 4, 3]])
    assert judge.perplexity([[1, 2, 3, 4, 1, 2]]) == judge.perplexity([[1, 2, 3, 4, 1, 2]])


def test_unknown_arms_are_one_line(capsys):
    with pytest.raises(UserError, match="--only: unknown arm"):
        choose_arms("grow,nonsense")
    assert main(["ablate", "configs/tiny.yaml", "--out", "/tmp/never", "--only", "nonsense"]) == 2


@pytest.mark.slow
def test_two_arms_end_to_end_and_a_killed_ablation_continues(tmp_path, corpus_file, capsys):
    out = tmp_path / "ablation"
    args = ["ablate", "configs/tiny.yaml", "--out", str(out), *tiny_overrides(corpus_file, blocks=2, steps=3),
            "--set", "curriculum.final_steps=2", "--set", "curriculum.anchor=0.25", "--samples", "2", "--steps", "4"]
    # Killed (SIGKILL, the whole process group) once the second arm has committed its first stage.
    proc = subprocess.Popen([sys.executable, "-m", "grow", *args, "--only", "grow,no-anchor"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "arms" / "no-anchor"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(second.glob("stage-01-*/manifest.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_stage = next(second.glob("stage-01-*/manifest.json")).read_text()
    grow_result = (out / "arms" / "grow" / "ablation.json").read_text()
    assert not (second / "ablation.json").exists()

    assert main([*args, "--only", "grow,no-anchor,joint"]) == 0
    err = capsys.readouterr().err
    assert "grow: done earlier" in err and "no-anchor: resuming" in err
    assert (out / "arms" / "grow" / "ablation.json").read_text() == grow_result  # not redone
    assert next(second.glob("stage-01-*/manifest.json")).read_text() == first_stage  # continued, not restarted
    summary = json.loads((out / "ablation.json").read_text())
    assert list(summary["arms"]) == ["grow", "joint", "no-anchor"]
    g, j = summary["arms"]["grow"], summary["arms"]["joint"]
    assert g["tokens"] == summary["budget_tokens"] and abs(j["tokens"] - g["tokens"]) <= 2 * 4 * 32
    assert len(g["levels"]) == len(j["levels"]) == 2 and all("path" in e for e in g["levels"])
    assert all("path" not in e for e in j["levels"])  # the joint model has no level paths
    assert g["samples"]["iterative"]["ngram_ppl"] > 1 and "depth" in g["samples"] and "depth" not in j["samples"]
    assert set(g["exports"]) == {"dequantized", "original"}
    # the dequantized export reproduces the run's own whole stack
    assert g["exports"]["dequantized"] == pytest.approx([e["whole"] for e in g["levels"]], abs=1e-3)
    for arm in summary["arms"]:  # every arm is a valid, complete run that other subcommands accept
        assert main(["status", str(out / "arms" / arm), "--verify"]) == 0
        assert "complete" in capsys.readouterr().out
    md = (out / "ablation.md").read_text()
    assert "| grow |" in md and "| joint |" in md and "## Conclusions" in md and "joint baseline" in md
    assert (out / "ablation.png").stat().st_size > 0


def test_an_arm_without_a_stock_export_is_measured_and_says_why(tmp_path, corpus_file):
    from grow.ablate import measure_arm

    run = tmp_path / "gaussian"
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *tiny_overrides(corpus_file, blocks=2, steps=3),
                 "--set", "objective.corruption=gaussian"]) == 0
    result = measure_arm(run, samples=0, steps=2, exports=True, log=lambda s: None)
    assert result["exports"] == {} and "gaussian" in result["export_refused"]
    assert len(result["levels"]) == 2

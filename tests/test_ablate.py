"""grow ablate: arms are ordinary runs on one budget, measured alike; a killed ablation continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.slow
def test_arms_side_by_side_share_one_tokenizer_and_report_in_arm_order(tmp_path, corpus_file, capsys):
    out = tmp_path / "ablation"
    args = ["ablate", "configs/tiny.yaml", "--out", str(out), *tiny_overrides(corpus_file, blocks=2, steps=3),
            "--samples", "1", "--steps", "2", "--no-export", "--only", "no-gamma,grow,no-anchor", "--jobs", "2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 arm(s), 2 at a time with 1 thread(s) each" in err
    summary = json.loads((out / "ablation.json").read_text())
    assert list(summary["arms"]) == ["grow", "no-gamma", "no-anchor"]  # ARMS order, not finishing order
    assert summary["jobs"] == 2 and summary["threads_per_job"] == max(1, len(os.sched_getaffinity(0)) // 2)
    first = out / "arms" / "grow" / "tokenizer"  # the first arm trains alone; the others read its tokenizer
    for arm in ("no-gamma", "no-anchor"):
        cfg = load_config(out / "arms" / arm / "grow.yaml")
        assert cfg.data.tokenizer == str(first)
        assert summary["arms"][arm]["tokens"] == summary["budget_tokens"]
        assert (out / "arms" / arm / "train.log").stat().st_size > 0  # its progress went there, not to the terminal
        assert main(["status", str(out / "arms" / arm), "--verify"]) == 0
    assert "arms ran 2 at a time" in (out / "ablation.md").read_text()
    assert main([*args[:-2], "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--jobs: expected 1 to 64 arms at a time, got 0")


def test_an_arm_without_a_stock_export_is_measured_and_says_why(tmp_path, corpus_file):
    from grow.ablate import measure_arm

    run = tmp_path / "gaussian"
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *tiny_overrides(corpus_file, blocks=2, steps=3),
                 "--set", "objective.corruption=gaussian"]) == 0
    result = measure_arm(run, samples=0, steps=2, exports=True, log=lambda s: None)
    assert result["exports"] == {} and "gaussian" in result["export_refused"]
    assert len(result["levels"]) == 2


def test_minutes_share_what_is_left_after_fixed_costs_by_each_arms_cost():
    from grow.ablate import minutes_budget

    calibration = {"reused": False, "seconds": 60.0, "fixed_seconds": 20.0, "measure_seconds": 10.0,
                   "seconds_per_token": 1e-3}
    factors = {"grow": 1.0, "joint": 2.0}
    kw = dict(step_tokens=128, min_tokens=2 * 128, out=Path("/tmp/x"))
    # 600 s - 60 s of calibration - 2 x 30 s per arm = 480 s for 3 x 1e-3 s per token: 160,000 tokens
    assert minutes_budget(10, calibration, factors, **kw) == 160_000 // 128 * 128
    # a calibration an earlier call made costs this one nothing
    assert minutes_budget(10, calibration | {"reused": True}, factors, **kw) == 180_000 // 128 * 128
    with pytest.raises(UserError, match=r"^--minutes: 2 minutes do not cover .* at least about 1.1 minutes") as exc:
        minutes_budget(2, calibration, factors, **kw)  # 60 s of arms + 3 x 1e-3 x 256 s of training
    assert "\n" not in str(exc.value)
    # Two arms at a time: one round of fixed costs (30 s), training shared by two:
    # 600 - 60 - 30 = 510 s for 3 x 1e-3 / 2 s per token = 340,000 tokens.
    assert minutes_budget(10, calibration, factors, **kw, jobs=2) == 340_000 // 128 * 128
    # Three arms two at a time: the last round runs alone, so two rounds of fixed costs.
    three = factors | {"no-gamma": 1.0}
    assert minutes_budget(10, calibration, three, **kw, jobs=2) == int(480 / (4e-3 / 2)) // 128 * 128


def test_budget_and_minutes_exclude_each_other_and_minutes_are_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "configs/tiny.yaml", "--out", "/tmp/never", "--budget", "1000", "--minutes", "5"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    for bad in ("0", "-1", "nan"):
        assert main(["ablate", "configs/tiny.yaml", "--out", "/tmp/never", "--minutes", bad]) == 2
        assert capsys.readouterr().err.strip() == f"grow: error: --minutes: expected a positive number of minutes, got {bad}"


def test_a_budget_is_one_number_for_every_arm_and_every_call(tmp_path, corpus_file):
    from grow.ablate import settle_budget

    sets = sets_of(corpus_file, blocks=2, steps=3)
    base = load_config("configs/tiny.yaml", sets)

    def settle(out, budget=None, minutes=None):
        return settle_budget("configs/tiny.yaml", out, base, choose_arms("grow"), sets=sets, budget=budget,
                             minutes=minutes, samples=1, steps=2, exports=False, log=lambda s: None)

    out = tmp_path / "a"
    out.mkdir()
    assert settle(out, budget=1024)["budget_tokens"] == 1024
    assert json.loads((out / "ablation-budget.json").read_text())["how"] == "--budget"
    assert settle(out, budget=1024)["budget_tokens"] == 1024  # the same budget continues
    for budget in (2048, None):  # another one, or the config's own (6 steps of 4 x 32 tokens)
        with pytest.raises(UserError, match=r"^--budget: .* continue it with --budget 1024, or use a new --out$"):
            settle(out, budget=budget)
    with pytest.raises(UserError, match=r"^--minutes: .* continue it with --budget 1024"):
        settle(out, minutes=5)

    # An ablation whose measured arms predate the budget file: their budget is checked, and
    # --minutes cannot choose one for them (nor calibrate for them).
    old = tmp_path / "b"
    (old / "arms" / "grow").mkdir(parents=True)
    (old / "arms" / "grow" / "ablation.json").write_text(json.dumps({"budget_tokens": 512}))
    with pytest.raises(UserError, match=r"^--minutes: .* already holds arms"):
        settle(old, minutes=5)
    assert not (old / "calibration").exists()
    with pytest.raises(UserError, match=r"^--budget: arm grow of .* was trained on 512 tokens"):
        settle(old, budget=1024)
    assert not (old / "ablation-budget.json").exists()  # refused: nothing fixed
    assert settle(old, budget=512)["budget_tokens"] == 512


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.slow
def test_minutes_calibrate_once_and_every_call_keeps_the_budget(tmp_path, corpus_file, capsys):
    out = tmp_path / "ablation"
    args = ["ablate", "configs/tiny.yaml", "--out", str(out), *tiny_overrides(corpus_file, blocks=2, steps=3),
            "--only", "grow", "--no-export", "--samples", "1", "--steps", "2"]
    # Too few minutes: refused in one line before any arm trains; the calibration is kept.
    assert main([*args, "--minutes", "0.001"]) == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith("grow: error: --minutes: 0.001 minutes do not cover") and "at least about" in err
    record = out / "calibration" / "calibration.json"
    calibration = json.loads(record.read_text())
    assert calibration["probe_tokens"] > 0 and calibration["seconds_per_token"] > 0
    assert not (out / "ablation-budget.json").exists() and not (out / "arms").exists()

    # Minutes for 8.5 steps of 4 x 32 tokens past one arm's fixed costs (the kept calibration costs
    # this call nothing): 8 whole steps, 4 per stage.
    step = 4 * 32
    per_arm = calibration["fixed_seconds"] + calibration["measure_seconds"]
    minutes = (per_arm + calibration["seconds_per_token"] * 8.5 * step) / 60
    calibrated = record.stat().st_mtime_ns
    assert main([*args, "--minutes", str(minutes)]) == 0
    err = capsys.readouterr().err
    assert "calibration: reusing" in err and "calibration: growing" not in err
    assert record.stat().st_mtime_ns == calibrated
    budget_file = out / "ablation-budget.json"
    chosen = json.loads(budget_file.read_text())
    assert chosen["how"] == "--minutes" and chosen["budget_tokens"] == 8 * step and chosen["factors"] == {"grow": 1.0}
    summary = json.loads((out / "ablation.json").read_text())
    arm = summary["arms"]["grow"]
    assert summary["budget_tokens"] == arm["budget_tokens"] == arm["tokens"] == 8 * step
    assert arm["wall_seconds"] >= arm["train_seconds"] > 0
    md = (out / "ablation.md").read_text()
    assert f"--minutes {float(minutes):g}: calibrated on this machine" in md and "| wall s |" in md

    # The same command again: the arm is done, the budget is the file's, nothing recalibrated.
    fixed = budget_file.read_text(), budget_file.stat().st_mtime_ns
    assert main([*args, "--minutes", str(minutes)]) == 0
    err = capsys.readouterr().err
    assert "grow: done earlier" in err and "calibration:" not in err
    assert (budget_file.read_text(), budget_file.stat().st_mtime_ns) == fixed
    assert json.loads((out / "ablation.json").read_text())["budget_tokens"] == 8 * step

    # Another budget, by --budget, by other minutes or by the config's default, is refused.
    for flags, named in ((["--budget", str(16 * step)], "--budget"), ([], "--budget"),
                         (["--minutes", str(2 * minutes)], "--minutes")):
        assert main([*args, *flags]) == 2
        err = last_line(capsys.readouterr().err)
        assert err.startswith(f"grow: error: {named}: ") and f"continue it with --budget {8 * step} or --minutes" in err
    assert (budget_file.read_text(), budget_file.stat().st_mtime_ns) == fixed


def test_conclusions_do_not_compare_ce_taken_over_other_tokens():
    from grow.ablate import conclusions

    def arm(ce, on, ppl):
        return {"what": "x", "ce_on": on, "levels": [{"whole": ce}], "peak_bytes": 1, "peak_kind": "rss",
                "samples": {"iterative": {"ngram_ppl": ppl, "repetition": 0.1}}}

    summary = {"schedule": [1.0], "arms": {"grow": arm(5.0, "masked tokens", 50.0),
                                           "no-gamma": arm(4.9, "masked tokens", 60.0),
                                           "uniform": arm(1.0, "every token", 40.0)}}
    text = conclusions(summary)
    assert "`no-gamma` (x) beats growth as configured by 0.1000 nats" in text
    assert "`uniform` (x)" not in text and "`uniform` take their CE over every token" in text
    assert "come from `uniform`" in text  # samples are still judged alike


def test_report_of_a_replacement_noise_arm_has_no_bound_and_judges_its_refine_samples():
    from grow.ablate import render_markdown

    stats = {"ngram_ppl": 99.0, "distinct_2": 0.5, "repetition": 0.25, "tokens_per_s": 10.0}
    uniform = {"what": "u", "ce_on": "every token", "tokens": 8, "train_seconds": 1.0, "peak_bytes": 2**20,
               "peak_kind": "rss", "levels": [{"whole": 3.0, "path": 3.1}], "elbo": None,
               "samples": {"refine": stats}, "exports": {}}
    md = render_markdown({"config": "c", "budget_tokens": 8, "schedule": [1.0], "skipped": {},
                          "arms": {"uniform": uniform}})
    row = next(line for line in md.splitlines() if line.startswith("| uniform | u |"))
    # bits/token "-", the refine samples judged, and their throughput in the refine column
    assert "| 3.0000 | 3.1000 | - | 99.0 | 0.500 | 0.250 | - | - | - | 10 |" in row

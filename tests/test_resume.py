"""Resume is exact: a killed-and-resumed run ends bitwise equal to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import main_preempted_at, tiny_overrides, write_corpus
from grow.cli import main
from grow.store import list_stages

STEPS = 24


def sets(corpus, extra=()):
    return [*tiny_overrides(corpus, blocks=2, steps=STEPS), "--set", "train.checkpoint_every=4",
            "--set", "train.keep_checkpoints=2", *extra]


def assert_same_run(a: Path, b: Path, stages: int = 2):
    sa, sb = list_stages(a, verify=True), list_stages(b, verify=True)
    assert sorted(sa) == sorted(sb) == list(range(1, stages + 1))
    for k in sa:
        wa, wb = sa[k].weights(), sb[k].weights()
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (k, name)
        assert sa[k].manifest["losses"] == sb[k].manifest["losses"], k  # every per-step loss
        assert sa[k].manifest["heldout_ce"] == sb[k].manifest["heldout_ce"]
        assert sa[k].manifest["levels"] == sb[k].manifest["levels"]
        assert sa[k].manifest["files"] == sb[k].manifest["files"], k  # every file, hash for hash


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *sets(corpus)]) == 0
    assert not any((run / "checkpoints").glob("stage-*"))  # checkpoints go once a stage commits
    return run


def preempt_at(run, corpus, stage: str, step: int, extra=()) -> int:
    """Train until the SIGTERM handler's effect is triggered at ``step`` of ``stage``."""
    return main_preempted_at(["train", "configs/tiny.yaml", "--out", str(run), *sets(corpus, extra)], stage, step)


@pytest.mark.parametrize("stage, stop_step", [("stage-01-block02", 8), ("stage-02-block01", 12)])
def test_preempted_inside_a_stage_then_resumed_is_identical(tmp_path, corpus, reference, capsys, stage, stop_step):
    run = tmp_path / "run"
    code = preempt_at(run, corpus, stage, stop_step)
    err = capsys.readouterr().err
    assert code == 143 and "preempted: saved a checkpoint at step" in err
    ckpt = run / "checkpoints" / stage / f"step-{stop_step:08d}"
    assert (ckpt / "manifest.json").is_file()
    assert main(["status", str(run)]) == 0
    assert f"continues {stage}" in capsys.readouterr().out
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus)]) == 0
    assert f"resuming at step {stop_step}/{STEPS}" in capsys.readouterr().out
    assert_same_run(reference, run)


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus, reference, capsys):
    run = tmp_path / "run"
    assert preempt_at(run, corpus, "stage-01-block02", 12) == 143
    root = run / "checkpoints" / "stage-01-block02"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000012"]  # keep 2
    shard = root / "step-00000012" / "trainable.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus)]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "sha256" in out and "resuming at step 8/" in out
    assert_same_run(reference, run)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_resumes_identically(tmp_path, corpus, reference, sig):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "grow", "train", "configs/tiny.yaml", "--out", str(run), *sets(corpus)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    root = run / "checkpoints" / "stage-01-block02"
    while time.time() < deadline and not list(root.glob("step-*")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "preempted" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus)]) == 0
    assert_same_run(reference, run)
    # issue 11 row 9: no leftovers either -- the very files (and directories) of the uninterrupted run
    assert {p.relative_to(run) for p in run.rglob("*")} == {p.relative_to(reference) for p in reference.rglob("*")}


def test_from_stage_sets_later_stages_aside_and_regrows(tmp_path, corpus, reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--from-stage", "block01", *sets(corpus)]) == 0
    aside = list(run.glob("set-aside-*/stage-02-block01"))
    assert len(aside) == 1 and (aside[0] / "manifest.json").is_file()  # moved, not deleted
    assert_same_run(reference, run)


CURRICULA = {
    "left_to_right": ["curriculum.kind=left_to_right", "curriculum.joint_every=2", "curriculum.joint_steps=8"],
    "joint": ["curriculum.kind=joint", "curriculum.time=input"],
    "r2l_bands_final": ["curriculum.time=input", "curriculum.conditioning=embedding", "curriculum.final_steps=8"],
}


@pytest.mark.parametrize("name", CURRICULA)
def test_every_curriculum_resumes_exactly_inside_and_between_stages(tmp_path, corpus, name, capsys):
    """A reference run, then the same run preempted inside its last stage (which itself starts
    between stages: a fresh process rebuilds it from the store) and resumed."""
    extra = [x for kv in CURRICULA[name] for x in ("--set", kv)]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", "--out", str(ref), *sets(corpus, extra)]) == 0
    stages = sorted(list_stages(ref))
    last = list_stages(ref)[stages[-1]]
    assert preempt_at(run, corpus, last.name, 4, extra) == 143
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus, extra)]) == 0
    assert "resuming at step 4/" in capsys.readouterr().out
    assert_same_run(ref, run, stages=len(stages))


def test_resume_over_a_prepared_directory_is_exact(tmp_path, corpus, reference, capsys):
    """A corpus prepared by `grow data prepare` trains exactly as the raw file it came from
    (same rows, same order), and a run over it preempted inside a stage resumes exactly."""
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", corpus, "--out", str(prepared), "--seq-len", "32", "--vocab-size", "300",
                 "--heldout-fraction", "0.1", "--seed", "0"]) == 0
    run = tmp_path / "run"
    over = sets(str(prepared))
    assert preempt_at(run, str(prepared), "stage-02-block01", 8) == 143
    capsys.readouterr()
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *over]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 8/" in out and f"rows mapped from {prepared}" in out
    assert_same_run(reference, run)

"""Resume is exact: a killed-and-resumed run ends bitwise equal to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_corpus
from grow.checkpoint import PREEMPT
from grow.cli import main
from grow.store import list_stages

STEPS = 24


def sets(corpus, extra=()):
    return [*tiny_overrides(corpus, blocks=2, steps=STEPS), "--set", "train.checkpoint_every=4",
            "--set", "train.keep_checkpoints=2", *extra]


def assert_same_run(a: Path, b: Path):
    sa, sb = list_stages(a, verify=True), list_stages(b, verify=True)
    assert sorted(sa) == sorted(sb) == [1, 2]
    for k in sa:
        wa, wb = sa[k].weights(), sb[k].weights()
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (k, name)
        assert sa[k].manifest["losses"] == sb[k].manifest["losses"], k  # every per-step loss
        assert sa[k].manifest["heldout_ce"] == sb[k].manifest["heldout_ce"]
        if k < 2:
            for f in ("adapter_model.safetensors",):
                assert sa[k].manifest["files"][f]["sha256"] == sb[k].manifest["files"][f]["sha256"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *sets(corpus)]) == 0
    assert not any((run / "checkpoints").glob("stage-*"))  # checkpoints go once a stage commits
    return run


@pytest.mark.parametrize("stop_block, stop_step", [(2, 8), (1, 12)])
def test_preempted_inside_a_stage_then_resumed_is_identical(tmp_path, corpus, reference, capsys, stop_block, stop_step):
    run = tmp_path / "run"

    def stop_at(line):  # the SIGTERM handler's effect, triggered at a known step
        if f"block {stop_block}/2" in line and f"step {stop_step}/" in line:
            PREEMPT.requested = True

    import grow.cli as cli

    original = cli._log_to
    try:
        cli._log_to = lambda r: (lambda line: (stop_at(line), original(r)(line)))
        code = main(["train", "configs/tiny.yaml", "--out", str(run), *sets(corpus)])
    finally:
        cli._log_to = original
        PREEMPT.requested = False
    err = capsys.readouterr().err
    assert code == 143 and "preempted: saved a checkpoint at step" in err
    ckpt = run / "checkpoints" / f"stage-{stop_block:02d}" / f"step-{stop_step:08d}"
    assert (ckpt / "manifest.json").is_file()
    assert main(["status", str(run)]) == 0
    assert f"continues block {stop_block}" in capsys.readouterr().out
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus)]) == 0
    assert f"resuming at step {stop_step}/{STEPS}" in capsys.readouterr().out
    assert_same_run(reference, run)


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus, reference, capsys):
    run = tmp_path / "run"
    import grow.cli as cli

    original = cli._log_to
    try:
        cli._log_to = lambda r: (lambda line: (PREEMPT.__setattr__("requested", "step 12/" in line and "block 2/2" in line
                                                                  or PREEMPT.requested), original(r)(line)))
        assert main(["train", "configs/tiny.yaml", "--out", str(run), *sets(corpus)]) == 143
    finally:
        cli._log_to = original
        PREEMPT.requested = False
    root = run / "checkpoints" / "stage-02"
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
    root = run / "checkpoints" / "stage-02"
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


def test_from_stage_sets_later_stages_aside_and_regrows(tmp_path, corpus, reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--from-stage", "1", *sets(corpus)]) == 0
    aside = list(run.glob("set-aside-*/stage-01"))
    assert len(aside) == 1 and (aside[0] / "manifest.json").is_file()  # moved, not deleted
    assert_same_run(reference, run)


def test_resume_over_a_prepared_directory_is_exact(tmp_path, corpus, reference, capsys):
    """A corpus prepared by `grow data prepare` trains exactly as the raw file it came from
    (same rows, same order), and a run over it preempted inside a stage resumes exactly."""
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", corpus, "--out", str(prepared), "--seq-len", "32", "--vocab-size", "300",
                 "--heldout-fraction", "0.1", "--seed", "0"]) == 0
    run = tmp_path / "run"
    over = sets(str(prepared))
    import grow.cli as cli

    original = cli._log_to
    try:
        cli._log_to = lambda r: (lambda line: (PREEMPT.__setattr__("requested", "step 8/" in line and "block 1/2" in line
                                                                  or PREEMPT.requested), original(r)(line)))
        assert main(["train", "configs/tiny.yaml", "--out", str(run), *over]) == 143
    finally:
        cli._log_to = original
        PREEMPT.requested = False
    capsys.readouterr()
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *over]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 8/" in out and f"rows mapped from {prepared}" in out
    assert_same_run(reference, run)

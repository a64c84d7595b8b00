"""Nothing a user does loses a run: each probe of issue 11, repeated through the CLI.

Every test names the row of the issue's table it covers. They share one complete 3-block run
(tiny: width 32, 4 steps a stage) and copy it before changing anything.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import main_preempted_at, tiny_config, tiny_overrides, write_corpus
from grow.cli import main
from grow.store import list_stages, sha256_file, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def sets(corpus, extra=()):
    return [*tiny_overrides(corpus, blocks=3), *extra]


def train(run, corpus, *flags, extra=()):
    return main(["train", "configs/tiny.yaml", "--out", str(run), *flags, *sets(corpus, extra)])


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a directory with its content (small runs only)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def file_set(run: Path) -> set[str]:
    """Every file and directory under ``run``."""
    return {str(p.relative_to(run)) for p in run.rglob("*")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("base") / "run"
    assert train(run, corpus) == 0
    return run


@pytest.fixture
def run(base, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base, copy)
    return copy


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("grow:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- rows 1 and 6: failed starts


@pytest.mark.parametrize("bad", ["data.source=missing.txt", "model.vocab_size=100"])
def test_overwrite_that_fails_leaves_the_old_run_untouched(run, corpus, capsys, bad):
    """issue 11 row 1: --overwrite with bad data or a bad model shape replaces nothing."""
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, corpus, "--overwrite", extra=["--set", bad]) == 2
    line = one_line(capsys.readouterr().err)
    assert bad.split("=")[0] in line
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no temp start, no lock file left


def test_overwrite_replaces_only_with_a_complete_start(run, corpus):
    """issue 11 row 1: a valid --overwrite does replace the run (and leaves no old copy around)."""
    assert train(run, corpus, "--overwrite", "--stop-after", "1") == 0
    assert sorted(list_stages(run)) == [1]
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


def test_failed_start_leaves_nothing_and_says_what_to_do(tmp_path, corpus, capsys, monkeypatch):
    """issue 11 row 6: a start refused by its config leaves no directory, so the retry just works;
    a start that fails once training began leaves a run that --resume continues, and says so."""
    run = tmp_path / "runs" / "new"
    assert train(run, corpus, extra=["--set", "model.vocab_size=100"]) == 2
    assert "model.vocab_size" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # not even a lock file, a temp start or the parent it made

    import grow.stages

    def failing(*args, **kwargs):
        raise grow.stages.UserError("train.device: injected failure in the first stage")

    monkeypatch.setattr(grow.stages, "train_stage", failing)
    assert train(run, corpus) == 2
    capsys.readouterr()
    monkeypatch.undo()
    assert train(run, corpus) == 2  # a plain retry names the flag that continues
    assert "--resume" in one_line(capsys.readouterr().err)
    assert train(run, corpus, "--resume") == 0
    assert sorted(list_stages(run, verify=True)) == [1, 2, 3]


def test_train_into_a_run_or_stage_is_refused(run, corpus, capsys):
    """issue 11 rows 1 and 4: `train --overwrite` cannot replace a stage (or anything inside a run)."""
    before = snapshot(run)
    capsys.readouterr()
    assert train(run / "stage-03-block01", corpus, "--overwrite") == 2
    assert "is inside the grow run" in one_line(capsys.readouterr().err)
    assert snapshot(run) == before


# --------------------------------------------------------------------------- rows 2 and 10: hashes


def test_a_crash_while_grow_yaml_is_rewritten_leaves_a_valid_pair(run, corpus, monkeypatch):
    """issue 11 row 2: a resume that changes grow.yaml (train.lr) first lets run.json accept the
    old and the new content, so a crash between the two writes leaves a run that still loads."""
    import grow.store
    from grow.store import run_problem

    real = grow.store.write_text_atomic

    def crash(path, text):
        if Path(path).name == "grow.yaml":
            raise KeyboardInterrupt  # killed right before grow.yaml is replaced
        real(path, text)

    monkeypatch.setattr(grow.store, "write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        grow.store.write_run_config(run, (run / "grow.yaml").read_text().replace("lr: ", "lr: 1.0e-4 #"))
    monkeypatch.undo()
    assert '"previous"' in (run / "run.json").read_text()  # the first write happened
    assert run_problem(run) is None
    assert train(run, corpus, "--resume", extra=["--set", "train.lr=1e-4"]) == 0
    assert run_problem(run) is None and "previous" not in (run / "run.json").read_text()


def test_edited_grow_yaml_or_tokenizer_is_refused(run, corpus, capsys):
    """issue 11 row 2: grow.yaml and the tokenizer are hashed in run.json; an edit is reported by
    status --verify and refused by sample, export and --resume."""
    text = (run / "grow.yaml").read_text()
    assert "alpha: 16.0" in text
    (run / "grow.yaml").write_text(text.replace("alpha: 16.0", "alpha: 36.0"))
    capsys.readouterr()
    assert main(["status", str(run), "--verify"]) == 1
    assert "grow.yaml was changed" in capsys.readouterr().out
    for argv in (["sample", str(run), "--length", "4"], ["export", str(run), "--out", str(run.parent / "e")],
                 ["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus)]):
        assert main(argv) == 2, argv
        assert "grow.yaml was changed after grow wrote it" in one_line(capsys.readouterr().err)
    assert not (run.parent / "e").exists()

    (run / "grow.yaml").write_text(text)
    tok = run / "tokenizer" / "tokenizer.json"
    data = json.loads(tok.read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok.write_text(json.dumps(data))
    assert main(["sample", str(run), "--length", "4"]) == 2
    assert "tokenizer/tokenizer.json was changed" in one_line(capsys.readouterr().err)


def test_edited_stage_manifest_is_invalid_with_a_reason(run, capsys):
    """issue 11 row 10: a manifest carries its own checksum (an edited heldout_ce is caught), and a
    manifest whose block disagrees with its directory is invalid with that reason, not 'None'."""
    path = run / "stage-02-block02" / "manifest.json"
    original = json.loads(path.read_text())
    edited = {**original, "heldout_ce": 0.5}
    path.write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "stage-02-block02" in out and "manifest was edited" in out and "--from-stage 2" in out
    assert main(["status", str(run), "--verify"]) == 1
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(run.parent / "e")]) == 2
    assert "manifest was edited" in one_line(capsys.readouterr().err)

    # Re-checksummed (as a careful forger would) but naming another block: still invalid, with the reason.
    write_manifest(path, {**original, "stage": {**original["stage"], "train": [3]}})
    assert main(["status", str(run), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "invalid: manifest says stage-02-block02 trained blocks [3]" in out and "None" not in out


# --------------------------------------------------------------------------- row 3: one writer


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from grow.lock import DirLock
with DirLock(sys.argv[1], "grow train"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(run, corpus, capsys, tmp_path):
    """issue 11 row 3: while one process writes a run (or an export), a second `train --resume`
    or `export --overwrite` into it fails with one line naming the holder's pid and host."""
    export = tmp_path / "export"
    export.mkdir()
    holders = []
    try:
        for target in (run, export):
            proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(target)],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "locked"
            holders.append(proc)
        before = snapshot(run)
        capsys.readouterr()
        assert main(["status", str(run)]) == 0
        assert f"being written now by grow train (pid {holders[0].pid}" in capsys.readouterr().out
        assert train(run, corpus, "--resume") == 2
        line = one_line(capsys.readouterr().err)
        assert f"pid {holders[0].pid}" in line and "is being written by grow train" in line
        assert main(["export", str(run), "--out", str(export), "--overwrite"]) == 2
        assert f"pid {holders[1].pid}" in one_line(capsys.readouterr().err)
        assert snapshot(run) == before
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
    # The holders died: their locks are stale and taken over at once.
    assert main(["status", str(run)]) == 0
    assert "being written now" not in capsys.readouterr().out  # a dead holder's record is not a writer
    assert train(run, corpus, "--resume") == 0
    assert main(["export", str(run), "--out", str(export), "--overwrite"]) == 0
    assert not list(run.parent.glob(".*.lock"))


def test_stale_lock_record_is_taken_over(run, corpus):
    """issue 11 row 3: a lock file left by a dead process (no flock held) does not block the run."""
    (run.parent / ".run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 12345,
                                                      "command": "grow train", "since": "then"}))
    assert train(run, corpus, "--resume") == 0
    assert not (run.parent / ".run.lock").exists()


# --------------------------------------------------------------------------- row 4: exports stay outside runs


def test_export_into_a_run_or_stage_is_refused(run, base, capsys, tmp_path):
    """issue 11 row 4: export --out that is a run, a stage or inside either is one line, and the
    stage stays committed."""
    before = snapshot(run)
    capsys.readouterr()
    for out in (run / "stage-03-block01", run / "stage-03-block01" / "x", run / "exports" / "m", base):
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2, out
        assert "a grow run; export to a directory outside every run" in one_line(capsys.readouterr().err)
    assert snapshot(run) == before
    assert main(["status", str(run), "--verify"]) == 0


# --------------------------------------------------------------------------- rows 5 and 8: advice


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_a_corrupt_middle_stage_is_named_with_its_repair(run, corpus, capsys, damage):
    """issue 11 row 5: status, sample, export and --resume all name the corrupt stage and the
    command that repairs it (--from-stage 2); following it completes the run."""
    stage = run / "stage-02-block02"
    shard = stage / "model.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-7] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (stage / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["status", str(run), "--verify"]) == 1
    out = capsys.readouterr().out
    repair = f"grow train {run / 'grow.yaml'} --out {run} --from-stage 2"
    assert "stage-02-block02 is" in out and f"next: {repair}" in out
    for argv in (["sample", str(run), "--length", "4"], ["export", str(run), "--out", str(run.parent / "e")],
                 ["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus)]):
        assert main(argv) == 2, argv
        line = one_line(capsys.readouterr().err)
        assert "stage-02-block02 is" in line and repair in line, argv
    assert main(["train", str(run / "grow.yaml"), "--out", str(run), "--from-stage", "2"]) == 0
    assert sorted(list_stages(run, verify=True)) == [1, 2, 3]


def test_repair_advice_carries_deepspeed_when_the_run_used_it(tmp_path, corpus):
    """issue 11 rows 5 and 8: the repair command of a DeepSpeed run names --deepspeed."""
    from grow.stages import repair_command

    cfg = tiny_config(corpus, extra=["train.deepspeed=ds_configs/cpu.json"])
    assert repair_command(tmp_path / "run", cfg, 2).endswith("--from-stage 2 --deepspeed ds_configs/cpu.json")


def preempt_at(run, corpus, stage: str, step: int, extra=()) -> int:
    """Train until the SIGTERM handler's flag is raised at ``step`` of ``stage``."""
    argv = ["train", "configs/tiny.yaml", "--out", str(run), *tiny_overrides(corpus, blocks=3),
            "--set", "train.checkpoint_every=2", *extra]
    return main_preempted_at(argv, stage, step)


def test_resume_with_the_other_engine_is_one_line(tmp_path, corpus, capsys):
    """issue 11 row 8: a checkpoint DeepSpeed wrote, resumed without --deepspeed, is a one-line
    error naming the flag (and a plain checkpoint resumed under DeepSpeed the reverse)."""
    from grow.cli.train import _check_resume
    from grow.curriculum import stage_specs

    run = tmp_path / "run"
    assert preempt_at(run, corpus, "stage-01-block03", 2) == 143
    ckpt = run / "checkpoints" / "stage-01-block03" / "step-00000002"
    cfg = tiny_config(corpus, blocks=3, extra=["train.deepspeed=ds_configs/cpu.json"])
    with pytest.raises(Exception, match="--deepspeed: .* was saved without DeepSpeed; resume without --deepspeed"):
        _check_resume(cfg, run, True, stage_specs(cfg), None)
    # The same checkpoint as DeepSpeed leaves it: its engine's directory instead of our files.
    (ckpt / "deepspeed").mkdir()
    (ckpt / "deepspeed" / "latest").write_text("state")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["deepspeed/latest"] = {"sha256": sha256_file(ckpt / "deepspeed" / "latest"), "bytes": 5}
    write_manifest(ckpt / "manifest.json", manifest)
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, corpus, "--resume", extra=["--set", "train.checkpoint_every=2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--deepspeed:" in line and "was saved under DeepSpeed; resume with --deepspeed" in line
    assert snapshot(run) == before  # refused before grow.yaml was rewritten (status still knows the engine)


# --------------------------------------------------------------------------- row 9: leftovers


def test_leftovers_are_listed_then_removed_and_resume_ends_like_an_uninterrupted_run(tmp_path, base, corpus,
                                                                                      capsys):
    """issue 11 row 9: after a kill inside stage 3, status lists the temp dirs of interrupted
    writes and stale checkpoints; the resume removes them and ends with the reference's files."""
    run = tmp_path / "run"
    assert preempt_at(run, corpus, "stage-03-block01", 2) == 143
    # What a kill -9 at other moments leaves: a half-written stage and checkpoint, a committed stage's checkpoint.
    (run / ".stage-03-block01.tmp-99999").mkdir()
    (run / ".stage-03-block01.tmp-99999" / "model.safetensors").write_bytes(b"half")
    (run / ".grow.yaml.tmp-99999").write_text("half")
    stale = run / "checkpoints" / "stage-01-block03" / "step-00000002"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"old")
    (run / "checkpoints" / "stage-03-block01" / ".step-00000004.tmp-99999").mkdir()
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "leftovers (removed when the run continues)" in out
    for name in (".stage-03-block01.tmp-99999", ".grow.yaml.tmp-99999", "checkpoints/stage-01-block03",
                 "checkpoints/stage-03-block01/.step-00000004.tmp-99999"):
        assert name in out, name
    assert train(run, corpus, "--resume", extra=["--set", "train.checkpoint_every=2"]) == 0
    assert file_set(run) == file_set(base)
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert "leftovers (" not in capsys.readouterr().out


# --------------------------------------------------------------------------- row 7: the disk fills up


def test_disk_full_during_a_stage_commit_is_one_line_and_resumable(tmp_path, corpus, capsys, monkeypatch):
    """issue 11 row 7: OSError(ENOSPC) at the stage writer: exit 1, one line naming the stage
    directory and what was kept, no half-written stage; --resume then completes."""
    import grow.store

    real = grow.store.save_torch_state_dict
    calls = []

    def full_disk(state, directory, **kwargs):
        calls.append(directory)
        if len(calls) == 2:  # stage 2: a partial shard, then the disk is full
            (Path(directory) / "model.safetensors").write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model.safetensors"))
        return real(state, directory, **kwargs)

    monkeypatch.setattr(grow.store, "save_torch_state_dict", full_disk)
    run = tmp_path / "run"
    assert train(run, corpus) == 1
    line = one_line(capsys.readouterr().err)
    assert "stage-02-block02 failed: No space left on device" in line and "--resume" in line
    assert "stages committed before it are intact" in line
    assert sorted(list_stages(run, verify=True)) == [1]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert train(run, corpus, "--resume") == 0
    assert sorted(list_stages(run, verify=True)) == [1, 2, 3]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, corpus, capsys, monkeypatch):
    """issue 11 row 7: safetensors' own ENOSPC error while a mid-stage checkpoint is written: exit 1,
    one line naming the checkpoint and the one kept, no temp directory; --resume continues from it."""
    import grow.checkpoint
    from safetensors import SafetensorError

    real = grow.checkpoint.save_file
    calls = []

    def full_disk(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(grow.checkpoint, "save_file", full_disk)
    run = tmp_path / "run"
    assert train(run, corpus, extra=["--set", "train.checkpoint_every=1"]) == 1
    line = one_line(capsys.readouterr().err)
    root = run / "checkpoints" / "stage-01-block03"
    assert f"writing the checkpoint {root / 'step-00000002'} failed: No space left on device;" in line
    assert "kept the checkpoints step-00000001 of stage-01-block03" in line and line.endswith("--resume")
    assert [p.name for p in root.iterdir()] == ["step-00000001"]
    monkeypatch.undo()
    assert train(run, corpus, "--resume", extra=["--set", "train.checkpoint_every=1"]) == 0
    assert "resuming at step 1/4" in capsys.readouterr().out
    assert sorted(list_stages(run, verify=True)) == [1, 2, 3]


def test_disk_full_during_an_export_is_one_line(run, tmp_path, capsys, monkeypatch):
    """issue 11 row 7: OSError(ENOSPC) while the export writes: exit 1, one line naming the
    export, nothing left at --out or beside it, the run untouched."""
    import transformers

    def full_disk(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "export"
    before = snapshot(run)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"writing the export {out} failed: No space left on device" in line and "untouched" in line
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    assert snapshot(run) == before


# --------------------------------------------------------------------------- rows 11-13, 15, 16: flags and output


def test_eval_json_to_a_directory_is_refused_before_any_work(base, tmp_path, capsys):
    """issue 11 row 11: --json (or --plot) naming a directory is refused up front, not after the eval."""
    for flag in ("--json", "--plot"):
        assert main(["eval", str(base), flag, str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        assert f"{flag}: {tmp_path} is a directory" in one_line(err) and out == ""


@pytest.mark.parametrize("argv, flag", [
    (["eval", "RUN", "--batch-size", "0"], "--batch-size"),
    (["eval", "RUN", "--batches", "0"], "--batches"),
    (["eval", "RUN", "--steps", "0"], "--steps"),
    (["sample", "RUN", "--steps", "0"], "--steps"),
    (["sample", "RUN", "--length", "0"], "--length"),
    (["sample", "RUN", "--top-p", "0"], "--top-p"),
    (["sample", "RUN", "--num-samples", "0"], "--num-samples"),
    (["train", "configs/tiny.yaml", "--out", "RUN", "--resume", "--stop-after", "0"], "--stop-after"),
])
def test_flags_out_of_bounds_are_one_line(base, capsys, argv, flag):
    """issue 11 row 12: flags are validated with bounds instead of being silently ignored."""
    argv = [str(base) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err).startswith(f"grow: error: {flag}:")


def test_num_samples_is_bounded(base, capsys):
    """issue 11 row 13: --num-samples 100000000 is refused at once instead of filling memory."""
    assert main(["sample", str(base), "--num-samples", "100000000", "--length", "8"]) == 2
    assert "--num-samples: expected at most 4,096" in one_line(capsys.readouterr().err)


def test_version_and_a_closed_pipe(base, capsys):
    """issue 11 row 15: `grow --version`; `grow status RUN | head -1` ends quietly (no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    import grow

    assert capsys.readouterr().out.strip() == f"grow {grow.__version__}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "grow", "status", str(base)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before grow writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_sampling_past_the_trained_length_warns(base, capsys):
    """issue 11 row 16: more tokens than data.seq_len (32) is a warning; within it is silent."""
    assert main(["sample", str(base), "--length", "40", "--mode", "iterative", "--steps", "4"]) == 0
    assert "more than the 32 the model was trained on (data.seq_len)" in capsys.readouterr().err
    assert main(["sample", str(base), "--length", "16", "--mode", "iterative", "--steps", "4"]) == 0
    assert "data.seq_len" not in capsys.readouterr().err


def test_permission_denied_anywhere_else_is_one_line(base, tmp_path, capsys, monkeypatch):
    """issue 11 row 7: an OS refusal outside the stage and export writers (here EACCES on eval's
    --json report) is still one line naming the path, exit 1, no traceback."""
    import grow.cli.sample_eval

    target = tmp_path / "report.json"

    def denied(path, text):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(grow.cli.sample_eval, "write_text_atomic", denied)
    assert main(["eval", str(base), "--levels", "--json", str(target)]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"Permission denied: {target}" in line and "intact" in line

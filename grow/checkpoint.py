"""Mid-stage checkpoints: everything needed to continue a stage bit-for-bit.

    RUN/checkpoints/stage-NN-LABEL/step-00000040/
        trainable.safetensors   the trained blocks (with their spectral-norm vectors), the
                                trainable adapters, the ends when the stage trains them
        optimizer.pt            optimizer state (plain engine; loaded with weights_only=True)
        | deepspeed/            DeepSpeed's own checkpoint (DeepSpeed engine)
        state.json              step, losses so far, LR scheduler, Python/NumPy/torch RNG
        manifest.json           sha256 of every file; written last, atomically

The data position needs no saving: the batch at step s is a pure function of (seed, stage, s)
(``grow.data.batch_positions``). What a stage rebuilds before loading a checkpoint -- the
frozen suffix, the fresh block's architecture -- comes from the stage store and the seed,
so a checkpoint only holds what training changed. A checkpoint without a valid manifest
is skipped, with a message, in favour of the previous one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from grow.store import (MANIFEST, STORAGE_ERRORS, StorageError, fsync_dir, sha256_file, stage_problem,
                        storage_reason, write_json_atomic, write_manifest)

FORMAT_VERSION = 2


class _PreemptFlag:
    """Set by the SIGTERM handler; the training loop checkpoints and stops at the next step."""

    requested = False


PREEMPT = _PreemptFlag()


def install_sigterm_handler() -> None:
    import signal

    def handler(signum, frame):
        PREEMPT.requested = True

    signal.signal(signal.SIGTERM, handler)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint was saved; the CLI exits with 143."""

    def __init__(self, path: Path, step: int) -> None:
        super().__init__(f"preempted: saved a checkpoint at step {step} in {path}")
        self.path = path
        self.step = step


def checkpoint_root(run: Path, stage_name: str) -> Path:
    return Path(run) / "checkpoints" / stage_name


def trained_tensors(model, blocks, *, master=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What a stage changes, on the CPU: every trainable parameter plus the buffers of the
    trained ``blocks`` (their spectral-norm vectors). ``master(param)`` supplies a parameter's
    value -- DeepSpeed's whole fp32 master copy -- instead of the module's own; ``dtype`` casts
    every tensor."""
    state = {name: master(p) if master else p for name, p in model.named_parameters() if p.requires_grad}
    for block in blocks:
        state.update({f"blocks.{block - 1}.{name}": b for name, b in model.block(block).named_buffers()})
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(root: Path, step: int, model, blocks, engine, losses: list[float], keep: int) -> Path:
    """Write step ``step`` of the stage checkpointed under ``root`` (which trains ``blocks``);
    keep the newest ``keep`` checkpoints."""
    final = root / f"step-{step:08d}"
    # One temp name per launch: rank 0's pid, so a second writer never shares a directory.
    tmp = root / f".step-{step:08d}.tmp-{_launch_id(engine)}"
    try:
        _write_checkpoint(tmp, final, root, step, model, blocks, engine, losses, keep)
    except STORAGE_ERRORS as exc:
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = sorted(p.name for p in root.glob("step-*"))
        run = root.parent.parent
        raise StorageError(f"writing the checkpoint {final} failed: {storage_reason(exc)}; kept "
                           + (f"the checkpoints {', '.join(kept)} of {root.name}" if kept else
                              "the committed stages (no earlier checkpoint of this stage)")
                           + f"; make room and continue with grow train {run / 'grow.yaml'} --out {run} --resume"
                           ) from None
    return final


def _write_checkpoint(tmp: Path, final: Path, root: Path, step: int, model, blocks, engine, losses, keep) -> None:
    if engine.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_state(tmp, model, blocks)
    if engine.is_main:
        write_json_atomic(tmp / "state.json", {
            "format_version": FORMAT_VERSION, "stage": root.name, "step": step, "losses": losses,
            "rng": rng_state(),
        })
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        write_manifest(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "stage": root.name, "step": step,
                                        "files": files})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    engine.barrier()


def checkpoint_engine(path: Path) -> str:
    """Which engine wrote a checkpoint: "deepspeed" (its own directory) or "plain"."""
    return "deepspeed" if (Path(path) / "deepspeed").is_dir() else "plain"


def latest_checkpoint(root: Path, log=print) -> Path | None:
    """The newest checkpoint of a stage whose files match its manifest; says why others are skipped."""
    for path in sorted(root.glob("step-*"), reverse=True):
        problem = stage_problem(path, verify=True)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def load_checkpoint(path: Path, model, blocks, engine) -> tuple[int, list[float]]:
    """Restore a checkpoint into a freshly prepared stage; returns (step, losses so far)."""
    state = json.loads((path / "state.json").read_text())
    if state["stage"] != path.parent.name:
        raise ValueError(f"checkpoint {path} belongs to {state['stage']}, not {path.parent.name}")
    engine.load_state(path, model, blocks)
    set_rng_state(state["rng"])
    return state["step"], state["losses"]


def load_trainable(path: Path, model, blocks, device) -> None:
    tensors = load_file(path / "trainable.safetensors", device=str(device))
    own = model.state_dict(keep_vars=True)
    missing = [k for k in tensors if k not in own]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the stage: unknown tensors {missing[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


def save_trainable(path: Path, model, blocks) -> None:
    save_file(trained_tensors(model, blocks), path / "trainable.safetensors", metadata={"format": "pt"})


def _launch_id(engine) -> int:
    """Rank 0's process id, the same on every rank of a launch."""
    import os

    pid = os.getpid()
    if getattr(engine, "world", 1) > 1:
        import torch.distributed as dist

        box = [pid]
        dist.broadcast_object_list(box, src=0)
        pid = box[0]
    return pid

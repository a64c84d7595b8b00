"""The stage store: one directory per stage, in run order, committed by a manifest written last.

    RUN/
      grow.yaml               resolved config of the run (informational; manifests are authoritative)
      tokenizer/              the run's tokenizer (transformers format)
      stage-01-block06/       what stage 1 trained: block 6 (+ embeddings, final norm, head)
        model.safetensors | model-0000i-of-0000n.safetensors
        model.safetensors.index.json
        adapter_config.json, adapter_model.safetensors   every frozen block's LoRA adapter (peft)
        tokenizer.json, tokenizer_config.json, ...
        manifest.json         written last; its sha256 list is what makes the stage real
      stage-02-block05/ ...

A stage directory is named ``stage-NN-LABEL``: NN its position in the run (``StageSpec.index``),
LABEL what it trained (``block05``, ``joint``, ``whole``). It stores exactly the tensors the stage
trained, so the current weights of a block are in the latest stage that trained it
(``grow.assemble.RunState``).

A stage is written into a hidden temporary sibling, the manifest is written last there
(temp file, fsync, rename), and only then is the directory renamed into place, so a crash
leaves either nothing or a complete stage. A directory without a valid manifest, or whose
files do not match the manifest's hashes, does not exist as far as ``grow`` is concerned.
Weights are stored under EuroBertForMaskedLM's key names, folded (no spectral-norm or gain
parametrization), in full precision: every later 4-bit copy is rebuilt from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from grow.errors import UserError

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 2  # 2: stages named by run order (stage-NN-LABEL), spec in the manifest


STAGE_NAME = re.compile(r"stage-(\d{2,})-([a-z0-9]+)")


def stage_dir(run: Path, name: str) -> Path:
    """``RUN/stage-NN-LABEL`` for a stage named by ``StageSpec.name``."""
    return Path(run) / name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` via a temp file, fsync and rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: str) -> None:
    """Sharded safetensors via huggingface_hub, always with an index json (also for one shard)."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})
    index = directory / INDEX
    if not index.exists():  # huggingface_hub writes an index only when it had to shard
        total = sum(v.numel() * v.element_size() for v in state.values())
        write_json_atomic(
            index, {"metadata": {"total_size": total}, "weight_map": {k: "model.safetensors" for k in state}}
        )


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a stage (or export) directory, through its index; safetensors only."""
    index = json.loads((directory / INDEX).read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(directory / shard))
    return state


@dataclass
class Stage:
    """A committed stage as read back from disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def index(self) -> int:
        return self.manifest["stage"]["index"]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec(self) -> dict[str, Any]:
        """The ``StageSpec`` (as a dict) this stage ran."""
        return self.manifest["stage"]

    def weights(self) -> dict[str, torch.Tensor]:
        return load_weights(self.path)

    def size_bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.manifest["files"].values())


def write_stage(
    run: Path,
    spec: dict[str, Any],
    weights: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    *,
    max_shard_size: str,
    tokenizer=None,
    extra_writers=(),
) -> Stage:
    """Commit a stage: weights, tokenizer, extra files, then the manifest, then the rename.

    ``spec`` is the ``StageSpec`` as a dict (it names the directory). ``extra_writers`` are
    callables ``f(directory)`` that add files (e.g. adapters); every file they write is hashed
    into the manifest like the weights.
    """
    final = stage_dir(run, f"stage-{spec['index']:02d}-{spec['label']}")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp, max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for writer in extra_writers:
        writer(tmp)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(tmp))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "stage": spec, **manifest, "files": files,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():
        # Only reachable when re-running this stage (--from-stage / --overwrite): keep the old one.
        final.rename(final.with_name(f"{final.name}.replaced-{int(time.time())}"))
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return Stage(final, manifest)


def read_stage(path: Path, verify: bool = True) -> Stage | None:
    """The stage at ``path``, or None when it has no manifest or (with verify) a file fails its hash."""
    problem = stage_problem(path, verify)
    if problem is not None:
        return None
    return Stage(path, json.loads((path / MANIFEST).read_text()))


def stage_problem(path: Path, verify: bool = True) -> str | None:
    """Why ``path`` is not a usable stage, or None when it is."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest is not valid JSON"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"manifest format_version {manifest.get('format_version')} is not {FORMAT_VERSION}"
    named = STAGE_NAME.fullmatch(path.name)
    spec = manifest.get("stage")
    if named and (not isinstance(spec, dict) or (spec.get("index"), spec.get("label")) != (int(named[1]), named[2])):
        return f"manifest describes {_stage_name(spec)}, not {path.name}"
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']}"
        if verify and sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _stage_name(spec: Any) -> str:
    if isinstance(spec, dict) and isinstance(spec.get("index"), int):
        return f"stage-{spec['index']:02d}-{spec.get('label')}"
    return "no stage"


def stage_paths(run: Path) -> list[Path]:
    """Every ``stage-NN-LABEL`` directory of a run, in run order (valid or not)."""
    paths = [p for p in Path(run).iterdir() if p.is_dir() and STAGE_NAME.fullmatch(p.name)] if Path(run).is_dir() else []
    return sorted(paths, key=lambda p: (int(STAGE_NAME.fullmatch(p.name)[1]), p.name))


def list_stages(run: Path, verify: bool = False) -> dict[int, Stage]:
    """Committed stages of a run by index (hash-checked when ``verify``)."""
    stages = {}
    for path in stage_paths(run):
        stage = read_stage(path, verify)
        if stage is not None:
            stages[stage.index] = stage
    return stages


def require_run(run: Path) -> Path:
    run = Path(run)
    if not (run / "grow.yaml").is_file():
        raise UserError(f"RUN: {run} is not a grow run directory (no grow.yaml)")
    return run

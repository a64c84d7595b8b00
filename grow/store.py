"""The stage store: one directory per stage, in run order, committed by a manifest written last.

    RUN/
      grow.yaml               resolved config of the run
      tokenizer/              the run's tokenizer (transformers format)
      run.json                sha256 of grow.yaml and of every tokenizer file (rewritten with them)
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

Every manifest (stage, checkpoint, ``run.json``) carries the sha256 of its own content, so an
edited figure (a held-out CE, a block list) is as invalid as a flipped weight. Write failures of
the operating system (disk full, permission denied, read-only file system) become a
``StorageError``: one line naming the path and what is still intact.
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
RUN_MANIFEST = "run.json"
CHECKSUM = "checksum"
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


def manifest_checksum(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content without its own checksum field (canonical JSON)."""
    body = {k: v for k, v in data.items() if k != CHECKSUM}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Write a manifest atomically with its own checksum; returns what was written."""
    data = {**{k: v for k, v in data.items() if k != CHECKSUM}, CHECKSUM: manifest_checksum(data)}
    write_json_atomic(path, data)
    return data


def manifest_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "manifest is not a JSON object"
    if CHECKSUM not in data:
        return "manifest has no checksum (edited, or written by an older grow)"
    if data[CHECKSUM] != manifest_checksum(data):
        return "manifest was edited after it was written (its checksum does not match its content)"
    return None


class StorageError(Exception):
    """The operating system refused a write (disk full, permission, read-only): one line, exit 1."""


STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # safetensors reports its own I/O failures (e.g. ENOSPC) as SafetensorError
    from safetensors import SafetensorError

    STORAGE_ERRORS += (SafetensorError,)
except ImportError:  # older safetensors: its I/O errors are OSErrors
    pass


def storage_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # safetensors wraps the OS's words: 'IoError(Os { code: 28, ..., message: "No space left on device" })'
    found = re.search(r'message: "([^"]+)"', text)
    return found[1] if found else text


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
    try:
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
        manifest = write_manifest(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION, "stage": spec, **manifest, "files": files,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if final.exists():
            # Only reachable when re-running this stage (--from-stage / --overwrite): keep the old one.
            final.rename(final.with_name(f"{final.name}.replaced-{int(time.time())}"))
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except STORAGE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise StorageError(f"writing {final} failed: {storage_reason(exc)}; nothing of {final.name} was kept, "
                           f"the stages committed before it are intact") from None
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
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest is not valid JSON"
    problem = manifest_problem(manifest)
    if problem is not None:
        return problem
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"manifest format_version {manifest.get('format_version')} is not {FORMAT_VERSION}"
    named = STAGE_NAME.fullmatch(path.name)
    spec = manifest.get("stage")
    if named and (not isinstance(spec, dict) or (spec.get("index"), spec.get("label")) != (int(named[1]), named[2])):
        return f"manifest describes {_stage_name(spec)}, not {path.name}"
    if named and not _label_fits(spec):
        return f"manifest says {path.name} trained blocks {spec.get('train')}, which its label does not name"
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']}"
        if verify and sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _label_fits(spec: dict[str, Any]) -> bool:
    """A ``blockNN`` label names the one block its stage trained."""
    label = str(spec.get("label"))
    if re.fullmatch(r"block\d+", label):
        return spec.get("train") == [int(label[5:])]
    return True


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


# --------------------------------------------------------------------------- the run's own files


def run_files(run: Path) -> list[Path]:
    """The files a run is rebuilt from besides its stages: grow.yaml and the tokenizer."""
    run = Path(run)
    files = [run / "grow.yaml"]
    if (run / "tokenizer").is_dir():
        files += sorted(p for p in (run / "tokenizer").rglob("*") if p.is_file())
    return files


def write_run_manifest(run: Path) -> None:
    """Hash grow.yaml and the tokenizer into RUN/run.json (after either was (re)written)."""
    run = Path(run)
    files = {str(p.relative_to(run)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in run_files(run)}
    write_manifest(run / RUN_MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def write_run_config(run: Path, text: str) -> None:
    """Rewrite RUN/grow.yaml and its hash so that a crash at any moment leaves a consistent pair:
    run.json first accepts the old and the new content, then grow.yaml changes, then run.json
    is rewritten for the new content alone."""
    run = Path(run)
    path = run / "grow.yaml"
    if path.is_file() and path.read_text() == text and run_problem(run) is None:
        return
    manifest_path = run / RUN_MANIFEST
    if path.is_file() and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        entry = manifest.get("files", {}).get("grow.yaml")
        if manifest_problem(manifest) is None and entry is not None:
            data = text.encode()
            manifest["files"]["grow.yaml"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                              "previous": {"sha256": entry["sha256"], "bytes": entry["bytes"]}}
            write_manifest(manifest_path, manifest)
    write_text_atomic(path, text)
    write_run_manifest(run)


def _matches(file: Path, entry: dict[str, Any]) -> bool:
    return file.stat().st_size == entry["bytes"] and sha256_file(file) == entry["sha256"]


def run_problem(run: Path) -> str | None:
    """Why grow.yaml or the tokenizer of ``run`` cannot be trusted (None when they match run.json).

    A run without run.json (written before grow hashed these files) is reported as such.
    """
    run = Path(run)
    path = run / RUN_MANIFEST
    if not path.is_file():
        return f"{RUN_MANIFEST} is missing: grow.yaml and tokenizer/ are not covered by a hash"
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{RUN_MANIFEST} is not valid JSON"
    problem = manifest_problem(manifest)
    if problem is not None:
        return f"{RUN_MANIFEST}: {problem}"
    listed = manifest.get("files", {})
    for name, entry in listed.items():
        file = run / name
        if not file.is_file():
            return f"{name} is missing"
        if not (_matches(file, entry) or ("previous" in entry and _matches(file, entry["previous"]))):
            return f"{name} was changed after grow wrote it (its sha256 does not match {RUN_MANIFEST})"
    extra = [str(p.relative_to(run)) for p in run_files(run) if str(p.relative_to(run)) not in listed]
    if extra:
        return f"{extra[0]} was added after grow wrote the run (not in {RUN_MANIFEST})"
    return None


def check_run_files(run: Path, log=None) -> None:
    """Refuse (one line) a run whose grow.yaml or tokenizer differs from the hashed copy; a run
    from before run.json only gets a warning through ``log``."""
    problem = run_problem(run)
    if problem is None:
        return
    if not (Path(run) / RUN_MANIFEST).is_file():
        if log is not None:
            log(f"warning: {run}: {problem}")
        return
    raise UserError(f"RUN: {run}: {problem}; restore it (each stage's manifest.json holds the config and its "
                    "directory the tokenizer that stage ran with)")


# --------------------------------------------------------------------------- leftovers


def leftovers(run: Path) -> list[tuple[Path, str]]:
    """Files an interrupted command left in ``run`` that no committed state refers to:
    temp directories of a stage commit or a checkpoint, checkpoints of committed stages."""
    run = Path(run)
    found: list[tuple[Path, str]] = []
    if not run.is_dir():
        return found
    for path in sorted(run.iterdir()):
        if ".tmp-" in path.name:
            found.append((path, "an interrupted write"))
    committed = {s.name for s in list_stages(run).values()}
    root = run / "checkpoints"
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name in committed:
                found.append((path, "checkpoints of a committed stage"))
            elif path.is_dir():
                found += [(p, "an interrupted checkpoint") for p in sorted(path.glob(".step-*.tmp-*"))]
    return found


def remove_leftovers(run: Path, log=None) -> None:
    """Remove ``leftovers(run)``; only called by the holder of the run's lock."""
    for path, why in leftovers(run):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if log is not None:
            log(f"removed {path.relative_to(run)} ({why})")

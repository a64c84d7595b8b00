"""A prepared corpus on disk: packed token rows in ``.npy`` shards, its tokenizer, a manifest last.

    DIR/
      train-00000.npy ...    (rows, seq_len) uint16 (vocabulary <= 65,536) or uint32, C order
      heldout-00000.npy      the held-out documents, packed the same way
      tokenizer/             the tokenizer the ids come from (transformers format)
      manifest.json          written last, atomically: counts, dtype, seq_len, tokenizer hash,
                             source, split settings, and the sha256 and size of every file

The shards are plain NumPy arrays: ``np.load(path, mmap_mode="r")`` maps one, as grow does.
A directory is a prepared corpus only once its manifest is there; it is written into a
hidden temporary sibling and renamed into place, like a stage, so an interrupted prepare
leaves nothing that a later run would read.

Checking: every open compares each file's size with the manifest (a truncated shard is
caught at once). A full sha256 of every file is taken when the corpus is prepared, by
``grow data inspect --verify``, and on the first use of the directory on a machine; a stamp
in GROW_CACHE_DIR/verified then records each file's (size, mtime, ctime, inode), and later
opens re-hash only when one of them changed. Writing a file changes its ctime, which no
user-level call can set back, so a modified shard is always re-hashed before it is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from grow.data.cache import stamp_path
from grow.errors import UserError
from grow.store import fsync_dir, sha256_file, write_json_atomic

FORMAT = "grow-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- packing


def pack(docs: list[np.ndarray], sep: int | None, seq_len: int) -> np.ndarray:
    """Concatenate token arrays, each followed by ``sep``, into ``(n, seq_len)`` int64 rows.

    The tail shorter than one row is dropped rather than padded: padding would put tokens
    into the loss that the model never sees at sampling time. ``RowPacker`` does the same
    incrementally.
    """
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64)
    if sep is not None:
        flat = np.insert(flat, np.cumsum(lengths), sep)
    rows = len(flat) // seq_len
    return flat[: rows * seq_len].reshape(rows, seq_len)


class RowPacker:
    """``pack`` over a stream of document batches: the rows complete so far, the rest carried."""

    def __init__(self, seq_len: int, sep: int | None, dtype: np.dtype):
        self.seq_len, self.sep, self.dtype = seq_len, sep, dtype
        self.carry = np.zeros(0, dtype)
        self.documents = self.tokens = 0  # tokens include one separator per document

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append documents (their ids concatenated, and their lengths); return complete rows."""
        flat = flat.astype(self.dtype, copy=False)
        if self.sep is not None:
            flat = np.insert(flat, np.cumsum(lengths), self.sep)
        self.documents += len(lengths)
        self.tokens += len(flat)
        flat = np.concatenate([self.carry, flat])
        rows = len(flat) // self.seq_len
        self.carry = flat[rows * self.seq_len :].copy()
        return flat[: rows * self.seq_len].reshape(rows, self.seq_len)


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Append rows to ``{split}-00000.npy``, ``-00001`` ... of at most ``shard_rows`` rows each.

    A shard is a ``.npy`` file whose header is written first for 0 rows and rewritten for
    the final count when it closes: NumPy pads the header so the first axis can grow in place.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, seq_len: int, shard_rows: int):
        self.directory, self.split, self.dtype, self.seq_len = Path(directory), split, np.dtype(dtype), seq_len
        self.shard_rows = max(1, shard_rows)
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._rows = 0

    def write(self, rows: np.ndarray) -> None:
        while len(rows):
            if self._file is None:
                self._open()
            take = min(len(rows), self.shard_rows - self._rows)
            self._file.write(np.ascontiguousarray(rows[:take], dtype=self.dtype).tobytes())
            self._rows += take
            rows = rows[take:]
            if self._rows == self.shard_rows:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; the shards as ``[{"file": name, "rows": n}, ...]``."""
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Close the open shard as it is (its directory is about to be deleted)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards) + self._rows

    def _header(self, rows: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": (rows, self.seq_len)}
        )
        return buffer.getvalue()

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}.npy"
        self._file = open(self.directory / self._name, "wb")
        self._header_len = len(self._header(0))
        self._file.write(self._header(0))
        self._rows = 0

    def _close(self) -> None:
        header = self._header(self._rows)
        if len(header) != self._header_len:  # NumPy reserves room for 21 digits; never expected
            raise RuntimeError(f"{self._name}: .npy header changed size")
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards.append({"file": self._name, "rows": self._rows})
        self._file, self._rows = None, 0


def temp_dir_for(out: Path) -> Path:
    """A hidden sibling of ``out`` owned by this process; stale ones of dead processes go."""
    out = Path(out)
    host = socket.gethostname()
    prefix = f".{out.name}.tmp-{host}-"
    if out.parent.is_dir():
        for old in out.parent.glob(f"{prefix}*"):
            pid = old.name[len(prefix):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    tmp = out.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(tmp: Path, out: Path, manifest: dict[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
    """Hash every file of ``tmp``, write its manifest last, rename it to ``out``; the manifest.

    If ``out`` appeared meanwhile (another process prepared the same cache entry), that
    one is kept and ``tmp`` discarded. With ``overwrite`` an existing ``out`` is replaced
    only once the new one is complete.
    """
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(tmp))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(tmp / MANIFEST, manifest)
    old = None
    if overwrite and out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(old)
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # someone else committed the same corpus first
        return read_manifest(out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    write_stamp(out)  # every file was just hashed
    return manifest


# --------------------------------------------------------------------------- reading


def is_prepared(path: Path) -> bool:
    """Whether ``path`` is (or was meant to be) a prepared corpus: a directory with our
    manifest, or with token shards but no manifest (an interrupted copy)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    if (path / MANIFEST).is_file():
        try:
            return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
    return any(path.glob("train-*.npy"))


def read_manifest(directory: Path, field: str = "data.source") -> dict[str, Any]:
    """The manifest of a prepared directory; a UserError naming ``field`` if there is none."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{field}: {directory} has no {MANIFEST} (an interrupted grow data prepare?); prepare it again")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{field}: {path} is not valid JSON") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{field}: {directory} is not a prepared corpus of format {FORMAT} "
                        f"version {FORMAT_VERSION} (manifest says {manifest.get('format')} "
                        f"{manifest.get('format_version')})")
    return manifest


def problem(directory: Path, manifest: dict[str, Any], hashes: bool) -> str | None:
    """Why the files of ``directory`` do not match ``manifest`` (sizes; with ``hashes`` also
    sha256), or None when they match."""
    for name, entry in manifest["files"].items():
        file = Path(directory) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
    if hashes:
        for name, entry in manifest["files"].items():
            if sha256_file(Path(directory) / name) != entry["sha256"]:
                return f"{name} does not match its sha256 in the manifest (modified or corrupt)"
    return None


def verify(directory: Path, manifest: dict[str, Any], *, full: bool = False, field: str = "data.source") -> str:
    """Check ``directory`` against its manifest or raise a UserError naming ``field``.

    Sizes always; sha256 of every file when ``full``, or when no stamp shows that these very
    files were hashed before. Returns "hashed" or "unchanged since hashed".
    """
    hashes = full or not stamp_matches(directory)
    found = problem(directory, manifest, hashes)
    if found is not None:
        raise UserError(f"{field}: {directory}: {found}; nothing was trained on it: prepare it again")
    if hashes:
        write_stamp(directory)
        return "hashed"
    return "unchanged since hashed"


def _manifest_sha(directory: Path) -> str:
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def _stats(directory: Path, names) -> dict[str, list[int]]:
    out = {}
    for name in sorted(names):
        st = (Path(directory) / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def write_stamp(directory: Path) -> None:
    """Record that every file of ``directory`` was hashed as it is now (best effort: without
    a writable cache the next start simply hashes again)."""
    manifest = read_manifest(directory)
    path = stamp_path(directory, _manifest_sha(directory))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"directory": str(Path(directory).resolve()),
                                 "files": _stats(directory, manifest["files"]),
                                 "hashed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError:
        pass


def stamp_matches(directory: Path) -> bool:
    """Whether a stamp shows every file of ``directory`` unchanged since it was last hashed."""
    try:
        manifest = read_manifest(directory)
        stamp = json.loads(stamp_path(directory, _manifest_sha(directory)).read_text())
        return stamp["files"] == _stats(directory, manifest["files"])
    except (OSError, ValueError, KeyError, UserError):
        return False


def stamp_time(directory: Path) -> str | None:
    """When the files of ``directory`` were last hashed on this machine, if they are unchanged."""
    if not stamp_matches(directory):
        return None
    return json.loads(stamp_path(directory, _manifest_sha(directory)).read_text()).get("hashed_at")

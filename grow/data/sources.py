"""Where documents come from: a local file or directory, a saved dataset, a hub dataset, the bible.

Every source is read through Hugging Face ``datasets``: ``.txt`` (one document per line),
``.jsonl``/``.json`` and ``.parquet`` (one document per row, from ``data.text_field``), a
directory written by ``save_to_disk``, a directory of data files, or a hub dataset name. With
``data.streaming`` the source is read lazily (``streaming=True``): nothing is downloaded or
converted whole, and ``data.max_documents`` stops the stream early.

A broken input is reported in one line that names the file and, where it can be found, the
line and the encoding -- not datasets' "An error occurred while generating the dataset".
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow.compute as pc

from grow.config import DataConfig
from grow.errors import UserError

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Extensions that mark a name as a file, so a mistyped or unsupported file is reported as
# such instead of being sent to the hub as a dataset id.
_FILE_LIKE = {".csv", ".tsv", ".gz", ".zst", ".xz", ".bz2", ".zip", ".tar", ".arrow", ".md", ".bin", ".npy",
              ".text", ".xml", ".html", ".pdf", ".doc", ".docx"}
BATCH = 1000  # documents per batch read from a source


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id ("org/name")."""
    return (
        name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


@dataclass
class Documents:
    """The non-empty documents of a source, in source order.

    ``dataset`` is map-style (length known, ``max_documents`` applied) or, when streaming,
    an ``IterableDataset`` that ``batches`` filters and cuts lazily. ``missing`` counts the
    rows without text (no ``text_field``, or null); for a stream it grows as it is read.
    """

    source: str
    dataset: datasets.Dataset | datasets.IterableDataset
    field: str
    max_documents: int | None = None
    path: Path | None = None
    missing: int = 0
    first_missing: str | None = None

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streamed source has no length until it is read")
        return len(self.dataset)

    def batches(self, dataset: datasets.Dataset | None = None) -> Iterator[list[str]]:
        """Batches of document texts: of ``dataset`` (a split of a map-style source) or of the stream."""
        if dataset is not None:
            for batch in dataset.iter(batch_size=BATCH):
                yield batch[self.field]
            return
        if not self.streaming:
            yield from self.batches(self.dataset)
            return
        self.missing, self.first_missing = 0, None
        kept, batch, row = 0, [], 0
        examples = iter(self.dataset)
        while self.max_documents is None or kept < self.max_documents:
            with explained(self):  # a stream reads (and fails) as it goes
                example = next(examples, None)
            if example is None:
                break
            row += 1
            if row == 1 and self.field not in example:
                raise UserError(f"data.text_field: no column {self.field!r} in {self.source!r}; "
                                f"columns: {', '.join(example)}")
            text = example.get(self.field)
            if text is None:
                self.missing += 1
                self.first_missing = self.first_missing or _locate_row(self.path, row - 1)
                continue
            if not (isinstance(text, str) and text.strip()):
                continue
            batch.append(text)
            kept += 1
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def read_documents(cfg: DataConfig) -> Documents:
    """Open ``cfg.source``: map-style with empty documents removed and ``max_documents`` taken,
    or (``cfg.streaming``) a stream that is filtered as it is read."""
    # the bible is small and local, so datasets' progress bars would only be noise; user
    # corpora can be large enough that they matter
    with _quiet() if cfg.source == "bible" else contextlib.nullcontext():
        return _read_documents(cfg)


def _read_documents(cfg: DataConfig) -> Documents:
    ds, path = _open(cfg)
    field = "text" if cfg.source == "bible" or (path and path.suffix.lower() == ".txt") else cfg.text_field
    docs = Documents(cfg.source, ds, field, cfg.max_documents, path)
    if docs.streaming:
        return docs
    if field not in ds.column_names:
        raise UserError(
            f"data.text_field: no column {field!r} in {cfg.source!r}; columns: {', '.join(ds.column_names)}"
        )
    ds = ds.select_columns([field])
    column = ds.data.column(field)
    if column.null_count:
        docs.missing = column.null_count
        docs.first_missing = _locate_row(path, pc.index(pc.is_null(column), True).as_py())
    ds = ds.filter(_non_empty, input_columns=field, batched=True)
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    docs.dataset = ds
    return docs


def source_identity(cfg: DataConfig) -> dict:
    """What names the source's content, cheaply (no read): the key of a prepared cache entry.

    A local file is its resolved path, size and modification time; a directory the same of
    every file in it; a hub dataset its name (pin a revision by preparing it explicitly).
    """
    if cfg.source == "bible":
        from grow.data.bible import bible_version

        return {"kind": "bible", "version": bible_version()}
    path = _local_path(cfg.source)
    if path is None:
        return {"kind": "hub", "name": cfg.source}
    if path.is_file():
        stat = path.stat()
        return {"kind": "file", "path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"kind": "dir", "path": str(path.resolve()),
            "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _non_empty(texts: list) -> list[bool]:
    return [isinstance(t, str) and bool(t.strip()) for t in texts]


def _local_path(source: str) -> Path | None:
    """The local path ``source`` names, or None for a hub dataset id; a missing or unreadable
    local path is an error here, before datasets would try the hub with it."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if not (looks_local(source) or suffix in LOADERS or suffix in _FILE_LIKE):
        return None
    if not path.exists():
        raise UserError(f"data.source: no such file or directory: {source}")
    if path.is_file() and suffix not in LOADERS:
        raise UserError(
            f"data.source: {source} has an unknown extension {suffix or '(none)'!r}; expected a .txt, .jsonl, "
            ".json or .parquet file, a directory, or a hub dataset name"
        )
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"data.source: {source} is empty")
    return path


def _open(cfg: DataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, Path | None]:
    # datasets reads HF_DATASETS_CACHE once at import; honour it at call time instead
    cache = os.environ.get("HF_DATASETS_CACHE")
    stream = {"streaming": True} if cfg.streaming else {}
    if cfg.source == "bible":
        from grow.data.bible import bible_file

        path = bible_file()
        return datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=cache, **stream), path
    path = _local_path(cfg.source)
    with explained(Documents(cfg.source, None, cfg.text_field, path=path)):
        if path is None:
            return datasets.load_dataset(cfg.source, split=cfg.hub_split, cache_dir=cache, **stream), None
        if path.is_file():
            loader = LOADERS[path.suffix.lower()]
            return datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache, **stream), path
        if any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            ds = ds[cfg.hub_split] if isinstance(ds, datasets.DatasetDict) else ds
            return (ds.to_iterable_dataset() if cfg.streaming else ds), path
        return datasets.load_dataset(str(path), split=cfg.hub_split, cache_dir=cache, **stream), path


@contextlib.contextmanager
def _quiet():
    """Hide datasets' progress bars, restoring the caller's setting afterwards."""
    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def explained(docs: Documents):
    """Turn what datasets raises while reading ``docs`` into one UserError line with the
    file, line and encoding where they can be found; silence datasets' own error log."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # it logs "Failed to load JSON ..." before raising
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many types; the user needs the one-line reason
        raise UserError(_explain(docs, exc)) from None
    finally:
        logger.setLevel(level)


def _explain(docs: Documents, exc: BaseException) -> str:
    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    path = docs.path
    if path is not None and path.is_file():
        if any(isinstance(e, UnicodeDecodeError) for e in chain):
            found = first_bad_utf8(path)
            if found is not None:
                line, offset, byte, binary = found
                kind = " (a binary file?)" if binary else ""
                return (f"data.source: {path}: line {line} is not valid UTF-8{kind}: byte 0x{byte:02x} at offset "
                        f"{offset}; grow reads text as UTF-8, so convert it first (e.g. iconv -f latin1 -t utf-8)")
        if path.suffix.lower() in (".jsonl", ".json"):
            found = first_bad_json_line(path)
            if found is not None:
                return f"data.source: {path}: line {found[0]} is not valid JSON: {found[1]}"
    useful = next((e for e in chain if type(e).__name__ != "DatasetGenerationError"), exc)
    return f"data.source: could not load {docs.source!r}: {reason(useful)}"


def first_bad_utf8(path: Path, chunk: int = 1 << 20) -> tuple[int, int, int, bool] | None:
    """(line, byte offset, byte value, looks binary) of the first invalid UTF-8 byte, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, binary = 1, 0, None
    with open(path, "rb") as f:
        while block := f.read(chunk):
            binary = b"\x00" in block[:8192] if binary is None else binary
            pending = len(decoder.getstate()[0])  # bytes of a character split over two blocks
            try:
                decoder.decode(block, final=len(block) < chunk)
            except UnicodeDecodeError as err:
                # the error indexes the pending bytes followed by this block
                start = max(0, err.start - pending)
                return line + block[:start].count(b"\n"), offset + start, err.object[err.start], binary
            line += block.count(b"\n")
            offset += len(block)
    return None


def first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line, reason) of the first non-blank line that is not a JSON object, or None."""
    with open(path, "rb") as f:
        first = f.read(4096).lstrip()
    if first.startswith(b"["):  # one JSON array, not JSON Lines
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            return err.lineno, f"{err.msg} (column {err.colno})"
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return n, f"{err.msg} (column {err.colno})"
            if not isinstance(value, dict):
                return n, f"expected an object, got {type(value).__name__}"
    return None


def _locate_row(path: Path | None, index: int) -> str:
    """'line N' of row ``index`` (0-based) of a JSON Lines file, else 'row N'."""
    if path is not None and path.suffix.lower() == ".jsonl":
        seen = -1
        with open(path, "rb") as f:
            for n, text in enumerate(f, start=1):
                if text.strip():
                    seen += 1
                    if seen == index:
                        return f"line {n}"
    return f"row {index + 1}"

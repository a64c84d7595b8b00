"""Prepare a corpus: documents in, packed token rows in memory-mappable shards out.

The pipeline, in the order it runs:

1. read the source's documents (``sources``);
2. split them into train and held out *by document*, before anything else, so no held-out
   text reaches a training row and a trained tokenizer sees only training text. A
   map-style source gets ``datasets``' ``train_test_split`` (a seeded permutation, the split
   grow has always made); a stream, whose length is unknown, holds out a document when a
   seeded hash of its position falls below ``heldout_fraction``. Either way at most
   ``heldout_max_documents`` are held out;
3. fit the tokenizer on the training documents (``data.tokenizer: train``) or load it;
4. tokenize batches of documents, in ``num_proc`` worker processes for a large source;
5. pack each split into rows of ``seq_len`` (documents joined by the separator, the tail
   dropped) and append them to ``.npy`` shards; hash everything, write the manifest last.

Memory stays at a few batches whatever the size of the corpus.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from grow.config import DataConfig
from grow.data.shards import SPLITS, RowPacker, ShardWriter, commit, temp_dir_for, token_dtype
from grow.data.sources import Documents, read_documents, source_identity
from grow.data.tokenizer import encode, load_tokenizer, separator_id, tokenizer_hash, train_tokenizer
from grow.errors import UserError

SHARD_BYTES = 512 * 2**20
# Below this many documents, starting worker processes costs more than it saves.
POOL_MIN_DOCUMENTS = 10_000


def prepare_corpus(
    cfg: DataConfig,
    out: Path,
    *,
    seed: int = 0,
    tokenizer=None,
    num_proc: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prepare ``cfg.source`` into the directory ``out``; returns its manifest.

    ``tokenizer`` (an already loaded one, e.g. a run's own) overrides ``cfg.tokenizer``.
    ``seed`` chooses the held-out documents. Nothing appears at ``out`` unless every shard
    and the manifest were written.
    """
    start = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out: {out} exists and is not empty; pass --overwrite to replace it")
    origin = "given" if tokenizer is not None else "trained" if cfg.tokenizer == "train" else cfg.tokenizer
    if tokenizer is None and cfg.tokenizer != "train":
        tokenizer = load_tokenizer(cfg.tokenizer)  # before any reading: a bad path fails at once
    docs = read_documents(cfg)
    split = _Split(docs, cfg, seed)
    if tokenizer is None:
        tokenizer = train_tokenizer(split.train_texts(), cfg.vocab_size, length=split.train_length)
    procs = _processes(cfg, docs, num_proc)
    with CorpusWriter(out, tokenizer, cfg.seq_len, shard_bytes=shard_bytes, overwrite=overwrite) as writer:
        with tqdm(total=None if docs.streaming else len(docs), unit=" docs", desc="prepare", disable=None,
                  file=sys.stderr, leave=False) as bar:
            for part, flat, lengths in _encoded(split.tagged(), writer.tokenizer, procs):
                writer.add(part, flat, lengths)
                bar.update(len(lengths))
        tokens = {s: writer.packers[s].tokens for s in SPLITS}
        if not writer.rows("train") or not writer.rows("heldout"):
            raise UserError(
                f"data.source: {cfg.source!r} has too little text: {tokens['train']} train and {tokens['heldout']} "
                f"held-out tokens, but each needs one sequence of data.seq_len={cfg.seq_len}"
            )
        return writer.commit({
            "source": {
                "name": cfg.source, "identity": source_identity(cfg), "text_field": docs.field,
                "hub_split": cfg.hub_split, "streaming": docs.streaming, "max_documents": cfg.max_documents,
                "rows_without_text": docs.missing, "first_without_text": docs.first_missing,
            },
            "split": {"seed": seed, "method": "hash" if docs.streaming else "permutation",
                      "heldout_fraction": cfg.heldout_fraction, "heldout_max_documents": cfg.heldout_max_documents},
            "tokenizer": {"origin": origin, "trained_vocab_size": cfg.vocab_size if origin == "trained" else None},
            "prepare_seconds": round(time.perf_counter() - start, 3),
            "num_proc": procs,
        })


class CorpusWriter:
    """Token ids in, a committed prepared directory out: the writing half of ``prepare_corpus``.

    Opens a temp dir next to ``out`` and saves the tokenizer there (the ids' tokenizer is
    the one read back from it); ``add`` packs a batch of documents of one split into rows and appends them to its
    shards; ``commit`` hashes every file, writes the manifest and renames the directory.
    Used as a context manager, an exception leaves nothing behind.
    """

    def __init__(self, out: Path, tokenizer, seq_len: int, *, shard_bytes: int = SHARD_BYTES,
                 overwrite: bool = False):
        self.out, self.seq_len, self.overwrite = Path(out), seq_len, overwrite
        self.tmp = temp_dir_for(self.out)
        self.tokenizer_dir = self.tmp / "tokenizer"
        tokenizer.save_pretrained(str(self.tokenizer_dir))
        self.tokenizer = load_tokenizer(self.tokenizer_dir)  # what every reader will load
        self.dtype = token_dtype(len(self.tokenizer))
        sep = separator_id(self.tokenizer)
        shard_rows = shard_bytes // (seq_len * self.dtype.itemsize)
        self.packers = {s: RowPacker(seq_len, sep, self.dtype) for s in SPLITS}
        self.writers = {s: ShardWriter(self.tmp, s, self.dtype, seq_len, shard_rows) for s in SPLITS}

    def add(self, split: str, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of ``split``: their ids concatenated, and their lengths."""
        self.writers[split].write(self.packers[split].add(flat, lengths))

    def rows(self, split: str) -> int:
        return self.writers[split].rows

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (``info`` plus counts, dtype, tokenizer, shards) and rename."""
        shards = {s: self.writers[s].close() for s in SPLITS}
        tok = self.tokenizer
        manifest = {
            **info,
            "seq_len": self.seq_len,
            "dtype": self.dtype.name,
            "tokenizer": {
                **info.get("tokenizer", {}), "sha256": tokenizer_hash(tok), "size": len(tok),
                "class": type(tok).__name__, "separator_id": separator_id(tok), "mask_token_id": tok.mask_token_id,
            },
            "documents": {s: self.packers[s].documents for s in SPLITS},
            "tokens": {s: self.packers[s].tokens for s in SPLITS},
            "rows": {s: self.writers[s].rows for s in SPLITS},
            "shards": shards,
            "versions": {name: importlib.metadata.version(name) for name in
                         ("datasets", "tokenizers", "transformers", "numpy")},
        }
        return commit(self.tmp, self.out, manifest, overwrite=self.overwrite)

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            for writer in self.writers.values():
                writer.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)


class _Split:
    """Train and held-out documents of a source, as tagged batches ``(split, texts)``."""

    def __init__(self, docs: Documents, cfg: DataConfig, seed: int):
        self.docs, self.cfg, self.seed = docs, cfg, seed
        if docs.streaming:
            self.parts, self.train_length = None, None
            return
        n = len(docs)
        if n < 2:
            raise UserError(
                f"data.source: {cfg.source!r} has {n} non-empty documents; "
                "at least 2 are needed to hold one out for evaluation"
            )
        held = min(max(1, round(n * cfg.heldout_fraction)), cfg.heldout_max_documents)
        self.parts = docs.dataset.train_test_split(test_size=held, seed=seed)
        self.train_length = len(self.parts["train"])

    def tagged(self) -> Iterator[tuple[str, list[str]]]:
        if self.parts is not None:
            for texts in self.docs.batches(self.parts["test"]):
                yield "heldout", texts
            for texts in self.docs.batches(self.parts["train"]):
                yield "train", texts
            return
        position, held = 0, 0
        for texts in self.docs.batches():
            u = _uniform(self.seed, np.arange(position, position + len(texts), dtype=np.uint64))
            position += len(texts)
            out = {"heldout": [], "train": []}
            for text, x in zip(texts, u):
                if x < self.cfg.heldout_fraction and held < self.cfg.heldout_max_documents:
                    out["heldout"].append(text)
                    held += 1
                else:
                    out["train"].append(text)
            for part in SPLITS[::-1]:
                if out[part]:
                    yield part, out[part]

    def train_texts(self) -> Iterator[list[str]]:
        """Batches of the training documents (a stream is read once more for this)."""
        if self.parts is not None:
            yield from self.docs.batches(self.parts["train"])
            return
        for part, texts in self.tagged():
            if part == "train":
                yield texts


def _uniform(seed: int, position: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per document position: splitmix64 of (seed, position)."""
    z = position.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _processes(cfg: DataConfig, docs: Documents, num_proc: int | None) -> int:
    procs = num_proc or cfg.num_proc or len(os.sched_getaffinity(0))
    small = (cfg.max_documents or sys.maxsize) < POOL_MIN_DOCUMENTS or (
        not docs.streaming and len(docs) < POOL_MIN_DOCUMENTS)
    return 1 if small else max(1, procs)


# --------------------------------------------------------------------------- tokenizing


_WORKER_TOKENIZER = None  # set in the parent just before the workers fork from it


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode(_WORKER_TOKENIZER, texts)


def _encoded(tagged, tokenizer, procs: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(split, flat ids, lengths)`` per batch, in the order of ``tagged``."""
    global _WORKER_TOKENIZER
    if procs <= 1:
        for part, texts in tagged:
            yield part, *encode(tokenizer, texts)
        return
    # fork, as datasets' own map(num_proc) does: a worker starts in milliseconds with the
    # tokenizer already loaded (spawn would re-import torch and transformers in each one).
    # The workers are the parallelism, so the tokenizer's own threads are off in them; the
    # variable being set also spares the tokenizers library's warning about the fork.
    _WORKER_TOKENIZER = tokenizer
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
            window: deque = deque()  # bounded, so a stream is never read far ahead of the writer
            for part, texts in tagged:
                window.append((part, pool.submit(_encode_in_worker, texts)))
                if len(window) == 1:
                    # the workers have forked now; the parent's tokenizer may use its threads again
                    _restore(previous)
                if len(window) >= 2 * procs:
                    part, future = window.popleft()
                    yield part, *future.result()
            while window:
                part, future = window.popleft()
                yield part, *future.result()
    finally:
        _WORKER_TOKENIZER = None
        _restore(previous)


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = previous

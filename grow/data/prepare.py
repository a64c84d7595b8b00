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
    tmp = temp_dir_for(out)
    try:
        if tokenizer is None:
            tokenizer = train_tokenizer(split.train_texts(), cfg.vocab_size, length=split.train_length)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        tokenizer = load_tokenizer(tmp / "tokenizer")  # what every reader will load
        dtype = token_dtype(len(tokenizer))
        sep = separator_id(tokenizer)
        shard_rows = shard_bytes // (cfg.seq_len * dtype.itemsize)
        packers = {s: RowPacker(cfg.seq_len, sep, dtype) for s in SPLITS}
        writers = {s: ShardWriter(tmp, s, dtype, cfg.seq_len, shard_rows) for s in SPLITS}
        procs = _processes(cfg, docs, num_proc)
        with tqdm(total=None if docs.streaming else len(docs), unit=" docs", desc="prepare", disable=None,
                  file=sys.stderr, leave=False) as bar:
            for part, flat, lengths in _encoded(split.tagged(), tokenizer, tmp / "tokenizer", procs):
                writers[part].write(packers[part].add(flat, lengths))
                bar.update(len(lengths))
        shards = {s: writers[s].close() for s in SPLITS}
        rows = {s: writers[s].rows for s in SPLITS}
        tokens = {s: packers[s].tokens for s in SPLITS}
        if not rows["train"] or not rows["heldout"]:
            raise UserError(
                f"data.source: {cfg.source!r} has too little text: {tokens['train']} train and {tokens['heldout']} "
                f"held-out tokens, but each needs one sequence of data.seq_len={cfg.seq_len}"
            )
        manifest = {
            "source": {
                "name": cfg.source, "identity": source_identity(cfg), "text_field": docs.field,
                "hub_split": cfg.hub_split, "streaming": docs.streaming, "max_documents": cfg.max_documents,
                "rows_without_text": docs.missing, "first_without_text": docs.first_missing,
            },
            "split": {"seed": seed, "method": "hash" if docs.streaming else "permutation",
                      "heldout_fraction": cfg.heldout_fraction, "heldout_max_documents": cfg.heldout_max_documents},
            "seq_len": cfg.seq_len,
            "dtype": dtype.name,
            "tokenizer": {
                "sha256": tokenizer_hash(tokenizer), "origin": origin,
                "trained_vocab_size": cfg.vocab_size if origin == "trained" else None,
                "size": len(tokenizer), "class": type(tokenizer).__name__,
                "separator_id": sep, "mask_token_id": tokenizer.mask_token_id,
            },
            "documents": {s: packers[s].documents for s in SPLITS},
            "tokens": tokens,
            "rows": rows,
            "shards": shards,
            "prepare_seconds": round(time.perf_counter() - start, 3),
            "num_proc": procs,
            "versions": {name: importlib.metadata.version(name) for name in
                         ("datasets", "tokenizers", "transformers", "numpy")},
        }
        return commit(tmp, out, manifest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    import transformers

    _WORKER_TOKENIZER = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode(_WORKER_TOKENIZER, texts)


def _encoded(tagged, tokenizer, tokenizer_dir: Path, procs: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(split, flat ids, lengths)`` per batch, in the order of ``tagged``."""
    if procs <= 1:
        for part, texts in tagged:
            yield part, *encode(tokenizer, texts)
        return
    # spawn, not fork: the parent may hold tokenizer threads and torch state that fork
    # would copy into the workers half-initialised
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(procs, mp_context=context, initializer=_init_worker,
                             initargs=(str(tokenizer_dir),)) as pool:
        window: deque = deque()  # bounded, so a stream is never read far ahead of the writer
        for part, texts in tagged:
            window.append((part, pool.submit(_encode_in_worker, texts)))
            if len(window) >= 2 * procs:
                part, future = window.popleft()
                yield part, *future.result()
        while window:
            part, future = window.popleft()
            yield part, *future.result()

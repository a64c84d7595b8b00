"""Packed token rows as the trainer reads them, and the order it reads them in.

``TokenRows`` is a view over one or more memory-mapped ``.npy`` shards of shape
``(rows, seq_len)`` in the smallest unsigned integer type that holds the vocabulary. Nothing
is copied when a corpus is opened: a batch copies exactly its rows out of the page cache,
so resident memory does not grow with the corpus and every process on a machine shares one
copy of it. ``batch_positions`` is the data order: a pure function of the step.
"""

from __future__ import annotations

import functools
import mmap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class TokenRows:
    """Fixed-length token rows, read by index; int64 torch rows out.

    The interface the trainer and the evaluator use:

    - ``len(rows)``: the number of rows; ``rows.seq_len``: tokens per row;
      ``rows.shape == (len(rows), rows.seq_len)``, like a 2-D tensor's.
    - ``rows.rows(indices) -> torch.LongTensor (n, seq_len)``: a copy of exactly those rows
      (any int sequence, numpy or torch 1-D index; negative indices count from the end).
      This is the call to use: it never touches other rows.
    - ``rows[index]``: the same, for code written against a tensor: an int gives one row
      ``(seq_len,)``, a slice, list, numpy or torch index gives ``(n, seq_len)``.
    - ``rows.arrays``: the read-only shards themselves (``np.memmap`` for a prepared corpus),
      ``rows.dtype``: their storage type (uint16 or uint32).

    Rows are numbered across shards in order: shard 0's rows first.
    """

    def __init__(self, arrays: Sequence[np.ndarray]):
        if not arrays:
            raise ValueError("TokenRows: expected at least one (rows, seq_len) array")
        shapes = {a.shape[1] for a in arrays if a.ndim == 2}
        if len(shapes) != 1 or any(a.ndim != 2 for a in arrays) or len({a.dtype for a in arrays}) != 1:
            raise ValueError("TokenRows: shards must be 2-D with one seq_len and one dtype")
        self.arrays = list(arrays)
        self.seq_len = shapes.pop()
        self.dtype = self.arrays[0].dtype
        # starts[i] is the global index of shard i's first row; starts[-1] the total
        self._starts = np.cumsum([0] + [len(a) for a in self.arrays])

    @classmethod
    def open(cls, paths: Sequence[Path]) -> "TokenRows":
        """Map ``.npy`` shards read-only; no row is read until it is asked for."""
        arrays = [np.load(path, mmap_mode="r") for path in paths]
        for array in arrays:
            # Batches read rows in a random order, so the kernel's readahead would only pull
            # in neighbours no batch asked for.
            _advise(array, "MADV_RANDOM")
        return cls(arrays)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def rows(self, indices) -> torch.Tensor:
        """A ``(n, seq_len)`` int64 copy of the rows at ``indices``."""
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.dtype == bool or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"TokenRows: expected integer row indices, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"TokenRows: row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard):
            here = np.flatnonzero(shard == s)
            _copy_rows(self.arrays[s], idx[here] - self._starts[s], out, here)
        return torch.from_numpy(out)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            return self.rows([int(index)])[0]
        if isinstance(index, slice):
            return self.rows(np.arange(len(self))[index])
        return self.rows(index)

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows x {self.seq_len}, {self.dtype}, {len(self.arrays)} shard(s))"


def _copy_rows(array: np.ndarray, rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
    """``out[at] = array[rows]``, leaving none of ``array``'s pages mapped in this process.

    A memory-mapped row, once read, stays mapped -- and counted in this process's resident
    set -- until the mapping goes; over an epoch that would be the whole corpus (nanoGPT
    re-creates its np.memmap every batch for this reason). Worse, kernels that cache files
    in large folios map a whole folio (up to 2 MiB) for a 256-byte row. So each row is
    copied and the mapping's pages are dropped at once (MADV_DONTNEED): the data stays in
    the page cache, shared by every rank and re-mapped for free, and the resident set grows
    by at most one folio whatever the batch, the step or the corpus size.
    """
    handle = getattr(array, "_mmap", None)
    if handle is None or not hasattr(mmap, "MADV_DONTNEED"):
        out[at] = array[rows]
        return
    for j, row in zip(at, rows):
        out[j] = array[row]
        handle.madvise(mmap.MADV_DONTNEED)


def _advise(array: np.ndarray, advice: str) -> None:
    """madvise the whole mapping behind a np.memmap (no-op for in-memory arrays)."""
    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(mmap, advice):
        handle.madvise(getattr(mmap, advice))


# --------------------------------------------------------------------------- data order


def batch_positions(
    num_samples: int, step: int, batch_size: int, seed: int, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids and epochs of batch ``step``: a pure function of the step, for exact resume.

    Global position p = step * batch_size + i walks epoch p // num_samples, whose order is a
    permutation seeded by (seed, stream, epoch); distinct streams give independent orders.
    """
    if num_samples < 1 or step < 0 or batch_size < 1:
        raise ValueError(f"batch_positions: bad num_samples={num_samples}, step={step}, batch_size={batch_size}")
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = positions // num_samples
    ids = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        ids[here] = _epoch_order(num_samples, int(seed), int(stream), int(epoch))[positions[here] % num_samples]
    return ids, epochs


@functools.lru_cache(maxsize=1)
def _epoch_order(num_samples: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    # Cached because every step of an epoch reads the same permutation (~10 ms for 1M rows).
    # One entry: the steps of a stage walk one stream's epochs in order (a batch across an
    # epoch boundary asks for epoch e, then e + 1, which the next steps reuse), and a
    # permutation costs 8 bytes per row -- 12 MB for 200M tokens in rows of 128, the one
    # part of the data path whose memory still grows with the corpus.
    order = np.random.default_rng([seed, stream, epoch]).permutation(num_samples)
    order.flags.writeable = False
    return order

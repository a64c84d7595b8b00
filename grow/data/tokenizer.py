"""Tokenizers: load a given one, train a byte-level BPE, fingerprint one, encode batches."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import datasets
import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from grow.data.sources import looks_local, reason
from grow.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[MASK]")


def load_tokenizer(path: str | Path, field: str = "data.tokenizer") -> transformers.PreTrainedTokenizerBase:
    """A local or hub tokenizer; masked diffusion needs it to have a mask token."""
    name = str(path)
    if looks_local(name):
        if not Path(name).expanduser().exists():
            # transformers would try the hub and answer "Repo id must be in the form ..."
            raise UserError(f"{field}: no such tokenizer directory: {name}")
        name = str(Path(name).expanduser())
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # OSError, ValueError, JSON errors... all mean "not a usable tokenizer"
        raise UserError(f"{field}: could not load {str(path)!r}: {reason(exc)}") from None
    if tokenizer.mask_token_id is None:
        raise UserError(
            f"{field}: {str(path)!r} has no mask token, which masked diffusion needs; "
            "use data.tokenizer: train or a tokenizer with one"
        )
    return tokenizer


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def train_tokenizer(texts: datasets.Dataset | Iterable[list[str]], vocab_size: int,
                    length: int | None = None) -> transformers.PreTrainedTokenizerFast:
    """Fit a byte-level BPE (lossless on any text) with [PAD], [EOS], [MASK] as ids 0, 1, 2.

    ``texts`` is a dataset with a "text" column or an iterable of batches of strings.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if isinstance(texts, datasets.Dataset):
        dataset, length = texts, len(texts)
        texts = (dataset[i : i + 1000]["text"] for i in range(0, length, 1000))
    bpe.train_from_iterator(texts, trainer, length=length)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]"
    )


def separator_id(tokenizer) -> int | None:
    """The token written after every document when packing: EOS, else SEP, else none."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides the token ids grow trains on.

    For a fast tokenizer that is its whole pipeline (normalizer, pre-tokenizer, model with
    vocabulary and merges, added tokens) as the tokenizers library serializes it, less the
    call-time padding/truncation state; plus the separator and mask ids grow uses. So a
    tokenizer hashes the same before and after a save and load, and any change that could
    change an id changes the hash.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("padding", None)
        pipeline.pop("truncation", None)
    else:  # a slow (Python) tokenizer: its class and vocabulary
        pipeline = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    ids = {"separator": separator_id(tokenizer), "mask": tokenizer.mask_token_id, "size": len(tokenizer)}
    text = json.dumps({"pipeline": pipeline, "ids": ids}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save into a sibling temp dir and rename it, so a crash never leaves half a tokenizer."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` (no special tokens) as one flat uint32 array and the lengths."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths

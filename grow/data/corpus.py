"""The corpus a run trains on: a prepared directory, memory-mapped, and its tokenizer.

``data.source`` is either a directory written by ``grow data prepare`` (used as it is) or a
raw source, which is prepared once into GROW_CACHE_DIR/prepared under a key of source,
tokenizer, seq_len and split settings, and then used exactly like a prepared directory. So
the trainer has one path: rows mapped from ``.npy`` shards, never a copy of the corpus.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import transformers

from grow.config import DataConfig
from grow.data.cache import prepared_dir, prepared_key
from grow.data.prepare import prepare_corpus
from grow.data.rows import TokenRows
from grow.data.shards import FORMAT_VERSION, SPLITS, is_prepared, read_manifest, verify
from grow.data.tokenizer import has_tokenizer, load_tokenizer, save_tokenizer, tokenizer_hash
from grow.errors import UserError


@dataclass
class Corpus:
    """A tokenizer and the packed train / held-out rows (``TokenRows``, memory-mapped)."""

    tokenizer: transformers.PreTrainedTokenizerBase
    train: TokenRows
    heldout: TokenRows
    directory: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id


def open_corpus(directory: Path, *, full_check: bool = False, field: str = "data.source") -> Corpus:
    """Map a prepared directory after checking it against its manifest (see ``shards``)."""
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory, field)
    verify(directory, manifest, full=full_check, field=field)
    tokenizer = load_tokenizer(directory / "tokenizer", field)
    train, heldout = (TokenRows.open([directory / s["file"] for s in manifest["shards"][part]]) for part in SPLITS)
    return Corpus(tokenizer, train, heldout, directory, manifest)


def load_corpus(cfg: DataConfig, tokenizer_dir: Path, seed: int, *, log: Callable[[str], None] = print,
                prepare_missing: bool = True) -> Corpus:
    """The corpus of ``cfg.source`` as memory-mapped rows, with the run's tokenizer.

    A tokenizer already saved in ``tokenizer_dir`` (a resumed run's) is the tokenizer: the
    corpus must have been prepared with it. Otherwise the corpus's tokenizer, trained on its
    training documents or copied from ``cfg.tokenizer``, is saved there. ``seed`` chooses the
    held-out documents of a raw source (a prepared directory keeps the split it was made
    with). ``prepare_missing=False`` (ranks other than 0) raises instead of preparing.
    """
    start = time.perf_counter()
    tokenizer_dir = Path(tokenizer_dir)
    run_tokenizer = load_tokenizer(tokenizer_dir) if has_tokenizer(tokenizer_dir) else None
    if is_prepared(Path(cfg.source)):
        corpus, how = open_corpus(Path(cfg.source)), "mapped"
    else:
        corpus, how = _cached(cfg, seed, run_tokenizer, log, prepare_missing)
    _check_matches(corpus, cfg, run_tokenizer, tokenizer_dir)
    if run_tokenizer is None:
        # saved only once the corpus is known to be usable: a saved tokenizer is never
        # retrained, so one fitted on a broken source would outlive the fix
        save_tokenizer(corpus.tokenizer, tokenizer_dir)
    m = corpus.manifest
    documents = m["documents"]
    missing = m["source"].get("rows_without_text") or 0
    if missing:
        log(f"data: warning: {missing} rows of {m['source']['name']} have no {m['source']['text_field']!r} text "
            f"(first at {m['source']['first_without_text']}); they were skipped")
    log(
        f"data: {documents['train'] + documents['heldout']} documents ({documents['train']} train, "
        f"{documents['heldout']} held out), {m['tokens']['train'] + m['tokens']['heldout']:,} tokens, "
        f"{len(corpus.train)} train / {len(corpus.heldout)} held-out sequences of {corpus.train.seq_len}, "
        f"vocab {len(corpus.tokenizer)}, {m['dtype']} rows {how} from {corpus.directory}, "
        f"{time.perf_counter() - start:.1f}s"
    )
    return corpus


def _cached(cfg: DataConfig, seed: int, run_tokenizer, log, prepare_missing: bool) -> tuple[Corpus, str]:
    """The cache's prepared copy of a raw source, preparing it first if there is none.

    A tokenizer that exists already (the run's, or ``cfg.tokenizer``) keys the entry by its
    hash; one still to be trained by ``train:<vocab_size>``. A resumed run whose tokenizer
    was trained looks under both, so it finds the entry its first start prepared.
    """
    fixed = run_tokenizer
    if fixed is None and cfg.tokenizer != "train":
        fixed = load_tokenizer(cfg.tokenizer)
    ids = [f"sha256:{tokenizer_hash(fixed)}"] if fixed is not None else []
    if cfg.tokenizer == "train":
        ids.append(f"train:{cfg.vocab_size}")
    directories = [prepared_dir(cfg, prepared_key(cfg, seed, i, FORMAT_VERSION)) for i in ids]
    for directory in directories:
        if not (directory / "manifest.json").is_file():
            continue
        try:
            corpus = open_corpus(directory)
        except UserError as exc:
            if not prepare_missing:
                raise
            log(f"data: the cached copy failed its check ({exc}); preparing it again")
            shutil.rmtree(directory, ignore_errors=True)
            continue
        if fixed is None or corpus.manifest["tokenizer"]["sha256"] == tokenizer_hash(fixed):
            return corpus, "mapped"
    if not prepare_missing:
        raise UserError(
            f"data.source: no prepared copy of {cfg.source!r} in {directories[0].parent} on this process; rank 0 "
            "prepares it, so GROW_CACHE_DIR must be shared by every node (or run grow data prepare and set "
            "data.source to that directory)"
        )
    prepare_corpus(cfg, directories[0], seed=seed, tokenizer=fixed, log=log)
    return open_corpus(directories[0]), "prepared and mapped"


def _check_matches(corpus: Corpus, cfg: DataConfig, run_tokenizer, tokenizer_dir: Path) -> None:
    """The corpus's seq_len and tokenizer are the config's (and the run's): one line naming both."""
    m, where = corpus.manifest, corpus.directory
    if m["seq_len"] != cfg.seq_len:
        raise UserError(f"data.seq_len: {where} holds rows of {m['seq_len']} tokens but data.seq_len is "
                        f"{cfg.seq_len}; prepare it with --seq-len {cfg.seq_len} or set data.seq_len: {m['seq_len']}")
    tok = m["tokenizer"]
    theirs = f"{_describe(tok)} (sha256 {tok['sha256'][:12]})"
    if run_tokenizer is not None:
        ours = tokenizer_hash(run_tokenizer)
        if ours != tok["sha256"]:
            raise UserError(f"data.tokenizer: {where} was prepared with {theirs}, but this run's tokenizer "
                            f"{tokenizer_dir} is another (sha256 {ours[:12]})")
    elif cfg.tokenizer == "train":
        if tok["origin"] != "trained" or tok["trained_vocab_size"] != cfg.vocab_size:
            raise UserError(f"data.tokenizer: {where} was prepared with {theirs}, but the config asks for a "
                            f"tokenizer trained with data.vocab_size={cfg.vocab_size}")
    else:
        ours = tokenizer_hash(load_tokenizer(cfg.tokenizer))
        if ours != tok["sha256"]:
            raise UserError(f"data.tokenizer: {where} was prepared with {theirs}, but data.tokenizer is "
                            f"{cfg.tokenizer} (sha256 {ours[:12]})")


def _describe(tok: dict[str, Any]) -> str:
    if tok["origin"] == "trained":
        return f"a tokenizer trained with vocab_size={tok['trained_vocab_size']}"
    if tok["origin"] == "given":
        return "a run's own tokenizer"
    return f"tokenizer {tok['origin']}"

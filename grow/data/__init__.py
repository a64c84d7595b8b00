"""Text in, packed token rows out: sources, tokenizer, prepared shards, memory-mapped rows.

    sources.py    read documents: text / jsonl / parquet files, saved and hub datasets
                  (optionally streamed), with errors that name file, line and encoding
    bible.py      the embedded corpus (World English Bible), offline
    tokenizer.py  load, train (byte-level BPE with [MASK]), fingerprint, encode
    prepare.py    split by document, tokenize in parallel, pack into rows, write shards
    shards.py     the on-disk format: .npy shards + tokenizer + manifest written last; checks
    cache.py      GROW_CACHE_DIR: raw sources prepared once, verification stamps
    rows.py       TokenRows (memory-mapped row access) and batch_positions (the data order)
    corpus.py     load_corpus: what a run trains on, from a prepared directory or the cache

Data flows sources -> prepare -> shards on disk -> corpus (TokenRows) -> trainer.
"""

from grow.data.bible import bible_documents, bible_text
from grow.data.cache import cache_dir
from grow.data.corpus import Corpus, load_corpus, open_corpus
from grow.data.prepare import prepare_corpus
from grow.data.rows import TokenRows, batch_positions
from grow.data.shards import pack
from grow.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_hash, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "Corpus",
    "TokenRows",
    "batch_positions",
    "bible_documents",
    "bible_text",
    "cache_dir",
    "load_corpus",
    "load_tokenizer",
    "open_corpus",
    "pack",
    "prepare_corpus",
    "tokenizer_hash",
    "train_tokenizer",
]

"""grow's own cache: the bible's text, raw sources prepared once, and hash verification stamps.

    GROW_CACHE_DIR (default ~/.cache/grow)/
      bible-web-<version>.txt          the bible, one chapter per line
      prepared/<name>-<key>/           a raw data.source prepared once (same layout as grow data prepare)
      verified/<key>.json              which shard files were last fully hashed, by their stat

Everything here can be deleted; it is rebuilt when needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from grow.config import DataConfig


def cache_dir() -> Path:
    """grow's own cache (GROW_CACHE_DIR, default ~/.cache/grow), read at call time."""
    return Path(os.environ.get("GROW_CACHE_DIR") or Path.home() / ".cache" / "grow")


def prepared_key(cfg: DataConfig, seed: int, tokenizer_id: str, format_version: int) -> str:
    """sha256 of everything that decides a prepared corpus's rows.

    ``tokenizer_id`` is ``sha256:<tokenizer_hash>`` for a tokenizer that exists already, or
    ``train:<vocab_size>`` for one still to be trained on the training documents (training is
    deterministic, so the same key gives the same tokenizer). ``num_proc`` and the shard size
    change neither rows nor ids, so they are not part of it.
    """
    from grow.data.sources import source_identity

    spec = {
        "format_version": format_version,
        "source": source_identity(cfg),
        "text_field": cfg.text_field,
        "hub_split": cfg.hub_split,
        "streaming": cfg.streaming,
        "max_documents": cfg.max_documents,
        "heldout_fraction": cfg.heldout_fraction,
        "heldout_max_documents": cfg.heldout_max_documents,
        "seed": seed,
        "seq_len": cfg.seq_len,
        "tokenizer": tokenizer_id,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def prepared_dir(cfg: DataConfig, key: str) -> Path:
    """Where the cache keeps the prepared copy of ``cfg.source`` under ``key``."""
    stem = "bible" if cfg.source == "bible" else Path(cfg.source.rstrip("/")).name or "source"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:40]
    return cache_dir() / "prepared" / f"{stem}-{key[:16]}"


def stamp_path(directory: Path, manifest_sha256: str) -> Path:
    """The verification stamp of the prepared ``directory`` with this manifest."""
    key = hashlib.sha256(f"{Path(directory).resolve()}\0{manifest_sha256}".encode()).hexdigest()
    return cache_dir() / "verified" / f"{key[:32]}.json"

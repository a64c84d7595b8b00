"""Shared fixtures: private caches, a small corpus and overrides for second-long runs."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "in the beginning god created the heavens and earth light was good evening morning day "
    "waters under sky land seed fruit tree after its kind lord said let there be"
).split()


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """Nothing a test does may write into the user's home caches."""
    base = tmp_path_factory.mktemp("caches")
    os.environ["GROW_CACHE_DIR"] = str(base / "grow")
    os.environ["HF_DATASETS_CACHE"] = str(base / "datasets")
    yield


def write_corpus(path, n_docs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_docs):
        lines.append(f"{i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90))) + ".")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def corpus_file(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def tiny_overrides(corpus: str, blocks: int = 2, steps: int = 4) -> list[str]:
    """--set overrides for a run that takes seconds on 2 CPU cores."""
    sets = {
        "data.source": corpus,
        "data.vocab_size": 300,
        "data.seq_len": 32,
        "data.heldout_fraction": 0.1,
        "model.num_blocks": blocks,
        "model.hidden_size": 32,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.intermediate_size": 64,
        "model.max_position_embeddings": 64,
        "schedule.ratios": None,
        "schedule.r_min": 0.2,
        "train.steps": steps,
        "train.batch_size": 4,
        "train.warmup_steps": 1,
        "train.log_every": 2,
        "train.eval_batches": 2,
        "train.device": "cpu",
        "lora.rank": 2,
        # Growth stages only: tests that need the final whole-stack stage or path anchors (the
        # tiny demo's defaults) ask for them, so stage counts elsewhere stay what they read.
        "curriculum.final_steps": 0,
        "curriculum.anchor": 0.0,
    }
    out = []
    for key, value in sets.items():
        value = "null" if value is None else value
        out += ["--set", f"{key}={value}"]
    return out


def tiny_config(corpus: str, blocks: int = 2, steps: int = 4, extra: list[str] = ()):
    """A validated GrowConfig for in-process tests (same settings as tiny_overrides)."""
    from grow.config import load_config

    sets = tiny_overrides(corpus, blocks, steps)[1::2]
    return load_config("configs/tiny.yaml", [*sets, *extra])


@pytest.fixture
def tiny_corpus(tmp_path, corpus_file):
    """(config, Corpus) for a 2-block model on the small corpus."""
    from grow.data import load_corpus

    cfg = tiny_config(corpus_file)
    corpus = load_corpus(cfg.data, tmp_path / "tokenizer", cfg.train.seed, log=lambda s: None)
    return cfg, corpus


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; they are skipped (never silently passed) without it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def grow_in_process(run, cfg, stop_after: str | None = None):
    """Load the corpus (tokenizer into RUN/tokenizer) and grow ``cfg`` into ``run``; returns the Corpus."""
    from grow.data import load_corpus
    from grow.stages import grow_run

    run.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(cfg.data, run / "tokenizer", cfg.train.seed, log=lambda s: None)
    grow_run(cfg, run, corpus, log=lambda s: None, stop_after=stop_after)
    return corpus


def main_preempted_at(argv: list[str], stage: str, step: int) -> int:
    """``grow.cli.main(argv)``, with the SIGTERM handler's flag raised once the log reports
    ``step`` of ``stage``: a preemption at an exact step, in process."""
    import grow.cli as cli
    import grow.cli.train as train
    from grow.checkpoint import PREEMPT

    def stop_at(line):
        if line.startswith(stage + " ") and f"step {step}/" in line:
            PREEMPT.requested = True

    original = train._log_to
    try:
        train._log_to = lambda r: (lambda line: (stop_at(line), original(r)(line)))
        return cli.main(argv)
    finally:
        train._log_to = original
        PREEMPT.requested = False

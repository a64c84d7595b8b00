"""Prepared corpora at two scales, side by side: prepare throughput, loader throughput against
what a training step consumes, the cost of the hash checks, and the peak RSS of a short
`grow train` over a ~2M-token and a >=200M-token prepared corpus.

    python bench/data.py                              # ~2M and 200M tokens; deletes both afterwards
    python bench/data.py --big-tokens 50e6 --keep /tmp/corpora

What is measured, honestly:
- the small corpus is synthetic text (Zipf-distributed random words), prepared by the real
  pipeline (`prepare_corpus`: datasets, BPE training, tokenization, packing, shards, hashes);
- the big corpus is NOT tokenized: tokenizing 200M tokens takes ~15 min per core here, so
  its documents are token ids drawn from the small corpus's unigram distribution, written
  by the same `CorpusWriter` prepare uses (packing, .npy shards, sha256, manifest, rename).
  Its throughput line is therefore "pack + write + hash", not tokenization;
- loader throughput reads batches exactly as the trainer does (`batch_positions`, then
  `TokenRows.rows`), warm (page cache) and cold (the shards evicted with posix_fadvise);
- each training run is its own `python -m grow train` process; its peak RSS is the kernel's
  ru_maxrss for that process (os.wait4), which counts the mapped corpus pages it touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

SEQ, VOCAB, BATCH = 128, 4096, 16


def synthetic_text(path: Path, docs: int, seed: int = 0) -> None:
    """Documents of 40..140 words drawn from a Zipf law over 20,000 random lowercase words."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 11))) for _ in range(20_000)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    lengths = rng.integers(40, 141, docs)
    ids = rng.choice(len(words), int(lengths.sum()), p=p / p.sum())
    with open(path, "w") as f:
        start = 0
        for n in lengths:
            f.write(" ".join(words[i] for i in ids[start : start + n]) + ".\n")
            start += n


def synthetic_ids(out: Path, tokenizer_dir: Path, unigram: np.ndarray, tokens: int, seed: int = 0) -> dict:
    """A prepared corpus of ``tokens`` synthetic ids, through prepare's own writer."""
    from grow.data.prepare import CorpusWriter
    from grow.data.tokenizer import load_tokenizer

    rng = np.random.default_rng(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    written, held = 0, 0
    with CorpusWriter(out, tokenizer, SEQ) as writer:
        while written < tokens:
            lengths = rng.integers(100, 900, 1000)
            flat = unigram[rng.integers(0, len(unigram), int(lengths.sum()))]
            part = "heldout" if held < 1000 else "train"  # the first 1000 documents, the default bound
            held += len(lengths) if part == "heldout" else 0
            writer.add(part, flat, lengths)
            written += int(lengths.sum()) if part == "train" else 0
        return writer.commit({
            "source": {"name": "synthetic token ids (bench/data.py)", "identity": {"kind": "synthetic"},
                       "text_field": "text", "hub_split": None, "streaming": False, "max_documents": None,
                       "rows_without_text": 0, "first_without_text": None},
            "split": {"seed": seed, "method": "first documents", "heldout_fraction": None,
                      "heldout_max_documents": 1000},
            "tokenizer": {"origin": str(tokenizer_dir), "trained_vocab_size": None},
        })


def loader_throughput(directory: Path, batches: int, cold: bool) -> float:
    """Tokens/s of the trainer's reads: batch_positions, then TokenRows.rows."""
    from grow.data import batch_positions, open_corpus

    corpus = open_corpus(directory)
    if cold:  # evict this corpus's pages so every row is read from disk
        for array in corpus.train.arrays:
            with open(array.filename, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    n = len(corpus.train)
    start = time.perf_counter()
    for step in range(batches):
        ids, _ = batch_positions(n, step + (batches if cold else 0), BATCH, seed=0, stream=1)
        corpus.train.rows(ids)
    return batches * BATCH * SEQ / (time.perf_counter() - start)


def check_times(directory: Path) -> tuple[float, float]:
    """Seconds for a full sha256 check of every file, and for the stat check of later starts."""
    from grow.data.shards import problem, read_manifest, stamp_matches, write_stamp

    m = read_manifest(directory)
    start = time.perf_counter()
    assert problem(directory, m, hashes=True) is None
    full = time.perf_counter() - start
    write_stamp(directory)
    start = time.perf_counter()
    assert problem(directory, m, hashes=False) is None and stamp_matches(directory)
    return full, time.perf_counter() - start


def train(directory: Path, tokenizer_dir: Path, run: Path, steps: int, env: dict) -> tuple[int, float]:
    """(peak RSS bytes, median ms/step) of a 2-block `grow train` over ``directory``."""
    sets = {"data.source": directory, "data.tokenizer": tokenizer_dir, "data.seq_len": SEQ, "model.num_blocks": 2,
            "schedule.ratios": "null", "train.steps": steps, "train.batch_size": BATCH, "train.log_every": 5,
            "train.eval_batches": 2, "train.device": "cpu", "train.warmup_steps": 2}
    cmd = [sys.executable, "-m", "grow", "train", "configs/tiny.yaml", "--out", str(run)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"grow train failed:\n{out[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return usage.ru_maxrss * 1024, statistics.median(r["ms_per_step"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-docs", type=int, default=15_000, help="documents of synthetic text (~2M tokens)")
    parser.add_argument("--big-tokens", type=float, default=200e6, help="training tokens of the big corpus")
    parser.add_argument("--steps", type=int, default=20, help="steps per stage of each training run (2 stages)")
    parser.add_argument("--batches", type=int, default=2000, help="batches per loader measurement")
    parser.add_argument("--keep", metavar="DIR", help="keep the corpora and runs in DIR (default: delete them)")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="grow-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(GROW_CACHE_DIR=str(work / "cache"), HF_DATASETS_CACHE=str(work / "hf"), HF_HUB_OFFLINE="1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    from grow.config import DataConfig
    from grow.data import open_corpus
    from grow.data.prepare import prepare_corpus
    from grow.units import format_bytes

    try:
        text = work / "small.txt"
        synthetic_text(text, args.small_docs)
        cfg = DataConfig(source=str(text), vocab_size=VOCAB, seq_len=SEQ)
        rows = {}
        timings = {}
        for name, extra in (("trained", {}), ("1 proc", {"num_proc": 1}), ("2 procs", {"num_proc": 2})):
            out = work / ("small" if name == "trained" else f"small-{name.replace(' ', '')}")
            tok = {} if name == "trained" else {"tokenizer": open_corpus(work / "small").tokenizer}
            start = time.perf_counter()
            m = prepare_corpus(cfg, out, seed=0, log=lambda s: None, **tok, **extra)
            timings[name] = (time.perf_counter() - start, m["tokens"]["train"] + m["tokens"]["heldout"])
            rows[name] = m["files"]
        same = rows["1 proc"] == rows["2 procs"]
        small = work / "small"
        small_m = open_corpus(small).manifest
        unigram = open_corpus(small).train[:].numpy().reshape(-1).astype(np.uint16)
        big = work / "big"
        start = time.perf_counter()
        big_m = synthetic_ids(big, small / "tokenizer", unigram, int(args.big_tokens))
        big_seconds = time.perf_counter() - start

        table = {}
        for label, directory, m in (("small", small, small_m), ("big", big, big_m)):
            full, stat = check_times(directory)
            warm = loader_throughput(directory, args.batches, cold=False)
            cold = loader_throughput(directory, args.batches, cold=True)
            rss, ms = train(directory, small / "tokenizer", work / f"run-{label}", args.steps, env)
            size = sum(e["bytes"] for e in m["files"].values())
            table[label] = dict(tokens=m["tokens"]["train"], rows=m["rows"]["train"], size=size, full=full, stat=stat,
                                warm=warm, cold=cold, rss=rss, ms=ms)

        s, b = table["small"], table["big"]
        print(f"bench/data.py: seq_len {SEQ}, batch {BATCH}, vocab {VOCAB} (uint16), {os.cpu_count()} CPU cores, "
              f"2-block tiny model x {args.steps} steps per stage\n")
        for name, (seconds, tokens) in timings.items():
            what = ("tokenizer training + tokenizing + packing + writing" if name == "trained"
                    else f"tokenizing + packing + writing, given tokenizer, {name}")
            print(f"prepare {tokens / 1e6:.2f}M tokens of text ({what}): {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s")
        print(f"  1 and 2 processes wrote byte-identical files: {same}")
        print(f"big corpus: {b['tokens'] / 1e6:.0f}M synthetic ids packed + written + hashed by CorpusWriter in "
              f"{big_seconds:.1f} s ({b['tokens'] / big_seconds / 1e6:,.1f}M tokens/s; not tokenized)\n")
        rows_fmt = [
            ("train tokens", lambda t: f"{t['tokens']:,}"),
            ("train rows", lambda t: f"{t['rows']:,}"),
            ("on disk (shards + tokenizer)", lambda t: format_bytes(t["size"])),
            ("full sha256 check", lambda t: f"{t['full']:.2f} s"),
            ("stat check (later starts)", lambda t: f"{1000 * t['stat']:.1f} ms"),
            ("loader, warm page cache", lambda t: f"{t['warm'] / 1e6:.1f}M tok/s"),
            ("loader, cold (evicted)", lambda t: f"{t['cold'] / 1e6:.1f}M tok/s"),
            ("a training step consumes", lambda t: f"{BATCH * SEQ / t['ms'] * 1000 / 1e3:.1f}k tok/s"),
            ("loader / step consumption", lambda t: f"{min(t['warm'], t['cold']) / (BATCH * SEQ / t['ms'] * 1000):,.0f}x"),
            ("peak RSS of grow train", lambda t: format_bytes(t["rss"])),
        ]
        print(f"{'':32}{'~2M-token corpus':>22}{'big corpus':>22}")
        for label, fmt in rows_fmt:
            print(f"{label:32}{fmt(s):>22}{fmt(b):>22}")
        print(f"\npeak RSS, big vs small: {100 * (b['rss'] - s['rss']) / s['rss']:+.1f}% "
              f"for {b['tokens'] / s['tokens']:.0f}x the tokens")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

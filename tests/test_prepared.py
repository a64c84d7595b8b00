"""Prepared corpora: grow data prepare / inspect, memory-mapped rows and the manifest's checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import grow.data.prepare as prepare_module
from conftest import tiny_overrides, write_corpus
from grow.cli import main
from grow.config import DataConfig
from grow.data import (TokenRows, batch_positions, load_corpus, open_corpus, pack, prepare_corpus,
                       tokenizer_hash, train_tokenizer)
from grow.data.shards import MANIFEST, RowPacker, ShardWriter
from grow.data.tokenizer import load_tokenizer
from grow.errors import UserError
from grow.store import sha256_file

# the settings of conftest.tiny_overrides, so a prepared directory fits configs/tiny.yaml runs
SEQ, VOCAB, HELDOUT = 32, 300, 0.1


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("GROW_CACHE_DIR", str(tmp_path / "grow-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def cfg_for(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **{"vocab_size": VOCAB, "seq_len": SEQ, "heldout_fraction": HELDOUT, **kw})


def prepare_cli(source, out, *extra) -> int:
    return main(["data", "prepare", str(source), "--out", str(out), "--seq-len", str(SEQ), "--vocab-size",
                 str(VOCAB), "--heldout-fraction", str(HELDOUT), *map(str, extra)])


@pytest.fixture
def txt(tmp_path) -> Path:
    return Path(write_corpus(tmp_path / "c.txt"))


@pytest.fixture
def prepared(tmp_path, txt) -> Path:
    out = tmp_path / "prepared"
    assert prepare_cli(txt, out) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- round trip


def test_prepare_round_trip_batches_equal_todays_packing(tmp_path, txt, prepared):
    corpus = load_corpus(cfg_for(prepared), tmp_path / "run-tok", seed=0, log=lambda s: None)
    # what grow did before prepared corpora: split the documents, train the tokenizer on the
    # training ones, tokenize each document, pack -- all in memory
    docs = [line for line in txt.read_text().splitlines() if line.strip()]
    split = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=round(len(docs) * HELDOUT), seed=0)
    reference = train_tokenizer(split["train"], VOCAB)
    tok = corpus.tokenizer
    assert tok.get_vocab() == reference.get_vocab() and tokenizer_hash(tok) == tokenizer_hash(reference)
    packed = {part: pack([np.array(tok.encode(t, add_special_tokens=False)) for t in split[key]["text"]],
                         tok.eos_token_id, SEQ) for part, key in (("train", "train"), ("heldout", "test"))}
    np.testing.assert_array_equal(corpus.train[:].numpy(), packed["train"])
    np.testing.assert_array_equal(corpus.heldout[:].numpy(), packed["heldout"])
    train = torch.from_numpy(packed["train"])
    for step in range(5):  # the trainer's batches: batch_positions, then rows
        ids, _ = batch_positions(len(corpus.train), step, 4, seed=0, stream=2)
        batch = corpus.train[torch.from_numpy(ids)]
        assert batch.dtype == torch.int64 and torch.equal(batch, train[ids])

    m = json.loads((prepared / MANIFEST).read_text())
    assert m["dtype"] == "uint16" and m["seq_len"] == SEQ
    assert m["documents"] == {"train": 54, "heldout": 6}
    assert m["rows"] == {"train": len(packed["train"]), "heldout": len(packed["heldout"])}
    assert m["tokens"]["train"] == sum(len(tok.encode(t, add_special_tokens=False)) + 1 for t in split["train"]["text"])
    assert m["tokenizer"]["sha256"] == tokenizer_hash(tok) and m["tokenizer"]["trained_vocab_size"] == VOCAB
    files = {p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == files and {"train-00000.npy", "heldout-00000.npy", "tokenizer/tokenizer.json"} <= files
    assert all(m["files"][f]["sha256"] == sha256_file(prepared / f) for f in files)
    # the run got the corpus's tokenizer
    assert load_tokenizer(tmp_path / "run-tok").get_vocab() == tok.get_vocab()

    # a raw source is prepared into the cache with the same rows
    raw = load_corpus(cfg_for(txt), tmp_path / "raw-tok", seed=0, log=lambda s: None)
    assert raw.directory.parent == tmp_path / "grow-cache" / "prepared"
    assert torch.equal(raw.train[:], corpus.train[:]) and torch.equal(raw.heldout[:], corpus.heldout[:])


def test_row_packer_equals_pack_over_any_batching():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 300, rng.integers(0, 40)).astype(np.uint32) for _ in range(60)]
    for sep in (1, None):
        packer, rows = RowPacker(16, sep, np.dtype(np.uint16)), []
        for a, b in [(0, 7), (7, 8), (8, 40), (40, 60)]:
            batch = docs[a:b]
            rows.append(packer.add(np.concatenate(batch), np.array([len(d) for d in batch])))
        np.testing.assert_array_equal(np.concatenate(rows), pack(docs, sep, 16))
        assert packer.documents == 60 and packer.tokens == sum(map(len, docs)) + (60 if sep else 0)


def test_shards_split_rows_and_are_plain_npy_files(tmp_path, txt, prepared):
    small = tmp_path / "small"
    assert prepare_cli(txt, small, "--shard-size", 40 * SEQ * 2) == 0  # 40 rows per shard
    m = json.loads((small / MANIFEST).read_text())
    assert [s["rows"] for s in m["shards"]["train"]][:-1] == [40] * (len(m["shards"]["train"]) - 1)
    assert len(m["shards"]["train"]) > 2
    whole, sharded = open_corpus(prepared), open_corpus(small)
    assert torch.equal(whole.train[:], sharded.train[:])
    ids = np.array([0, 39, 40, 41, len(whole.train) - 1, 5, 80])
    assert torch.equal(sharded.train.rows(ids), whole.train.rows(ids))
    # each shard is an ordinary .npy array: NumPy reads it without grow
    first = np.load(small / "train-00000.npy")
    assert first.dtype == np.uint16 and first.shape == (40, SEQ)
    np.testing.assert_array_equal(first, whole.train[:40].numpy())


def test_rows_are_memory_mapped_not_copied(prepared):
    corpus = open_corpus(prepared)
    for rows, name in ((corpus.train, "train-00000.npy"), (corpus.heldout, "heldout-00000.npy")):
        (array,) = rows.arrays
        assert isinstance(array, np.memmap) and Path(array.filename) == (prepared / name).resolve()
        assert not array.flags.writeable and array.dtype == np.uint16
    array = corpus.train.arrays[0]
    batch = corpus.train.rows([3, 0, 3])
    assert not np.shares_memory(batch.numpy(), array)  # a batch is a copy of its rows only
    np.testing.assert_array_equal(batch.numpy(), array[[3, 0, 3]])
    batch.zero_()
    assert array[3].any()


def test_token_rows_index_like_a_tensor():
    a = np.arange(5 * 4, dtype=np.uint16).reshape(5, 4)
    b = np.arange(100, 100 + 3 * 4, dtype=np.uint16).reshape(3, 4)
    rows, full = TokenRows([a, b]), torch.from_numpy(np.concatenate([a, b]).astype(np.int64))
    assert len(rows) == 8 and rows.shape == (8, 4) == tuple(full.shape) and rows.seq_len == 4
    for index in (0, 6, -1, torch.tensor(5), slice(2, 7), slice(None, None, 3), [7, 0, 5],
                  np.array([4, 5]), torch.tensor([6, 1, 6])):
        got = rows[index]
        assert got.dtype == torch.int64 and torch.equal(got, full[index]), index
    with pytest.raises(IndexError):
        rows[[8]]
    with pytest.raises(TypeError):
        rows.rows(np.array([True, False]))


def test_parallel_tokenization_writes_the_same_rows(tmp_path, txt, prepared, monkeypatch):
    monkeypatch.setattr(prepare_module, "POOL_MIN_DOCUMENTS", 0)
    parallel = tmp_path / "parallel"
    assert prepare_cli(txt, parallel, "--num-proc", 2) == 0
    m, ref = (json.loads((d / MANIFEST).read_text()) for d in (parallel, prepared))
    assert m["num_proc"] == 2 and ref["num_proc"] == 1
    assert m["files"] == ref["files"]  # byte-identical shards and tokenizer


# --------------------------------------------------------------------------- checks


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place and put the modification time back, as a sneaky edit would."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_modified_shard_is_detected_by_hash_and_never_trained_on(tmp_path, prepared, capsys):
    open_corpus(prepared)  # first use on this machine: hashed, stamped
    shard = prepared / "train-00000.npy"
    flip_byte(shard, shard.stat().st_size // 2)
    with pytest.raises(UserError, match=r"train-00000.npy does not match its sha256 .*nothing was trained"):
        open_corpus(prepared)
    run = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *tiny_overrides(str(prepared))]) == 2
    err = one_error_line(capsys)
    assert "data.source:" in err and "train-00000.npy does not match its sha256" in err
    assert not run.exists()
    assert main(["data", "inspect", str(prepared)]) == 0  # sizes still match; says hashes are not current
    assert "sha256 not checked since the files last changed" in capsys.readouterr().out
    assert main(["data", "inspect", str(prepared), "--verify"]) == 1
    assert "check      FAILED: train-00000.npy does not match its sha256" in capsys.readouterr().out

    flip_byte(shard, shard.stat().st_size // 2)  # restored: accepted again
    open_corpus(prepared)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    with pytest.raises(UserError, match=r"train-00000.npy has \d+ bytes, the manifest says \d+ \(truncated\?\)"):
        load_corpus(cfg_for(prepared), tmp_path / "tok", seed=0, log=lambda s: None)
    assert not (tmp_path / "tok").exists()


def test_unchanged_files_are_not_hashed_again(prepared, monkeypatch):
    import grow.data.shards as shards

    open_corpus(prepared)
    hashed = []
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(path) or "x")
    open_corpus(prepared)
    assert hashed == []  # sizes and the stamp's stat match: no re-read of the shards
    with pytest.raises(UserError, match="does not match its sha256"):
        open_corpus(prepared, full_check=True)  # a full check always hashes
    assert hashed


def test_tokenizer_mismatch_is_one_line_naming_both(tmp_path, txt, prepared, capsys):
    run = tmp_path / "run"
    sets = tiny_overrides(str(prepared))
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *sets, "--set", "data.vocab_size=400"]) == 2
    err = one_error_line(capsys)
    assert "data.tokenizer:" in err and "trained with vocab_size=300" in err and "data.vocab_size=400" in err
    other = tmp_path / "other-tok"
    train_tokenizer(datasets.Dataset.from_dict({"text": ["another corpus entirely"] * 20}), 280).save_pretrained(other)
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *sets, "--set", f"data.tokenizer={other}"]) == 2
    err = one_error_line(capsys)
    theirs = json.loads((prepared / MANIFEST).read_text())["tokenizer"]["sha256"][:12]
    ours = tokenizer_hash(load_tokenizer(other))[:12]
    assert f"{prepared} was prepared with a tokenizer trained with vocab_size=300 (sha256 {theirs})" in err
    assert f"data.tokenizer is {other} (sha256 {ours})" in err
    assert not run.exists()
    # a run's own tokenizer that is not the corpus's
    load_tokenizer(other).save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match=rf"{prepared} was prepared with .* but this run's tokenizer .* is another"):
        load_corpus(cfg_for(prepared), tmp_path / "tok", seed=0, log=lambda s: None)


def test_given_tokenizer_is_recognised_after_its_round_trip(tmp_path, txt, prepared):
    given = tmp_path / "given"
    load_tokenizer(prepared / "tokenizer").save_pretrained(given)
    out = tmp_path / "with-given"
    assert prepare_cli(txt, out, "--tokenizer", given) == 0
    corpus = load_corpus(cfg_for(out, tokenizer=str(given)), tmp_path / "tok", seed=0, log=lambda s: None)
    assert json.loads((out / MANIFEST).read_text())["tokenizer"]["origin"] == str(given)
    assert torch.equal(corpus.train[:], open_corpus(prepared).train[:])


def test_seq_len_mismatch_is_one_line_naming_both(tmp_path, prepared, capsys):
    run = tmp_path / "run"
    code = main(["train", "configs/tiny.yaml", "--out", str(run), *tiny_overrides(str(prepared)),
                 "--set", "data.seq_len=64"])
    err = one_error_line(capsys)
    assert code == 2 and f"data.seq_len: {prepared} holds rows of 32 tokens but data.seq_len is 64" in err
    assert not run.exists()


def test_interrupted_prepare_leaves_nothing_a_later_run_would_use(tmp_path, txt, monkeypatch):
    out = tmp_path / "prepared"
    real_close = ShardWriter._close
    calls = []

    def crash_on_second_shard(self):
        calls.append(self._name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_close(self)

    monkeypatch.setattr(ShardWriter, "_close", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg_for(txt), out)
    assert not out.exists() and list(tmp_path.glob(".prepared.tmp-*")) == []
    monkeypatch.undo()

    # a prepare killed outright leaves its hidden temp dir; a copy cut short leaves shards
    # without a manifest: neither is read, and the next prepare of the same place cleans up
    import socket

    stale = tmp_path / f".prepared.tmp-{socket.gethostname()}-999999999"
    stale.mkdir()
    (stale / "train-00000.npy").write_bytes(b"partial")
    out.mkdir()
    (out / "train-00000.npy").write_bytes(b"partial")
    with pytest.raises(UserError, match=r"data.source: .*prepared has no manifest.json \(an interrupted"):
        load_corpus(cfg_for(out), tmp_path / "tok", seed=0, log=lambda s: None)
    (out / "train-00000.npy").unlink()
    prepare_corpus(cfg_for(txt), out)
    assert not stale.exists() and (out / MANIFEST).is_file()


def test_prepare_never_overwrites_without_asking(tmp_path, txt, prepared, capsys):
    before = (prepared / MANIFEST).read_bytes()
    assert prepare_cli(txt, prepared, "--seq-len", 16) == 2
    assert "--out:" in one_error_line(capsys) and (prepared / MANIFEST).read_bytes() == before
    assert prepare_cli(txt, prepared, "--seq-len", 16, "--overwrite") == 0
    assert json.loads((prepared / MANIFEST).read_text())["seq_len"] == 16
    assert not list(tmp_path.glob(".prepared.*"))


@pytest.mark.parametrize("flags, match", [
    (["--seq-len", 0], "--seq-len: expected a positive integer"),
    (["--heldout-fraction", 0.7], "--heldout-fraction: expected a fraction"),
    (["--shard-size", "lots"], "--shard-size:"),
    (["--tokenizer", "./no/such/tok"], "--tokenizer: no such tokenizer directory: ./no/such/tok"),
])
def test_prepare_errors_name_the_flag(tmp_path, txt, capsys, flags, match):
    assert prepare_cli(txt, tmp_path / "out", *flags) == 2
    assert match in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_inspect_prints_counts_tokenizer_sample_and_check(prepared, capsys):
    assert main(["data", "inspect", str(prepared), "--row", "2"]) == 0
    out = capsys.readouterr().out
    corpus = open_corpus(prepared)
    m = corpus.manifest
    assert "documents  60: 54 train, 6 held out (seed 0" in out
    assert f"rows       {m['rows']['train']} train / {m['rows']['heldout']} held out of 32 tokens, uint16" in out
    assert f"tokenizer  trained BPE (vocab_size=300), 300 ids, separator 1, mask 2, sha256 {m['tokenizer']['sha256'][:16]}" in out
    assert "check      all 4 files match their size; sha256 last verified on this machine" in out
    assert f"sample     train row 2: {corpus.tokenizer.decode(corpus.train[2].tolist())!r}" in out
    assert main(["data", "inspect", str(prepared), "--verify"]) == 0
    assert "all 4 files match their size and sha256" in capsys.readouterr().out
    assert main(["data", "inspect", str(prepared.parent)]) == 2
    assert "DIR:" in one_error_line(capsys)


# --------------------------------------------------------------------------- streaming


def jsonl_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(20, 60))) for i in range(n)]


def test_streamed_source_holds_out_by_document_and_stops_early(tmp_path):
    docs = jsonl_docs(300)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    cfg = cfg_for(path, text_field="body", streaming=True, max_documents=200, heldout_max_documents=10)
    m = prepare_corpus(cfg, tmp_path / "out", seed=3)
    assert m["split"]["method"] == "hash" and m["source"]["streaming"]
    assert m["documents"]["train"] + m["documents"]["heldout"] == 200
    assert m["documents"]["heldout"] == 10  # 0.1 of 200 would be ~20: the bound holds
    corpus = open_corpus(tmp_path / "out")
    tok = corpus.tokenizer

    def decoded_docs(rows):
        text = tok.decode(rows[:].flatten().tolist())
        return [d.strip() for d in text.split("[EOS]")[1:-1]]  # complete documents only

    held, train = set(decoded_docs(corpus.heldout)), set(decoded_docs(corpus.train))
    assert held and train and not held & train and held | train <= set(docs[:200])
    again = prepare_corpus(cfg, tmp_path / "again", seed=3)
    assert again["files"] == m["files"]  # deterministic: the same stream gives the same corpus


def test_hub_dataset_is_streamed_and_max_documents_stops_the_stream(tmp_path, monkeypatch):
    docs, pulled, calls = jsonl_docs(1000), [], []

    def rows():
        for d in docs:
            pulled.append(d)
            yield {"text": d, "id": len(pulled)}

    def fake_load_dataset(name, **kwargs):  # the hub is unreachable here; this is its boundary
        calls.append((name, kwargs))
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    m = prepare_corpus(cfg_for("someone/corpus", streaming=True, max_documents=50, hub_split="validation"),
                tmp_path / "out", seed=0)
    assert [(name, kw["split"], kw["streaming"]) for name, kw in calls] == [("someone/corpus", "validation", True)]
    assert m["documents"]["train"] + m["documents"]["heldout"] == 50
    assert len(pulled) < 200  # two passes (tokenizer, then rows) over the first 50 documents, not all 1000
    assert m["source"]["identity"] == {"kind": "hub", "name": "someone/corpus"}


# --------------------------------------------------------------------------- ranks


def test_other_ranks_map_what_rank_0_prepared_and_never_prepare(tmp_path, txt):
    run_tok = tmp_path / "run" / "tokenizer"
    with pytest.raises(UserError, match=r"data.source: no prepared copy of .* GROW_CACHE_DIR must be shared"):
        load_corpus(cfg_for(txt), run_tok, seed=0, log=lambda s: None, prepare_missing=False)
    assert not (tmp_path / "grow-cache" / "prepared").exists()
    rank0 = load_corpus(cfg_for(txt), run_tok, seed=0, log=lambda s: None)
    rank1 = load_corpus(cfg_for(txt), run_tok, seed=0, log=lambda s: None, prepare_missing=False)
    assert rank1.directory == rank0.directory
    assert rank1.train.arrays[0].filename == rank0.train.arrays[0].filename
    assert len(list((tmp_path / "grow-cache" / "prepared").iterdir())) == 1

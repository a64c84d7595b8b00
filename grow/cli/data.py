"""``grow data prepare`` and ``grow data inspect``: corpora as memory-mapped token shards."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from grow.errors import UserError


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare a corpus as memory-mapped token shards; inspect one",
                       description="Corpora at scale: `grow data prepare` tokenizes a source once into packed, "
                       "memory-mapped token rows that `grow train` reads with data.source: DIR on every rank; "
                       "`grow data inspect` describes and checks such a directory.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("prepare", help="tokenize SOURCE into packed .npy token shards + manifest",
                            description="Read SOURCE, hold out documents, fit or load the tokenizer, tokenize in "
                            "parallel, pack rows of --seq-len tokens and write them as .npy shards (uint16 below "
                            "65,536 ids) with the tokenizer and a manifest (counts, tokenizer hash, sha256 of every "
                            "file) written last. Each flag sets the data.* field of the same name.")
    q.add_argument("source", metavar="SOURCE", help="'bible', a .txt/.jsonl/.json/.parquet file, a saved dataset "
                   "directory, a directory of data files or a hub dataset name")
    q.add_argument("--out", required=True, metavar="DIR", help="directory to write (written whole, then renamed)")
    q.add_argument("--tokenizer", default="train", metavar="train|PATH", help="'train' (fit a byte-level BPE on "
                   "the training documents, default) or a tokenizer directory / hub id with a mask token")
    q.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="vocabulary of a trained tokenizer "
                   "(default 4096)")
    q.add_argument("--seq-len", type=int, default=128, metavar="N", help="tokens per row (default 128)")
    q.add_argument("--text-field", default="text", metavar="NAME", help="column with the text (default text)")
    q.add_argument("--hub-split", default="train", metavar="NAME", help="split of a hub/saved dataset (default train)")
    q.add_argument("--streaming", action="store_true", help="read the source lazily (datasets streaming=True)")
    q.add_argument("--max-documents", type=int, metavar="N", help="use only the first N non-empty documents")
    q.add_argument("--heldout-fraction", type=float, default=0.02, metavar="F", help="fraction of documents held "
                   "out (default 0.02)")
    q.add_argument("--heldout-max-documents", type=int, default=1000, metavar="N", help="at most N held-out "
                   "documents (default 1000)")
    q.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the held-out choice (default 0; "
                   "grow train uses train.seed for a raw source)")
    q.add_argument("--num-proc", type=int, metavar="N", help="tokenizer processes (default: one per CPU core; "
                   "small sources are tokenized in process)")
    q.add_argument("--shard-size", default="512MiB", metavar="SIZE", help="largest shard (default 512MiB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    q = data_sub.add_parser("inspect", help="counts, tokenizer, a decoded row and the manifest check of DIR",
                            description="Describe a prepared directory from its manifest, check every file's size "
                            "(and with --verify its sha256) and decode one training row. Exit code 1 when a file "
                            "does not match the manifest.")
    q.add_argument("dir", metavar="DIR", help="a directory written by grow data prepare")
    q.add_argument("--verify", action="store_true", help="hash every file against the manifest")
    q.add_argument("--row", type=int, default=0, metavar="I", help="training row to decode (default 0)")


def cmd_data(args: argparse.Namespace) -> int | None:
    return {"prepare": cmd_data_prepare, "inspect": cmd_data_inspect}[args.data_command](args)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from grow.config import DataConfig
    from grow.data import prepare_corpus
    from grow.units import parse_bytes

    start = time.perf_counter()
    try:
        cfg = DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         seq_len=args.seq_len, text_field=args.text_field, hub_split=args.hub_split,
                         streaming=args.streaming, max_documents=args.max_documents,
                         heldout_fraction=args.heldout_fraction, heldout_max_documents=args.heldout_max_documents,
                         num_proc=args.num_proc)
        try:
            shard_bytes = parse_bytes(args.shard_size)
        except ValueError as exc:
            raise UserError(f"--shard-size: {exc}") from None
        m = prepare_corpus(cfg, Path(args.out), seed=args.seed, shard_bytes=shard_bytes, overwrite=args.overwrite)
    except UserError as exc:
        raise UserError(_as_flag(str(exc))) from None
    seconds = time.perf_counter() - start
    tokens = m["tokens"]["train"] + m["tokens"]["heldout"]
    for line in _describe_corpus(Path(args.out), m):
        print(line)
    print(f"prepared in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s with {m['num_proc']} process(es))")


def _as_flag(message: str) -> str:
    """A DataConfig error names its field (data.seq_len); grow data prepare's user typed --seq-len."""
    import re

    match = re.match(r"data\.(\w+):", message)
    if match is None:
        return message
    flag = "SOURCE" if match[1] == "source" else "--" + match[1].replace("_", "-")
    return flag + message[match.end() - 1:]


def _describe_corpus(directory: Path, m: dict) -> list[str]:
    from grow.units import format_bytes

    src, tok, split = m["source"], m["tokenizer"], m["split"]
    docs, rows = m["documents"], m["rows"]
    size = sum(entry["bytes"] for entry in m["files"].values())
    origin = (f"trained BPE (vocab_size={tok['trained_vocab_size']})" if tok["origin"] == "trained"
              else tok["origin"])
    lines = [
        f"corpus     {directory} (format {m['format']} v{m['format_version']}, written {m['written_at']})",
        f"source     {src['name']} (field {src['text_field']!r}{', streamed' if src['streaming'] else ''}"
        f"{', first ' + str(src['max_documents']) + ' documents' if src['max_documents'] else ''})",
        f"documents  {docs['train'] + docs['heldout']:,}: {docs['train']:,} train, {docs['heldout']:,} held out "
        f"(seed {split['seed']}, fraction {split['heldout_fraction']}, at most {split['heldout_max_documents']:,}, "
        f"by {split['method']})",
        f"tokens     {m['tokens']['train']:,} train, {m['tokens']['heldout']:,} held out (one separator per document)",
        f"rows       {rows['train']:,} train / {rows['heldout']:,} held out of {m['seq_len']} tokens, {m['dtype']}, "
        f"{len(m['shards']['train'])} + {len(m['shards']['heldout'])} shard(s), {format_bytes(size)}",
        f"tokenizer  {origin}, {tok['size']:,} ids, separator {tok['separator_id']}, mask {tok['mask_token_id']}, "
        f"sha256 {tok['sha256'][:16]}",
    ]
    if src.get("rows_without_text"):
        lines.append(f"warning    {src['rows_without_text']:,} rows without {src['text_field']!r} text were skipped "
                     f"(first at {src['first_without_text']})")
    return lines


def cmd_data_inspect(args: argparse.Namespace) -> int | None:
    from grow.data import TokenRows, load_tokenizer
    from grow.data.shards import problem, read_manifest, stamp_time, write_stamp

    directory = Path(args.dir)
    m = read_manifest(directory, "DIR")
    for line in _describe_corpus(directory, m):
        print(line)
    found = problem(directory, m, hashes=args.verify)
    if found is not None:
        print(f"check      FAILED: {found}")
        return 1
    if args.verify:
        write_stamp(directory)
        print(f"check      all {len(m['files'])} files match their size and sha256")
    else:
        when = stamp_time(directory)
        print(f"check      all {len(m['files'])} files match their size; sha256 "
              + (f"last verified on this machine at {when}" if when else
                 "not checked since the files last changed (--verify hashes every file; so does the next "
                 "grow train that uses them)"))
    train = TokenRows.open([directory / s["file"] for s in m["shards"]["train"]])
    if not 0 <= args.row < len(train):
        raise UserError(f"--row: expected 0..{len(train) - 1}, got {args.row}")
    text = load_tokenizer(directory / "tokenizer", "DIR").decode(train.rows([args.row])[0].tolist())
    print(f"sample     train row {args.row}: {text!r}")

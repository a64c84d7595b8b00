"""Pretrain a small causal Llama on the embedded corpus with transformers' own Trainer, so that
grow has a pretrained checkpoint to convert and adapt (docs/warm_start.md).

    python bench/pretrain_causal.py --out runs/causal-llama              # ~minutes on 2 CPU cores
    grow train configs/tiny-adapt.yaml --out runs/adapt --set model.init_from=runs/causal-llama

What it does, in order:
- reads the World English Bible through grow's own data pipeline and splits its documents
  exactly as ``grow train`` does for data.source: bible (same seed, heldout_fraction and cap),
  so the causal model never sees a document that grow later holds out for evaluation;
- fits a byte-level BPE on the training documents with [PAD] and [EOS] and *no* mask token
  (grow adds one when it converts the checkpoint);
- packs the training documents, EOS-separated, into rows of --seq-len tokens;
- trains ``LlamaForCausalLM`` (random init, untied head) for --steps optimizer steps with
  ``transformers.Trainer`` (AdamW, linear warmup, cosine decay) and
  ``DataCollatorForLanguageModeling(mlm=False)``;
- saves the model and tokenizer with save_pretrained into --out, plus pretrain.json (the
  settings, the loss curve, the held-out causal CE, the wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_tokenizer(texts, vocab_size: int):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[EOS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", eos_token="[EOS]")


def pack(tokenizer, texts: list[str], seq_len: int):
    import torch

    ids: list[int] = []
    for start in range(0, len(texts), 1000):
        for row in tokenizer(texts[start:start + 1000])["input_ids"]:
            ids += row + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the checkpoint (save_pretrained)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0, help="the split seed of grow train (train.seed) and the init seed")
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    from grow.config import DataConfig
    from grow.data.prepare import _Split  # grow's own document split, so held-out stays held out
    from grow.data.sources import read_documents

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    data = DataConfig(source="bible", seq_len=args.seq_len)  # heldout_fraction etc. at grow's defaults
    split = _Split(read_documents(data), data, args.seed)
    train_texts = [t for batch in split.docs.batches(split.parts["train"]) for t in batch]
    heldout_texts = [t for batch in split.docs.batches(split.parts["test"]) for t in batch]
    tokenizer = build_tokenizer(train_texts, args.vocab_size)
    train = pack(tokenizer, train_texts, args.seq_len)
    heldout = pack(tokenizer, heldout_texts, args.seq_len)
    print(f"data: {len(train_texts)} train / {len(heldout_texts)} held-out documents, {len(train)} / {len(heldout)} "
          f"rows of {args.seq_len}, vocab {len(tokenizer)} (no mask token)", flush=True)

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(512, args.seq_len),
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    rows = [{"input_ids": r} for r in train]
    out = Path(args.out)
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), weight_decay=0.0,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=max(1, args.steps // 20), save_strategy="no",
        report_to=[], use_cpu=True, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator)
    trainer.train()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]

    model.eval()
    with torch.no_grad():
        ce = [model(b, labels=b).loss.item() for b in heldout[:64].split(args.batch_size)]
    heldout_ce = sum(ce) / len(ce)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    record = {"args": vars(args), "parameters": sum(p.numel() for p in model.parameters()),
              "train_rows": len(train), "tokens_seen": args.steps * args.batch_size * args.seq_len,
              "losses": losses, "heldout_causal_ce": heldout_ce, "heldout_rows": min(64, len(heldout)),
              "seconds": round(seconds, 1), "transformers": transformers.__version__}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    import shutil

    shutil.rmtree(out / "trainer", ignore_errors=True)
    print(f"saved {out}: {record['parameters']:,} parameters, {record['tokens_seen']:,} tokens, held-out causal CE "
          f"{heldout_ce:.4f} (ppl {math.exp(heldout_ce):.1f}), {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

"""Unigram baselines for the local Bible cloze task (tests/tasks/bible_cloze.yaml).

What accuracy does word frequency alone get? Two baselines, both fitted on the chapters a
default bible run trains on (every chapter but the held-out ones the task is built from):

Both tasks: ``bible_cloze`` (other words of the chapter) and ``bible_cloze_matched`` (the
chapter's words nearest the answer in frequency).

- ``word``: pick the choice whose word is most frequent in the training chapters;
- ``token``: a unigram language model over a tokenizer's ids (add-one smoothed), scored the
  way lm-eval scores a multiple-choice continuation ``" " + choice``: ``acc`` takes the choice
  with the highest summed log-probability, ``acc_norm`` the highest per byte. Pass the run or
  export whose accuracy it is compared with (``--tokenizer RUN/tokenizer`` or ``EXPORT``).

    python bench/unigram_baseline.py [--tokenizer RUN/tokenizer] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "tasks"


def _task_builder():
    spec = importlib.util.spec_from_file_location("make_bible_cloze", TASKS / "make_bible_cloze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_chapters() -> list[str]:
    from grow.data.bible import bible_documents

    held = {i for i, _ in _task_builder().heldout_chapters()}
    return [text for i, text in enumerate(bible_documents()) if i not in held]


# task -> (field of its choices, field of the answer's index)
TASK_FIELDS = {"bible_cloze": ("choices", "label"), "bible_cloze_matched": ("matched_choices", "matched_label")}


def accuracy(labels: list[int], scores: list[list[float]]) -> float:
    """lm-eval's acc: the first highest-scored choice is the prediction."""
    hits = [max(range(len(s)), key=lambda j: (s[j], -j)) == label for label, s in zip(labels, scores)]
    return sum(hits) / len(hits)


def word_baseline(choices: list[list[str]], labels: list[int], chapters: list[str]) -> float:
    counts = Counter(w for text in chapters for w in text.split())
    return accuracy(labels, [[counts[c] for c in row] for row in choices])


def token_baseline(choices: list[list[str]], labels: list[int], chapters: list[str],
                   tokenizer_path: str) -> dict[str, float]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    counts: Counter[int] = Counter()
    for ids in tokenizer(chapters, add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    total, vocab = sum(counts.values()), len(tokenizer)

    def logp(text: str) -> float:
        return sum(math.log((counts[i] + 1) / (total + vocab)) for i in tokenizer(text, add_special_tokens=False)["input_ids"])

    scores = [[logp(" " + c) for c in row] for row in choices]
    per_byte = [[s / len((" " + c).encode()) for s, c in zip(row, words)] for row, words in zip(scores, choices)]
    return {"acc": accuracy(labels, scores), "acc_norm": accuracy(labels, per_byte)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer of the model compared (RUN/tokenizer or EXPORT)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args()
    docs = json.loads((TASKS / "bible_cloze.json").read_text())
    chapters = training_chapters()
    out: dict = {"documents": len(docs), "chance": 1 / len(docs[0]["choices"])}
    for task, (field, label) in TASK_FIELDS.items():
        choices, labels = [d[field] for d in docs], [d[label] for d in docs]
        out[task] = {"word_unigram_acc": word_baseline(choices, labels, chapters)}
        if args.tokenizer:
            token = token_baseline(choices, labels, chapters, args.tokenizer)
            out[task]["token_unigram_acc"], out[task]["token_unigram_acc_norm"] = token["acc"], token["acc_norm"]
    print(f"{len(docs)} documents, chance {out['chance']:.3f}")
    for task in TASK_FIELDS:
        print(f"{task}: " + ", ".join(f"{key} {value:.3f}" for key, value in out[task].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Write bible_cloze.json: next-word cloze items from chapters a default bible run never trains on.

The chapters are the held-out split ``grow`` makes of the bible with ``data.heldout_fraction``
0.02 and ``train.seed`` 0 (configs/tiny.yaml's values), so a model grown from that config is
scored on text it has not seen. Each item cuts one verse after a random word (at least
MIN_CONTEXT words in): the context is the verse up to the cut, with its verse number as the
corpus writes it ("12. And God said"). ``choices`` (task bible_cloze) are the true next word
and three other words of the same chapter with the same capitalisation, in random order.
``matched_choices`` (task bible_cloze_matched) are harder for word frequency alone: the three
words of the chapter whose frequency in the training chapters is nearest the answer's. Only
purely alphabetic words are used, so a choice is one whole word. ``chapter`` is the chapter's
position in ``grow.data.bible.bible_documents()``.

    python tests/tasks/make_bible_cloze.py   # rewrites tests/tasks/bible_cloze.json
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
import re
from pathlib import Path

ITEMS = 200
MIN_CONTEXT = 4
SEED = 0
VERSE = re.compile(r"(\d+)\. ")


def heldout_chapters(seed: int = 0, fraction: float = 0.02) -> list[tuple[int, str]]:
    """(index, text) of the chapters grow holds out of the bible at this seed and fraction."""
    from grow.config import DataConfig
    from grow.data.bible import bible_documents
    from grow.data.prepare import _Split
    from grow.data.sources import read_documents

    cfg = DataConfig(source="bible", heldout_fraction=fraction)
    held = _Split(read_documents(cfg), cfg, seed).parts["test"]["text"]
    index = {text: i for i, text in enumerate(bible_documents())}
    return sorted((index[text], text) for text in held)


def verses(chapter: str) -> list[tuple[str, str]]:
    """(number, text) of each verse of a chapter."""
    parts = VERSE.split(chapter)
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def build(items: int = ITEMS, seed: int = SEED) -> list[dict]:
    from grow.data.bible import bible_documents

    rng = random.Random(seed)
    held = heldout_chapters()
    skip = {i for i, _ in held}
    counts = Counter(w for i, text in enumerate(bible_documents()) if i not in skip for w in text.split())
    candidates = []
    for chapter_index, chapter in held:
        words = sorted({w for _, text in verses(chapter) for w in text.split() if w.isalpha()})
        for number, text in verses(chapter):
            tokens = text.split()
            cuts = [j for j in range(MIN_CONTEXT, len(tokens)) if tokens[j].isalpha()]
            if cuts:
                candidates.append((chapter_index, number, text, tokens, cuts, words))
    rng.shuffle(candidates)
    out = []
    for chapter_index, number, text, tokens, cuts, words in candidates[:items]:
        j = rng.choice(cuts)
        answer = tokens[j]
        # same capitalisation as the answer, so case alone does not give it away mid-sentence
        others = [w for w in words if w.lower() != answer.lower() and w[0].isupper() == answer[0].isupper()]
        choices = rng.sample(others, 3) + [answer]
        rng.shuffle(choices)
        # the three words whose training frequency is nearest the answer's (ties broken at random)
        log_count = lambda w: math.log1p(counts[w])  # noqa: E731
        nearest = sorted(others, key=lambda w: (abs(log_count(w) - log_count(answer)), rng.random()))[:3]
        matched = nearest + [answer]
        rng.shuffle(matched)
        out.append({"chapter": chapter_index, "verse": f"{number}. {text}",
                    "context": f"{number}. " + " ".join(tokens[:j]), "choices": choices,
                    "label": choices.index(answer), "matched_choices": matched,
                    "matched_label": matched.index(answer)})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("bible_cloze.json")
    data = build()
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(data)} items to {path}")

"""How noisy is the harness's Monte Carlo log-likelihood, per variance-reduction choice?

For the first N held-out verses of tests/tasks/bible_cloze.json, the continuation is the
verse's last W words and the context the words before them. Each (counts, masks) choice of
``grow.harness`` scores every request with ``mc_num`` draws under S seeds; the table gives,
averaged over requests, the mean estimate (nats; all choices estimate the same bound, so the
means should agree) and its standard deviation across seeds (lower is better).

    python bench/harness_variance.py RUN_OR_EXPORT [--mc-num 8] [--seeds 6] [--requests 24]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from grow.harness import COUNTS, MASKS, GrowLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="RUN_OR_EXPORT")
    parser.add_argument("--mc-num", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--words", type=int, default=6, help="words in each continuation")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    docs = json.loads((ROOT / "tests" / "tasks" / "bible_cloze.json").read_text())[: args.requests]
    texts = [d["verse"].split() for d in docs]
    rows = []
    for counts, masks in itertools.product(COUNTS, MASKS):
        values = []
        start = time.perf_counter()
        for seed in range(args.seeds):
            lm = GrowLM(path=args.model, mc_num=args.mc_num, seed=seed, counts=counts, masks=masks, device="cpu")
            pairs = [lm._encode_pair(" ".join(w[: -args.words]), " " + " ".join(w[-args.words:])) for w in texts]
            values.append([v for v, _ in lm.score_tokens(pairs)])
        per_request = list(zip(*values))
        rows.append({"counts": counts, "masks": masks,
                     "mean": statistics.mean(statistics.mean(v) for v in per_request),
                     "std": statistics.mean(statistics.stdev(v) for v in per_request),
                     "seconds": time.perf_counter() - start})
        r = rows[-1]
        print(f"{counts:>10} {masks:>11}  mean {r['mean']:8.3f}  std across seeds {r['std']:6.3f}  "
              f"({r['seconds']:.1f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

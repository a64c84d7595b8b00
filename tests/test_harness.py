"""The lm-evaluation-harness model (``--model grow``), end to end through the real harness.

A 2-block, width-32 model is grown in seconds on a corpus that cycles through a fixed list of
words (so word order is learnable in a hundred steps) and exported. Tasks are the local YAMLs in
tests/tasks/ over held-out Bible verses; lm-eval runs them (nothing of it is mocked) and the
tests read its results dict.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the eval extra: pip install -e .[eval]")

from conftest import tiny_overrides  # noqa: E402

TASKS = Path(__file__).parent / "tasks"
CYCLE = ("in the beginning god created the heavens and earth then light was good evening morning day "
         "waters under sky").split()


def write_cycle_corpus(path: Path, n_docs: int = 80, seed: int = 0) -> str:
    """Documents of 60 words, each a stretch of CYCLE (repeating) from a random start."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start = rng.randrange(len(CYCLE))
        docs.append(" ".join(CYCLE[(start + j) % len(CYCLE)] for j in range(60)))
    path.write_text("\n".join(docs) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("harness")
    from grow.cli import main

    corpus = write_cycle_corpus(base / "corpus.txt")
    # block 2 (the lightest level, which also learns the embedding and head) gets the steps
    sets = ["train.batch_size=8", "train.lr=0.003", "train.steps=[20,100]", "model.max_position_embeddings=128",
            "data.seq_len=48"]
    args = ["train", "configs/tiny.yaml", "--out", str(base / "run"), *tiny_overrides(corpus, blocks=2, steps=40)]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    return base / "run"


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    from grow.export import export_run

    out = tmp_path_factory.mktemp("harness-export") / "model"
    export_run(run, out, log=lambda s: None)
    return out


def evaluate(path, tasks="bible_cloze.yaml", limit=6, **model_args):
    from grow.harness import evaluate_tasks

    args = {"mc_num": 4, "batch_size": 16, **model_args}
    return evaluate_tasks(str(path), ",".join(str(TASKS / t) for t in tasks.split(",")), limit=limit,
                          device="cpu", log_samples=True, **args)


def per_choice(results, task="bible_cloze"):
    """The harness's per-request values, [(doc_id, [loglikelihood of each choice])]."""
    return [(s["doc_id"], [r[0][0] for r in s["resps"]]) for s in results["samples"][task]]


def test_cloze_through_the_harness_is_deterministic_and_the_same_on_the_export(run, export):
    first = evaluate(run)
    acc = first["results"]["bible_cloze"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert first["n-samples"]["bible_cloze"]["effective"] == 6
    scores = per_choice(first)
    assert len(scores) == 6 and all(len(v) == 4 for _, v in scores)
    assert all(x < 0 for _, v in scores for x in v)  # a bound on a log-probability
    again = evaluate(run)
    assert per_choice(again) == scores
    assert again["results"]["bible_cloze"]["acc,none"] == acc
    # the export is the same function: same draws, same values up to float rounding
    exported = evaluate(export)
    for (d1, a), (d2, b) in zip(scores, per_choice(exported)):
        assert d1 == d2 and a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert exported["results"]["bible_cloze"]["acc,none"] == acc
    # another seed draws other masks
    assert per_choice(evaluate(run, seed=1)) != scores


def test_one_token_continuation_is_exact(run):
    """With one continuation token every draw masks it: the value is log p(token | context), exactly."""
    import torch

    from grow.harness import GrowLM

    lm = GrowLM(path=str(run), mc_num=8, batch_size=4, device="cpu")
    ctx = lm._encode("in the beginning god")
    token = lm._encode(" created")[:1]
    (value, _), = lm.score_tokens([(ctx, token)])
    ids = torch.tensor([[lm.sep, *ctx, lm.loaded.mask_id]])
    first, last = lm._blocks(1 / ids.shape[1])
    with torch.no_grad():
        logits = lm.model(ids, start=first, end=last)
    assert value == pytest.approx(float(torch.log_softmax(logits[0, -1].double(), -1)[token[0]]), abs=1e-6)


def test_level_paths_and_whole_stack(run):
    from grow.harness import GrowLM

    lm = GrowLM(path=str(run), mc_num=2, device="cpu")
    assert lm.stack == "level" and lm.loaded.paths  # grown right to left: tied to depth
    r1, r2 = lm.loaded.ratios
    assert lm._blocks(r1) == lm.loaded.level_path(1) == (1, 2)
    assert lm._blocks(r2) == lm.loaded.level_path(2) == (2, 2)
    assert GrowLM(path=str(run), mc_num=2, device="cpu", stack="whole")._blocks(r2) == (None, None)


def test_true_continuation_beats_a_shuffled_one(run):
    """The model has learnt the corpus' word order: the bound prefers the true next six words to
    the same words shuffled (a bag-of-words model could not tell them apart)."""
    from grow.harness import GrowLM

    lm = GrowLM(path=str(run), mc_num=16, batch_size=64, device="cpu")
    rng = random.Random(0)
    margins = []
    for start in range(0, len(CYCLE), 3):
        words = [CYCLE[(start + j) % len(CYCLE)] for j in range(10)]
        context, rest = " ".join(words[:4]), words[4:]
        mixed = rest[:]
        while mixed == rest:
            rng.shuffle(mixed)
        (true, _), (shuffled, _) = lm.score_tokens([lm._encode_pair(context, " " + " ".join(w)) for w in (rest, mixed)])
        margins.append(true - shuffled)
    assert sum(margins) / len(margins) > 1.0  # nats
    assert sum(m > 0 for m in margins) >= len(margins) - 1


@pytest.mark.parametrize("counts,masks", [("antithetic", "nested"), ("iid", "independent")])
def test_mask_draws(counts, masks):
    import numpy as np

    from grow.harness import mask_draws

    draws = mask_draws(7, 10, np.random.default_rng(0), counts, masks)
    assert len(draws) == 10 and all(1 <= len(d) <= 7 and set(d) <= set(range(7)) for d in draws)
    assert draws == mask_draws(7, 10, np.random.default_rng(0), counts, masks)
    if masks == "nested":  # every mask is a subset or superset of every other
        assert all(set(a) <= set(b) or set(b) <= set(a) for a in draws for b in draws)
    if counts == "antithetic":
        assert all(len(draws[i]) + len(draws[i + 1]) == 8 for i in range(0, 10, 2))


def test_stratified_counts_cover_every_level():
    import numpy as np

    from grow.harness import mask_draws

    sizes = sorted(len(d) for d in mask_draws(5, 10, np.random.default_rng(3)))
    assert sizes == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_rolling_and_generation_tasks(run):
    results = evaluate(run, "bible_verses.yaml,bible_continue.yaml", limit=3)
    ppl = results["results"]["bible_verses"]
    assert ppl["word_perplexity,none"] > 1 and ppl["bits_per_byte,none"] > 0
    outputs = [s["resps"][0][0] for s in results["samples"]["bible_continue"]]
    assert len(outputs) == 3
    assert all("." not in text and "\n" not in text for text in outputs)  # cut at `until`
    assert "exact_match,first_word" in results["results"]["bible_continue"]


@pytest.mark.parametrize("mode", ["depth", "suffix", "iterative", "semi-ar"])
def test_generation_honours_until_and_is_deterministic(run, mode):
    from lm_eval.api.instance import Instance

    from grow.harness import GrowLM

    lm = GrowLM(path=str(run), device="cpu", mode=mode, steps=4, block_length=5, temperature=1.0)

    def request(until):
        return Instance("generate_until", {}, ("in the beginning", {"until": until, "max_gen_toks": 12}), 0)

    full, = lm.generate_until([request([])])
    assert lm.generate_until([request([])]) == [full]  # the sampler's seed comes from (seed, prompt)
    text = full.strip()
    assert len(text) >= 4, full
    stop = text[len(text) // 2:][:2]  # a string the free generation contains: the same draw, cut there
    cut, = lm.generate_until([request(["zzz", stop])])
    assert cut == full[: full.index(stop)]


def test_grow_eval_tasks_prints_accuracy(run, tmp_path, capsys):
    from grow.cli import main

    out = tmp_path / "results.json"
    code = main(["eval", str(run), "--tasks", str(TASKS / "bible_cloze.yaml"), "--limit", "4", "--mc-num", "2",
                 "--device", "cpu", "--json", str(out)])
    assert code in (None, 0)
    printed = capsys.readouterr().out
    assert "bible_cloze" in printed and "acc" in printed
    assert "acc,none" in json.loads(out.read_text())["results"]["bible_cloze"]


def test_bad_model_args_are_one_line_errors(run, tmp_path):
    from grow.errors import UserError
    from grow.harness import GrowLM, task_manager_for

    with pytest.raises(UserError, match="mc_num"):
        GrowLM(path=str(run), mc_num=0)
    with pytest.raises(UserError, match="unknown option"):
        GrowLM(path=str(run), temprature=1.0)
    with pytest.raises(UserError, match="RUN_OR_EXPORT"):
        GrowLM(path=str(tmp_path))
    with pytest.raises(UserError, match="no task file"):
        task_manager_for(str(tmp_path / "missing.yaml"))


def test_grow_eval_tasks_errors_are_one_line(run, tmp_path, capsys):
    from grow.cli import main

    yaml = str(TASKS / "bible_cloze.yaml")
    for extra, message in [(["--levels"], "--tasks: runs lm-eval tasks"),
                           (["--mc-num", "0"], "mc_num: expected a positive integer")]:
        assert main(["eval", str(run), "--tasks", yaml, "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("grow: error:")] == [
            next(line for line in err.splitlines() if message in line)]
    assert main(["eval", str(run), "--tasks", str(tmp_path / "nope.yaml")]) == 2
    assert "no task file" in capsys.readouterr().err


def test_registered_with_the_harness(run):
    import lm_eval.api.registry

    import grow.harness

    assert lm_eval.api.registry.get_model("grow") is grow.harness.GrowLM
    lm = lm_eval.api.registry.get_model("grow").create_from_arg_string(
        f"path={run},mc_num=3,seed=5", {"batch_size": "8", "device": "cpu"})
    assert (lm.mc_num, lm.seed, lm.batch_size) == (3, 5, 8)


def test_a_joint_time_conditioned_run_runs_as_a_whole_stack(tmp_path):
    """No level paths (trained jointly on t ~ U(0, 1)) and the noise level as an input: the whole
    stack is run, given each draw's masked fraction; generation defaults to the iterative sampler."""
    from grow.cli import main
    from grow.harness import GrowLM

    corpus = write_cycle_corpus(tmp_path / "corpus.txt", n_docs=30)
    assert main(["train", "configs/tiny-joint-embedding.yaml", "--out", str(tmp_path / "run"),
                 *tiny_overrides(corpus, blocks=2, steps=3)]) == 0
    lm = GrowLM(path=str(tmp_path / "run"), mc_num=4, device="cpu")
    assert lm.loaded.paths is None and lm.loaded.time_input
    assert lm.stack == "whole" and lm.mode == "iterative"
    pairs = [lm._encode_pair("in the beginning", " god created the heavens")]
    (value, _), = lm.score_tokens(pairs)
    assert value < 0 and lm.score_tokens(pairs)[0][0] == value


def test_rolling_windows_cover_a_long_document_once(run):
    """A document longer than max_length is scored in windows: every token once, each window
    within max_length, later windows with half a window of context."""
    from lm_eval.api.instance import Instance

    from grow.harness import GrowLM

    lm = GrowLM(path=str(run), mc_num=2, device="cpu", max_length=16)
    text = " ".join(CYCLE * 3)
    seen = []
    score = lm.score_tokens

    def recording(pairs, **kw):
        seen.extend(pairs)
        return score(pairs, **kw)

    lm.score_tokens = recording
    total, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = lm._encode(text)
    assert [t for _, cont in seen for t in cont] == tokens
    assert len(seen) > 2 and all(len(c) + len(x) <= 16 for c, x in seen)
    assert all(len(c) >= 8 for c, _ in seen[1:])
    assert total == pytest.approx(sum(v for v, _ in score(seen, prepend=False)))


def test_after_a_final_whole_stack_stage_the_whole_stack_scores(tmp_path):
    """Growth alone: each draw runs its level's path; with a final stage over the whole stack at
    t ~ U(0, 1) the whole stack does, on the run and on its export (grow.json says so)."""
    from grow.cli import main
    from grow.export import export_run
    from grow.harness import GrowLM

    corpus = write_cycle_corpus(tmp_path / "corpus.txt", n_docs=30)
    assert main(["train", "configs/tiny.yaml", "--out", str(tmp_path / "run"),
                 *tiny_overrides(corpus, blocks=2, steps=2), "--set", "curriculum.final_steps=2"]) == 0
    export_run(tmp_path / "run", tmp_path / "export", log=lambda s: None)
    for path in ("run", "export"):
        lm = GrowLM(path=str(tmp_path / path), mc_num=2, device="cpu")
        assert lm.loaded.paths and lm.stack == "whole"
        assert GrowLM(path=str(tmp_path / path), mc_num=2, device="cpu", stack="level").stack == "level"


def test_replacement_noise_generates_but_has_no_masked_bound(tmp_path):
    """A model trained with uniform token replacement never saw [MASK]: generation tasks run with
    the refine sampler, log-likelihood requests are refused in one line."""
    from lm_eval.api.instance import Instance

    from grow.cli import main
    from grow.errors import UserError
    from grow.harness import GrowLM

    corpus = write_cycle_corpus(tmp_path / "corpus.txt", n_docs=30)
    assert main(["train", "configs/tiny-uniform.yaml", "--out", str(tmp_path / "run"),
                 *tiny_overrides(corpus, blocks=2, steps=2)]) == 0
    lm = GrowLM(path=str(tmp_path / "run"), mc_num=2, device="cpu")
    assert lm.mode == "refine"
    text, = lm.generate_until([Instance("generate_until", {}, ("in the", {"until": [], "max_gen_toks": 4}), 0)])
    assert isinstance(text, str)
    with pytest.raises(UserError, match="token replacement"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("in the", " beginning"), 0)])
    with pytest.raises(UserError, match="refine"):
        GrowLM(path=str(tmp_path / "run"), mode="iterative", device="cpu")

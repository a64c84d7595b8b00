"""EMA of the trained weights: the average by hand, exact resume with it on, what a stage commits,
and its cost in the plan."""

import pytest
import torch

from conftest import tiny_config
from grow.cli import main
from grow.engine import Ema
from grow.store import list_stages
from test_resume import assert_same_run, preempt_at, sets


def test_the_average_by_hand():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = Ema([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 2.0]))
    ema.update()  # n = 1: decay min(0.5, 2/11) = 2/11 -> 0 + 9/11 * 4
    assert torch.allclose(ema.shadow[0], torch.tensor([36 / 11, 10 + 9 / 11 * (2 - 10)]))
    for _ in range(20):
        ema.update()  # n >= 9: the configured decay 0.5 holds; converges to the parameter
    assert torch.allclose(ema.shadow[0], p.detach(), atol=1e-4)
    state = ema.state_dict()
    other = Ema([torch.nn.Parameter(torch.zeros(2))], decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 21 and torch.equal(other.shadow[0], ema.shadow[0])
    with torch.no_grad():
        p.copy_(torch.tensor([100.0, 100.0]))
    ema.apply()
    assert torch.equal(p.detach(), ema.shadow[0])


EMA = ("--set", "train.ema=true", "--set", "train.ema_decay=0.9")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


def test_preempted_and_resumed_with_ema_is_identical_and_commits_the_average(tmp_path, corpus, capsys):
    reference, plain, run = tmp_path / "ref", tmp_path / "plain", tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", "--out", str(reference), *sets(corpus, EMA)]) == 0
    assert main(["train", "configs/tiny.yaml", "--out", str(plain), *sets(corpus)]) == 0
    assert preempt_at(run, corpus, "stage-01-block02", 12, EMA) == 143
    assert main(["train", "configs/tiny.yaml", "--out", str(run), "--resume", *sets(corpus, EMA)]) == 0
    assert "resuming at step 12/" in capsys.readouterr().out
    assert_same_run(reference, run)  # weights, losses, held-out CE, files: bitwise
    # the committed stage is the average, not the last iterate (same losses, other weights)
    ref, base = list_stages(reference)[1], list_stages(plain)[1]
    assert ref.manifest["losses"] == base.manifest["losses"]
    w_ref, w_base = ref.weights(), base.weights()
    assert any(not torch.equal(w_ref[k], w_base[k]) for k in w_ref)
    assert ref.manifest["heldout_ce"] != base.manifest["heldout_ce"]


def test_plan_counts_the_average(corpus_file):
    from grow.plan import plan

    off = plan(tiny_config(corpus_file))
    on = plan(tiny_config(corpus_file, extra=["train.ema=true"]))
    for a, b in zip(off.stages, on.stages):
        assert b.ema == 4 * b.trainable_params and b.total == a.total + b.ema


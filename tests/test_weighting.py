"""Objective weightings (mean, LLaDA 1/t, MDLM ELBO): hand-computed cases, and per-row levels
that micro-batching cannot change."""

import math

import pytest
import torch

from conftest import tiny_config
from grow.curriculum import Noise, StageSpec
from grow.objective import Batch, MaskedDiffusionLoss, corrupted_positions, draw_levels, row_losses
from test_corruption import MASK, T, V, tiny_model


def test_row_losses_by_hand():
    ce_sum, count = torch.tensor([3.0, 4.0]), torch.tensor([3, 2])
    levels = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert row_losses(ce_sum, count, levels, 8, "mean").tolist() == [1.0, 2.0]
    # sum / (t T): 3 / (0.5 * 8) and 4 / (0.25 * 8)
    for weighting in ("llada", "elbo"):
        assert row_losses(ce_sum, count, levels, 8, weighting).tolist() == [0.75, 2.0]


def test_bernoulli_masking_for_the_one_over_t_weight_is_nested():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.8, 0.05, 0.6, 0.7]], dtype=torch.float64)
    levels = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # mean: ceil(0.5 * 4) = 2 lowest scores per row; llada/elbo: every score below t
    assert corrupted_positions(scores, levels, "mean").tolist() == [[True, True, False, False],
                                                                    [False, True, True, False]]
    assert corrupted_positions(scores, levels, "elbo").tolist() == [[True, True, True, False],
                                                                    [False, True, False, False]]
    lo, hi = (corrupted_positions(scores, torch.full((2,), r, dtype=torch.float64), "llada") for r in (0.25, 0.75))
    assert (lo <= hi).all()


def spec(lo=0.0, hi=1.0):
    return StageSpec(index=1, label="joint", first=1, last=2, train=(1, 2), adapters=(), trains_ends=True,
                     noise=Noise(lo, hi), steps=4)


def test_levels_per_weighting(corpus_file):
    base = ["curriculum.kind=joint", "curriculum.time=input", "train.batch_size=8"]
    elbo = draw_levels(spec(), tiny_config(corpus_file, extra=[*base, "objective.weighting=elbo"]), 3)
    gaps = elbo.sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8))  # low-discrepancy: one per 1/B stratum
    llada_cfg = tiny_config(corpus_file, extra=[*base, "objective.weighting=llada"])
    llada = draw_levels(spec(), llada_cfg, 3)
    assert ((0.15 <= llada) & (llada <= 0.99)).all() and len(set(llada.tolist())) == 8
    assert torch.equal(llada, draw_levels(spec(), llada_cfg, 3))  # a pure function of the step
    assert not torch.equal(llada, draw_levels(spec(), llada_cfg, 4))
    narrow = draw_levels(spec(0.5, 0.6), llada_cfg, 3)  # the stage's band cut to the range
    assert ((0.5 <= narrow) & (narrow <= 0.6)).all()


def zero_head_loss(corpus_file, weighting, levels, scores):
    """The objective on a model whose head predicts the uniform distribution: CE = log V everywhere."""
    cfg = tiny_config(corpus_file, extra=["curriculum.kind=joint", "curriculum.time=input",
                                          f"objective.weighting={weighting}"])
    model = tiny_model()
    torch.nn.init.zeros_(model.lm_head.weight)
    ids = torch.randint(MASK + 1, V, scores.shape, generator=torch.Generator().manual_seed(0))
    B = len(levels)
    batch = Batch(ids, scores, levels, torch.ones(B, dtype=torch.long), torch.full((B,), 2, dtype=torch.long))
    return MaskedDiffusionLoss(spec(), cfg, MASK)(model, batch).item()


def test_objective_applies_the_weight_by_hand(corpus_file):
    scores = torch.rand(2, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    levels = torch.tensor([0.5, 0.25], dtype=torch.float64)
    log_v = math.log(V)
    assert zero_head_loss(corpus_file, "mean", levels, scores) == pytest.approx(log_v, rel=1e-6)
    counts = [(scores[i] < levels[i]).sum().item() for i in range(2)]
    expected = sum(c * log_v / (float(t) * T) for c, t in zip(counts, levels)) / 2
    for weighting in ("llada", "elbo"):
        assert zero_head_loss(corpus_file, weighting, levels, scores) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weighting", ["mean", "elbo"])
def test_micro_batches_compute_the_same_loss_with_per_row_levels(corpus_file, weighting):
    cfg = tiny_config(corpus_file, extra=["curriculum.kind=joint", "curriculum.time=input",
                                          f"objective.weighting={weighting}", "train.batch_size=4"])
    model = tiny_model()
    scores = torch.rand(4, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids = torch.randint(MASK + 1, V, (4, T), generator=torch.Generator().manual_seed(4))
    levels = draw_levels(spec(), cfg, 0)
    one, two = torch.ones(4, dtype=torch.long), torch.full((4,), 2, dtype=torch.long)
    loss = MaskedDiffusionLoss(spec(), cfg, MASK)
    with torch.no_grad():
        whole = loss(model, Batch(ids, scores, levels, one, two))
        parts = [loss(model, Batch(ids[s], scores[s], levels[s], one[s], two[s])) for s in (slice(0, 2), slice(2, 4))]
    assert whole.item() == pytest.approx(sum(p.item() for p in parts) / 2, rel=1e-6)

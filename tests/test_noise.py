"""Forward process: schedules, deterministic nested masks, loss on masked tokens only."""

import math

import pytest
import torch

from grow.config import ScheduleConfig
from grow.noise import HELDOUT_SALT, corrupt, make_schedule, mask_scores, masked_ce, nested_mask


def test_generated_schedules_are_strictly_decreasing_in_range():
    for kind in ("linear", "cosine"):
        for L in (1, 2, 6, 80):
            r = make_schedule(ScheduleConfig(kind=kind, r_max=1.0, r_min=0.15), L)
            assert len(r) == L and all(0 < x <= 1 for x in r)
            assert all(a > b for a, b in zip(r, r[1:]))
            if L > 1:
                assert r[0] == 1.0 and r[-1] == 0.15


def test_explicit_schedule_is_used_verbatim():
    assert make_schedule(ScheduleConfig(ratios=[0.9, 0.3]), 2) == [0.9, 0.3]


def test_masks_are_nested_and_exact_in_count():
    scores = mask_scores(range(32), 100, seed=3)
    ratios = [1.0, 0.75, 0.55, 0.4, 0.25, 0.15, 0.01]
    masks = [nested_mask(scores, r) for r in ratios]
    for r, m in zip(ratios, masks):
        assert (m.sum(1) == math.ceil(round(r * 100, 9))).all()  # 0.55 * 100 is 55.00000000000001
    for heavy, light in zip(masks, masks[1:]):
        assert (light & ~heavy).sum() == 0  # light mask is a subset of the heavier one


def test_masks_are_deterministic_per_sample_and_seed():
    a = mask_scores([5, 6, 7], 50, seed=0)
    b = mask_scores([7, 5], 50, seed=0)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])  # depends on the key, not the batch
    assert not torch.equal(a, mask_scores([5, 6, 7], 50, seed=1))
    assert not torch.equal(a, mask_scores([5, 6, 7], 50, seed=0, salt=HELDOUT_SALT))


def test_corrupt_and_loss_only_on_masked_positions():
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (4, 20))
    mask = nested_mask(mask_scores(range(4), 20, seed=0), 0.3)
    x = corrupt(ids, mask, mask_token_id=2)
    assert torch.equal(x[~mask], ids[~mask]) and (x[mask] == 2).all()
    logits = torch.randn(4, 20, 50)
    loss = masked_ce(logits, ids, mask)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100  # unmasked logits do not matter
    assert loss == masked_ce(changed, ids, mask)
    changed[mask] += torch.randn_like(changed[mask])
    assert loss != masked_ce(changed, ids, mask)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[mask], ids[mask]))


@pytest.mark.parametrize("ratio", [1e-4, 0.5, 1.0])
def test_at_least_one_token_is_masked(ratio):
    assert nested_mask(mask_scores([0], 8, seed=0), ratio).sum() >= 1

"""Corruptions (mask, gaussian, uniform): nested and reproducible at every level; where the loss
is; the refine sampler; combinations refused in one line."""

import pytest
import torch
from transformers import EuroBertConfig

from conftest import tiny_overrides
from grow.cli import main
from grow.config import load_config
from grow.corruption import Corruption, Gaussian, Rows, Uniform, corruption_named, rows_of
from grow.errors import UserError
from grow.model import GrowModel
from grow.noise import TRAIN_SALT, mask_scores, nested_mask

V, T, MASK = 50, 24, 3
KEYS = (7, 123, 4096)


def tiny_model(hook: Corruption | None = None) -> GrowModel:
    config = EuroBertConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                            mask_token_id=MASK, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GrowModel(config)
    for k in (1, 2):
        model.set_block(k, model.new_block(k))
    model.init_ends()
    if hook is not None:
        hook.install(model)
    return model.eval()


def sample(levels, rows=Rows(KEYS, 0, TRAIN_SALT)):
    ids = torch.randint(MASK + 1, V, (len(rows.keys), T), generator=torch.Generator().manual_seed(1))
    scores = mask_scores(rows.keys, T, rows.seed, rows.salt)
    return ids, [nested_mask(scores, r) for r in levels]


@pytest.mark.parametrize("corruption", [Corruption(), Uniform()], ids=lambda c: c.name)
def test_token_corruptions_are_nested_and_the_same_sample_at_every_level(corruption):
    rows = Rows(KEYS, 0, TRAIN_SALT)
    levels = (0.2, 0.5, 0.9)
    ids, masks = sample(levels, rows)
    outs = [corruption.corrupt(ids, m, rows, MASK, V) for m in masks]
    for lo in range(len(levels)):
        for hi in range(lo + 1, len(levels)):
            assert (masks[lo] <= masks[hi]).all()  # the set at r is a subset of the set at r' > r
            # the same sample: wherever r corrupts, r' holds the very same token
            assert torch.equal(outs[lo][masks[lo]], outs[hi][masks[lo]])
    for m, x in zip(masks, outs):
        assert torch.equal(x[~m], ids[~m])  # nothing outside the mask changes
        assert torch.equal(x, corruption.corrupt(ids, m, rows, MASK, V))  # deterministic
    if corruption.replaces_tokens:
        x = outs[-1]
        assert not (x == MASK).any() and ((0 <= x) & (x < V)).all()
        assert (x[masks[-1]] != ids[masks[-1]]).float().mean() > 0.8  # really random tokens
        # another seed or key gives other tokens
        other = corruption.corrupt(ids, masks[-1], Rows(KEYS, 1, TRAIN_SALT), MASK, V)
        assert not torch.equal(other, x)
        assert corruption.loss_positions(masks[0]).all()  # loss on every token
    else:
        assert (outs[-1][masks[-1]] == MASK).all()
        assert torch.equal(corruption.loss_positions(masks[0]), masks[0])


def test_gaussian_inputs_are_keyed_noise_nested_across_levels():
    rows = Rows(KEYS, 0, TRAIN_SALT)
    model, plain = tiny_model(Gaussian(std=1.0)), tiny_model()
    ids, (m_lo, m_hi) = sample((0.3, 0.8), rows)
    corruption = Gaussian()
    x_lo, x_hi = (corruption.corrupt(ids, m, rows, MASK, V) for m in (m_lo, m_hi))
    with torch.no_grad(), rows_of(rows):
        e_lo, e_hi = model.embed(x_lo), model.embed(x_hi)
        again = model.embed(x_lo)
    with torch.no_grad(), rows_of(Rows(KEYS, 1, TRAIN_SALT)):
        other_seed = model.embed(x_lo)
    with torch.no_grad():
        clean, masked_plain = plain.embed(ids), plain.embed(x_lo)
    assert torch.equal(e_lo, again)
    assert torch.equal(e_lo[~m_lo], clean[~m_lo])  # untouched positions: the token's embedding
    assert torch.equal(e_lo[m_lo], e_hi[m_lo])  # the same noise at a position at every level
    assert not torch.allclose(e_lo[m_lo], masked_plain[m_lo])  # not the [MASK] embedding
    assert not torch.allclose(other_seed[m_lo], e_lo[m_lo])
    table_rms = model.embed_tokens.weight.detach().float().pow(2).mean().sqrt()
    assert e_lo[m_lo].float().pow(2).mean().sqrt() == pytest.approx(float(table_rms), rel=0.25)
    # rows taken out of a batch keep their own noise (the objective embeds row groups)
    with torch.no_grad(), rows_of(rows.select(torch.tensor([False, True, True]))):
        part = model.embed(x_lo[1:])
    assert torch.equal(part, e_lo[1:])


def test_heldout_ce_of_replacement_noise_is_on_every_token():
    from grow.evaluate import heldout_ce

    heldout = torch.randint(MASK + 1, V, (6, T), generator=torch.Generator().manual_seed(2))
    seen = []

    def uniform_logits(x, t):  # the uniform distribution: CE log V at every position counted
        seen.append(x)
        return torch.zeros(*x.shape, V)

    kw = dict(mask_token_id=MASK, seed=0, batch_size=3, batches=2, vocab_size=V)
    ce = heldout_ce(uniform_logits, heldout, 0.5, corruption=Uniform(), **kw)
    assert ce == pytest.approx(torch.log(torch.tensor(float(V))).item())
    assert not (seen[0] == MASK).any() and (seen[0] != heldout[:3]).any()


def test_refine_changes_tokens_it_already_decoded():
    from grow.sample import generate, refine

    model = tiny_model(Uniform())
    prompt = torch.tensor([[5, 6, 7]] * 2)
    g = torch.Generator().manual_seed(0)
    result = refine(model, prompt, 12, mask_id=MASK, steps=6, temperature=1.0, generator=g)
    assert result.tokens.shape == (2, 15) and torch.equal(result.tokens[:, :3], prompt)
    assert not (result.generated == MASK).any()
    # replay: a position that took a predicted token (not re-noised) at one step is changed by a
    # later step's prediction (again not a re-noise) -- the self-correction of replacement noise
    decoded, corrected = {}, 0
    for entry in result.trace:
        for pos, tok in zip(entry["positions"][0], entry["tokens"][0]):
            if pos in entry["renoised"][0]:
                decoded.pop(pos, None)
                continue
            if pos in decoded and decoded[pos] != tok:
                corrected += 1
            decoded[pos] = tok
    assert corrected > 0
    assert result.trace[-1]["renoised"] == [[], []]  # the last step keeps every prediction
    # the replay from the random start reproduces the result (what --show animates)
    from grow.sample import frames

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    assert frames(result, Tok(), MASK)[-1] == Tok().decode(result.tokens[0].tolist())
    again = generate(model, prompt, 12, "refine", mask_id=MASK, steps=6, temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, result.tokens)


@pytest.mark.parametrize("sets, match", [
    (["objective.corruption=uniform", "curriculum.time=depth"], "objective.corruption: uniform replaces tokens"),
    (["objective.weighting=elbo", "curriculum.time=depth"], "objective.weighting: elbo weights each row by 1/t"),
    (["objective.weighting=llada", "objective.corruption=uniform", "curriculum.time=input"],
     "objective.weighting: llada is the absorbing-state bound"),
    (["objective.llada_range=[0.5, 0.2]"], "objective.llada_range"),
    (["objective.gaussian_std=0"], "objective.gaussian_std"),
    (["objective.corruption=duo2"], "objective.corruption: expected one of"),
    (["train.ema=true", "train.deepspeed=ds_configs/zero2.json"], "train.ema: not supported with --deepspeed"),
    (["train.ema_decay=1.0"], "train.ema_decay"),
])
def test_impossible_combinations_are_refused_in_one_line(sets, match):
    with pytest.raises(UserError, match=match) as info:
        load_config("configs/tiny.yaml", sets)
    assert "\n" not in str(info.value)


def test_export_refuses_a_gaussian_run_and_sampling_refuses_the_wrong_sampler(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/tiny-gaussian.yaml", "--out", str(run), *tiny_overrides(corpus_file, steps=2)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "gaussian input noise" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert main(["sample", str(run), "--mode", "refine", "--length", "6"]) == 2
    assert "refine starts from random tokens" in capsys.readouterr().err
    assert main(["sample", str(run), "--mode", "suffix", "--length", "6", "--seed", "3"]) == 0


def test_corruption_named():
    assert [corruption_named(n).name for n in ("mask", "gaussian", "uniform")] == ["mask", "gaussian", "uniform"]


def test_duo_flips_are_nested_keyed_and_as_many_as_the_level():
    from grow.corruption import Duo, duo_weight

    duo, rows = Duo(), Rows(tuple(range(40)), 0, TRAIN_SALT)
    ids = torch.randint(MASK + 1, V, (40, T), generator=torch.Generator().manual_seed(5))
    outs = {r: duo.corrupt(ids, None, rows, MASK, V, levels=torch.full((40,), r, dtype=torch.float64))
            for r in (0.1, 0.4, 0.8)}
    flips = {r: x != ids for r, x in outs.items()}
    for lo, hi in ((0.1, 0.4), (0.4, 0.8)):
        assert (flips[lo] <= flips[hi]).all()  # nested in the noise
        assert torch.equal(outs[lo][flips[lo]], outs[hi][flips[lo]])  # the same replacement token
    for r, f in flips.items():  # the level is the expected flipped fraction (x (V-1)/V)
        assert f.float().mean().item() == pytest.approx(r * (V - 1) / V, abs=0.04)
        assert not (outs[r] == MASK).any()
    assert torch.equal(outs[0.4], duo.corrupt(ids, None, rows, MASK, V, levels=torch.full((40,), 0.4)))
    w = duo_weight(torch.tensor([0.0, 0.3, 0.6, 1.0]), V)
    assert (w.diff() > 0).all()
    scale = duo.row_scale(torch.tensor([0.0, 0.3, 0.6, 1.0]), V)
    assert scale[0] == pytest.approx(1.0, abs=1e-2) and (scale.diff() < 0).all() and scale[-1] < 0.1


def test_duo_soft_tokens_anneal_to_the_hard_ones():
    from grow.corruption import Duo

    duo, rows, model = Duo(temperature=(1.0, 1e-6)), Rows(KEYS, 0, TRAIN_SALT), tiny_model()
    ids = torch.randint(MASK + 1, V, (3, T), generator=torch.Generator().manual_seed(6))
    levels = torch.full((3,), 0.5, dtype=torch.float64)
    hard = duo.corrupt(ids, None, rows, MASK, V, levels=levels)
    with torch.no_grad():
        late, early = (duo.soft_inputs(model, ids, rows, levels, p) for p in (1.0, 0.0))
        embedded = model.embed(hard)
    assert torch.allclose(late, embedded, atol=1e-5)  # temperature 1e-6: the argmax token
    assert not torch.allclose(early, embedded, atol=1e-3)  # temperature 1: a spread of tokens


def test_duo_symmetric_kl_by_hand():
    import math

    from grow.corruption import Duo

    eps = 0.1
    duo = Duo(smoothing=eps)
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    q = torch.tensor([1 - eps + eps / 2, eps / 2])  # (0.95, 0.05), target token 0
    p = torch.tensor([0.75, 0.25])
    expected = (q * (q / p).log()).sum() + (p * (p / q).log()).sum()
    assert duo.position_losses(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_replacement_run_evaluates_on_every_token_exports_and_refines(tmp_path, corpus_file, capsys):
    import json

    run, hf = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "configs/tiny-duo.yaml", "--out", str(run), *tiny_overrides(corpus_file, steps=2)]) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", str(run), "--samples", "1", "--steps", "3", "--data", corpus_file, "--json", str(report)]) == 0
    assert "does not apply to replacement noise" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["elbo"] is None and list(data["samples"]) == ["refine"]
    assert main(["export", str(run), "--out", str(hf)]) == 0
    meta = json.loads((hf / "grow.json").read_text())
    assert meta["corruption"] == "duo" and meta["sampling"]["mode"] == "refine"
    capsys.readouterr()
    assert main(["sample", str(hf), "--mode", "refine", "--length", "6", "--steps", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["trace"]) == 3 and len(record["details"]["start"][0]) == 6
    assert main(["sample", str(hf), "--mode", "iterative", "--length", "6"]) == 2


def test_plan_runs_the_head_on_every_token_for_replacement_noise(corpus_file):
    from conftest import tiny_config
    from grow.plan import plan

    mask = plan(tiny_config(corpus_file, extra=["curriculum.time=input"]))
    uniform = plan(tiny_config(corpus_file, extra=["curriculum.time=input", "objective.corruption=uniform"]))
    duo = plan(tiny_config(corpus_file, extra=["curriculum.time=input", "objective.corruption=duo"]))
    for a, b, c in zip(mask.stages, uniform.stages, duo.stages):
        assert b.flops_per_token > a.flops_per_token and b.logits >= a.logits
        assert c.logits == b.logits + 8 * duo.micro_batch * duo.seq_len * duo.vocab
        # duo's soft tokens: a (V x h) matmul per token, and its table gradient where the ends train
        soft = 2 * duo.cfg.model.hidden_size * duo.vocab
        trains_ends = c.name == duo.stages[0].name
        assert c.flops_per_token == b.flops_per_token + soft * (2 if trains_ends else 1)

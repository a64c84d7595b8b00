"""Curricula: the stage sequence of every design, what trains and what stays bitwise frozen."""

from __future__ import annotations

import pytest
import torch

from conftest import grow_in_process, tiny_config
from grow.assemble import RunState, assemble
from grow.config import load_config
from grow.curriculum import Noise, band, find_stage, level_paths, stage_specs
from grow.errors import UserError
from grow.objective import row_plan
from grow.stages import committed


def cfg_of(*sets, blocks=4):
    base = [f"model.num_blocks={blocks}", "schedule.ratios=null", "schedule.r_min=0.1", "train.steps=5",
            "curriculum.final_steps=0", "curriculum.anchor=0.0"]  # growth only, unless a test asks
    return load_config("configs/tiny.yaml", [*base, *sets])


def summary(specs):
    return [(s.label, s.first, s.last, s.train, s.adapters, s.trains_ends) for s in specs]


# --------------------------------------------------------------------------- the stage sequences


def test_right_to_left_prepends_one_block_per_stage_with_the_suffix_frozen():
    cfg = cfg_of()
    specs = stage_specs(cfg)
    assert summary(specs) == [
        ("block04", 4, 4, (4,), (), True),
        ("block03", 3, 4, (3,), (4,), False),
        ("block02", 2, 4, (2,), (3, 4), False),
        ("block01", 1, 4, (1,), (2, 3, 4), False),
    ]
    r = cfg.ratios()
    assert [s.noise for s in specs] == [Noise(r[k - 1], r[k - 1]) for k in (4, 3, 2, 1)]
    assert [s.consistency_level for s in specs] == [None, r[3], r[2], r[1]]
    assert [s.name for s in specs] == ["stage-01-block04", "stage-02-block03", "stage-03-block02", "stage-04-block01"]
    assert level_paths(cfg) == {1: (1, 4), 2: (2, 4), 3: (3, 4), 4: (4, 4)}
    # lora.blocks: only the nearest adapters train
    assert [s.adapters for s in stage_specs(cfg_of("lora.blocks=1"))] == [(), (4,), (3,), (2,)]


def test_right_to_left_with_time_as_input_trains_each_block_on_a_band_around_its_level():
    cfg = cfg_of("curriculum.time=input")
    r = cfg.ratios()  # 1.0, 0.7, 0.4, 0.1
    specs = stage_specs(cfg)
    assert [s.noise for s in specs] == [band(r, k, 1.0) for k in (4, 3, 2, 1)]
    assert band(r, 2, 1.0) == Noise(0.55, 0.85)  # the midpoints to the neighbouring levels
    assert band(r, 1, 1.0) == Noise(0.85, 1.0) and band(r, 4, 1.0) == Noise(0.05, 0.25)
    assert band(r, 2, 0.5) == Noise(0.625, 0.775)
    assert all(s.consistency_level is None for s in specs)


def test_left_to_right_appends_blocks_with_the_ends_anchored_and_periodic_joint_stages():
    specs = stage_specs(cfg_of("curriculum.kind=left_to_right", "curriculum.joint_every=2",
                               "curriculum.joint_steps=7"))
    assert summary(specs) == [
        ("block01", 1, 1, (1,), (), True),
        ("block02", 1, 2, (2,), (1,), False),
        ("joint02", 1, 2, (1, 2), (), False),
        ("block03", 1, 3, (3,), (1, 2), False),
        ("block04", 1, 4, (4,), (1, 2, 3), False),
        ("joint04", 1, 4, (1, 2, 3, 4), (), False),
    ]
    assert [s.steps for s in specs] == [5, 5, 7, 5, 5, 7]
    cfg = cfg_of("curriculum.kind=left_to_right")
    assert level_paths(cfg) == {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (1, 4)}
    # time as input: U(0, 1) per row, and only the whole stack serves every level
    cfg = cfg_of("curriculum.kind=left_to_right", "curriculum.time=input", "curriculum.freeze_earlier=false",
                 "curriculum.anchor_ends=false")
    assert summary(stage_specs(cfg))[2] == ("block03", 1, 3, (1, 2, 3), (), True)
    assert all(s.noise == Noise(0.0, 1.0) for s in stage_specs(cfg)) and level_paths(cfg) is None


def test_joint_trains_everything_at_once_for_the_whole_budget_and_a_final_stage_follows_any_curriculum():
    cfg = cfg_of("curriculum.kind=joint", "curriculum.time=input", "train.steps=[1, 2, 3, 4]")
    (spec,) = stage_specs(cfg)
    assert (spec.label, spec.train, spec.trains_ends, spec.noise, spec.steps) == (
        "joint", (1, 2, 3, 4), True, Noise(0.0, 1.0), 10)
    # one number is the steps of every growth stage, so the joint budget is L times it
    assert stage_specs(cfg_of("curriculum.kind=joint", "curriculum.time=input"))[0].steps == 4 * 5
    final = stage_specs(cfg_of("curriculum.final_steps=9"))[-1]
    assert (final.name, final.first, final.last, final.train, final.adapters, final.trains_ends, final.steps) == (
        "stage-05-whole", 1, 4, (), (1, 2, 3, 4), False, 9)


def test_anchors_are_the_other_levels_whose_paths_hold_something_the_stage_trains():
    specs = stage_specs(cfg_of("curriculum.anchor=0.25", "curriculum.final_steps=3"))
    # the whole-stack stage trains on U(0, 1), so it anchors level 1 (its own path) at r_1 as well
    assert [s.anchors for s in specs] == [(), (4,), (3, 4), (2, 3, 4), (1, 2, 3, 4)]
    assert all(s.anchor_fraction == 0.25 for s in specs)
    assert [s.anchors for s in stage_specs(cfg_of("curriculum.anchor=0.25", "lora.blocks=1"))] == [
        (), (4,), (3,), (2,)]  # a frozen adapter leaves its paths alone
    assert all(s.anchors == () for s in stage_specs(cfg_of("curriculum.anchor=0.25", "curriculum.kind=joint",
                                                           "curriculum.time=input")))


@pytest.mark.parametrize("sets, match", [
    (["curriculum.kind=joint"], "curriculum.time: joint trains every block at once"),
    (["curriculum.conditioning=embedding"], "curriculum.conditioning: 'embedding' needs curriculum.time=input"),
    (["curriculum.joint_every=2"], "curriculum.joint_every: periodic joint fine-tunes belong to kind=left_to_right"),
    (["curriculum.anchor=1.5"], "curriculum.anchor: expected a share"),
    (["curriculum.kind=sideways"], "curriculum.kind: expected one of right_to_left, left_to_right, joint"),
])
def test_impossible_combinations_are_refused_in_one_line(sets, match):
    with pytest.raises(UserError, match=match):
        cfg_of(*sets)


def test_stages_are_named_by_index_or_label_on_the_command_line():
    specs = stage_specs(cfg_of())
    assert find_stage(specs, "2", "--from-stage").label == "block03"
    assert find_stage(specs, "block03", "--from-stage").index == 2
    assert find_stage(specs, "stage-02-block03", "--from-stage").index == 2
    with pytest.raises(UserError, match=r"--from-stage: no stage 'block9' in this run; expected .*1=block04"):
        find_stage(specs, "block9", "--from-stage")


# --------------------------------------------------------------------------- rows of a batch


def test_anchor_rows_are_spread_over_the_batch_and_cycle_through_the_levels():
    cfg = cfg_of("curriculum.anchor=0.25", "train.batch_size=8")
    spec = stage_specs(cfg)[2]  # block 2; anchors: levels 3 and 4
    r = cfg.ratios()
    levels, first, last = row_plan(spec, cfg, step=0)
    anchor_rows = [i for i in range(8) if first[i] != 2]
    assert anchor_rows == [3, 7]
    assert [(levels[i].item(), first[i].item(), last[i].item()) for i in anchor_rows] == [(r[2], 3, 4), (r[3], 4, 4)]
    assert all(levels[i].item() == r[1] and (first[i], last[i]) == (2, 4) for i in range(8) if i not in anchor_rows)
    levels1, first1, _ = row_plan(spec, cfg, step=1)
    assert [first1[i].item() for i in anchor_rows] == [3, 4]  # 2 anchor rows per step, 2 levels: the same cycle
    assert torch.equal(row_plan(spec, cfg, step=5)[0], row_plan(spec, cfg, step=5)[0])  # a function of the step


def test_per_row_levels_are_low_discrepancy_and_a_pure_function_of_the_step():
    cfg = cfg_of("curriculum.kind=joint", "curriculum.time=input", "train.batch_size=16")
    (spec,) = stage_specs(cfg)
    levels = row_plan(spec, cfg, step=3)[0]
    assert torch.equal(levels, row_plan(spec, cfg, step=3)[0]) and not torch.equal(levels, row_plan(spec, cfg, 4)[0])
    # one u per step, then an even grid: exactly one level in each sixteenth of (0, 1]
    assert sorted((levels * 16).floor().long().tolist()) == list(range(16))


# --------------------------------------------------------------------------- what trains, what is frozen


CURRICULA = {
    "right_to_left": [],
    "left_to_right": ["curriculum.kind=left_to_right", "curriculum.joint_every=2", "curriculum.joint_steps=2"],
    "joint": ["curriculum.kind=joint", "curriculum.time=input"],
    "r2l+bands+final": ["curriculum.time=input", "curriculum.final_steps=2", "curriculum.anchor=0.25"],
}


@pytest.mark.parametrize("name", CURRICULA)
def test_each_stage_trains_exactly_its_spec_and_leaves_everything_else_bitwise_as_it_was(tmp_path, corpus_file, name):
    """Every stage of a real 3-block run: the trainable parameters are the spec's blocks, the
    spec's adapters and (if it says so) the ends; after the stage every other stored tensor --
    frozen blocks (their 4-bit data), frozen adapters, anchored ends -- is bitwise unchanged."""
    from grow.quant import PEFT_PREFIX
    from grow.store import list_stages

    cfg = tiny_config(corpus_file, blocks=3, steps=3, extra=CURRICULA[name])
    run = tmp_path / "run"
    corpus = grow_in_process(run, cfg)
    specs = stage_specs(cfg)
    stages, problem = committed(run, specs)
    assert problem is None and len(stages) == len(specs)
    for i, spec in enumerate(specs):
        model = assemble(cfg, corpus.tokenizer, spec, RunState(stages[:i]), "cpu", training=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        blocks = {int(n.split(".")[1]) + 1 for n in trainable if n.startswith("blocks.") and "lora_" not in n}
        adapters = {int(n.split(".")[1]) + 1 for n in trainable if "lora_" in n}
        ends = {n for n in trainable if n.split(".")[0] in ("embed_tokens", "norm", "lm_head")}
        assert blocks == set(spec.train) and adapters == set(spec.adapters), spec.name
        assert bool(ends) == spec.trains_ends, spec.name
        # What the stage left: only what it trained differs from the state before it.
        before, after = RunState(stages[:i]), RunState(stages[: i + 1])
        for k in spec.frozen:
            assert all(torch.equal(before.block(k)[n], after.block(k)[n]) for n in before.block(k)), (spec.name, k)
        if not spec.trains_ends:
            assert all(torch.equal(before.ends()[n], after.ends()[n]) for n in before.ends()), spec.name
        kept = {n: v for n, v in after.adapters().items()
                if int(n[len(PEFT_PREFIX):].split(".")[0]) + 1 not in spec.adapters}
        assert all(torch.equal(v, before.adapters()[n]) for n, v in kept.items()), spec.name
        stored = list_stages(run)[spec.index].weights()
        assert {int(n.split(".")[2]) + 1 for n in stored if n.startswith("model.layers.")} == set(spec.train)

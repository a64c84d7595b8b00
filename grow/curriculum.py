"""Curricula: the stages of a run, computed from its config (design card sections 1, 4, 10).

A curriculum is a pure function ``GrowConfig -> list[StageSpec]``. A ``StageSpec`` says
everything the rest of grow needs to know about one stage: which blocks exist (the path the
corrupted input takes: it enters at ``first`` and the shared head reads after ``last``), which
of them train in full precision, which stay frozen (4-bit + LoRA per the quant/lora sections)
and whose adapters train, whether the embedding, final norm and head train, and the noise the
stage draws its levels from. The stage runner, the store, resume, ``--from-stage``, DeepSpeed,
the planner and ``grow status`` read specs and nothing else, so a new curriculum is a new
function here and an entry in ``CURRICULA``.

    right_to_left  stage i trains block k = L+1-i at r_k with blocks k+1..L frozen (card 4.1);
                   with time: input each block sees a band of t around r_k (card 4.3)
    left_to_right  stage k appends block k after blocks 1..k-1 (frozen or not), ends anchored
                   or not, optional periodic joint fine-tunes (card 4.2); with time: depth the
                   network 1..k learns level r_k (the card's rare hybrid)
    joint          one stage, every block and the ends train at once, t ~ U(0, 1): the baseline
    adapt          a pretrained model (model.init_from): every block from the start, one trains
                   at a time, the others frozen in 4-bit + LoRA (docs/warm_start.md)

With model.init_from a stage 1 ``convert`` (grow.convert) comes first: the checkpoint's weights.

A final whole-stack stage (``curriculum.final_steps``) may follow any of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from grow.config import GrowConfig


@dataclass(frozen=True)
class Noise:
    """The noise levels a stage draws from: one level (lo == hi) or t ~ U(lo, hi) per row."""

    lo: float
    hi: float

    @property
    def fixed(self) -> bool:
        return self.lo == self.hi

    def describe(self) -> str:
        return f"r={self.lo:.3f}" if self.fixed else f"t~U({self.lo:.3f},{self.hi:.3f})"

    @property
    def representative(self) -> float:
        """The level a stage's own held-out CE is reported at (the middle of a band)."""
        return (self.lo + self.hi) / 2


@dataclass(frozen=True)
class StageSpec:
    """One stage of a run, in run order. Blocks are 1-based ids, block k <-> level r_k."""

    index: int
    """Position in the run (1 = first); names the stage directory."""
    label: str
    """Short name for directories and logs: block06, joint, whole, ..."""
    first: int
    """Leftmost block of the stage's network; the corrupted input enters here."""
    last: int
    """Rightmost block; the shared head reads after it."""
    train: tuple[int, ...]
    """Blocks trained in full precision (created fresh when nothing is stored for them)."""
    adapters: tuple[int, ...]
    """Frozen blocks whose LoRA adapters train."""
    trains_ends: bool
    """Embedding, final norm and head train (else frozen: the anchor)."""
    noise: Noise
    steps: int
    level: int | None = None
    """The schedule level k this stage is tied to (time as depth and bands), if any."""
    consistency_level: float | None = None
    """Right to left with time as depth: r_{k+1}, the level the suffix's own input was at."""
    anchors: tuple[int, ...] = ()
    """Levels whose paths this stage changes (they hold a block or adapter it trains) and so
    also trains on, each at its own r_j, to keep them where their stages left them."""
    anchor_fraction: float = 0.0
    """Share of each batch's rows spent on the anchor levels (curriculum.anchor)."""
    converted: bool = False
    """The stage stores blocks first..last and the ends as taken from model.init_from
    (grow.convert); it trains nothing."""

    @property
    def name(self) -> str:
        return f"stage-{self.index:02d}-{self.label}"

    @property
    def blocks(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def frozen(self) -> tuple[int, ...]:
        return tuple(k for k in self.blocks if k not in self.train)

    def describe(self) -> str:
        trains = ", ".join(f"B{k}" for k in self.train) + (" + ends" if self.trains_ends else "")
        frozen = f"; frozen B{self.frozen[0]}..B{self.frozen[-1]}" if self.frozen else ""
        return f"{self.name}: blocks {self.first}..{self.last}, trains {trains}{frozen}, {self.noise.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _adapters(frozen: list[int], near: int, window: int | None, enabled: bool) -> tuple[int, ...]:
    """The frozen blocks within ``window`` of block ``near`` (all of them when None)."""
    if not enabled:
        return ()
    return tuple(k for k in frozen if window is None or abs(k - near) <= window)


def _total_steps(cfg: GrowConfig) -> int:
    """What growth would spend on its blocks: train.steps summed (one number = per block)."""
    return sum(cfg.steps_for(k) for k in range(1, cfg.model.num_blocks + 1))


def band(ratios: list[float], k: int, factor: float) -> Noise:
    """Levels around r_k for right-to-left with time as input: midpoints to the neighbours."""
    r = ratios[k - 1]
    above = ratios[k - 2] if k > 1 else min(1.0, r + (r - ratios[k]) if len(ratios) > 1 else 1.0)
    below = ratios[k] if k < len(ratios) else max(0.0, r - (ratios[k - 2] - r) if len(ratios) > 1 else 0.0)
    hi = min(1.0, r + factor * (above - r) / 2)
    lo = max(1e-3, r - factor * (r - below) / 2)
    return Noise(round(lo, 6), round(hi, 6))


def right_to_left(cfg: GrowConfig) -> list[StageSpec]:
    """Stage i trains block L+1-i; its suffix is frozen; stage 1 also trains the ends."""
    r, L, c = cfg.ratios(), cfg.model.num_blocks, cfg.curriculum
    specs = []
    for i, k in enumerate(range(L, 0, -1), start=1):
        depth = c.time == "depth"
        noise = Noise(r[k - 1], r[k - 1]) if depth else band(r, k, c.band)
        specs.append(StageSpec(
            index=i, label=f"block{k:02d}", first=k, last=L, train=(k,),
            adapters=_adapters(list(range(k + 1, L + 1)), k, cfg.lora.blocks, cfg.lora.enabled),
            trains_ends=k == L, noise=noise, steps=cfg.steps_for(k), level=k,
            consistency_level=r[k] if depth and k < L else None,
        ))
    return specs


def left_to_right(cfg: GrowConfig) -> list[StageSpec]:
    """Stage k appends block k; blocks 1..k-1 frozen or trainable; optional joint fine-tunes."""
    r, L, c = cfg.ratios(), cfg.model.num_blocks, cfg.curriculum
    specs: list[StageSpec] = []
    for k in range(1, L + 1):
        depth = c.time == "depth"
        noise = Noise(r[k - 1], r[k - 1]) if depth else Noise(0.0, 1.0)
        train = (k,) if c.freeze_earlier else tuple(range(1, k + 1))
        frozen = [j for j in range(1, k + 1) if j not in train]
        specs.append(StageSpec(
            index=len(specs) + 1, label=f"block{k:02d}", first=1, last=k, train=train,
            adapters=_adapters(frozen, k, cfg.lora.blocks, cfg.lora.enabled),
            trains_ends=k == 1 or not c.anchor_ends, noise=noise, steps=cfg.steps_for(k),
            level=k if depth else None,
        ))
        if c.joint_every and k % c.joint_every == 0 and k > 1:
            specs.append(StageSpec(
                index=len(specs) + 1, label=f"joint{k:02d}", first=1, last=k, train=tuple(range(1, k + 1)),
                adapters=(), trains_ends=not c.anchor_ends, noise=noise, steps=c.joint_steps,
                level=k if depth else None,
            ))
    return specs


def joint(cfg: GrowConfig) -> list[StageSpec]:
    """Every block and the ends at once on t ~ U(0, 1), for the whole token budget."""
    L = cfg.model.num_blocks
    return [StageSpec(index=1, label="joint", first=1, last=L, train=tuple(range(1, L + 1)), adapters=(),
                      trains_ends=True, noise=Noise(0.0, 1.0), steps=_total_steps(cfg))]


def adapt(cfg: GrowConfig) -> list[StageSpec]:
    """A pretrained model (model.init_from): every block exists from the start; one block trains
    at a time in full precision while every other block is frozen (4-bit + LoRA per quant/lora)
    and the whole stack runs. Order per curriculum.order, curriculum.passes passes; the ends train
    with the first block only (the mask token's new rows need it), then anchor. Noise: t ~ U(0, 1)
    with time as input; with time as depth (the hybrid) the stage of block k draws from the band
    around r_k, still through the whole stack."""
    import random

    r, L, c = cfg.ratios(), cfg.model.num_blocks, cfg.curriculum
    rng = random.Random(cfg.train.seed)
    specs: list[StageSpec] = []
    for p in range(1, c.passes + 1):
        order = {"descending": list(range(L, 0, -1)), "ascending": list(range(1, L + 1)),
                 "random": rng.sample(range(1, L + 1), L)}[c.order]
        for k in order:
            depth = c.time == "depth"
            specs.append(StageSpec(
                index=len(specs) + 1, label=f"block{k:02d}" + (f"p{p}" if p > 1 else ""), first=1, last=L,
                train=(k,), adapters=_adapters([j for j in range(1, L + 1) if j != k], k, cfg.lora.blocks,
                                               cfg.lora.enabled),
                trains_ends=not specs, noise=band(r, k, c.band) if depth else Noise(0.0, 1.0),
                steps=cfg.steps_for(k), level=k if depth else None,
            ))
    return specs


def convert_stage(cfg: GrowConfig) -> StageSpec:
    """Stage 1 of a run with model.init_from: it stores the checkpoint's ends (and blocks
    first..last, with model.init_blocks) and trains nothing (0 steps). Its network is every
    stored block frozen (4-bit + a zero LoRA adapter, as the adapt stages hold them), measured
    on t ~ U(0, 1)."""
    L = cfg.model.num_blocks
    blocks = cfg.model.init_blocks
    return StageSpec(index=1, label="convert", first=1 if blocks else L + 1, last=L, train=(), adapters=(),
                     trains_ends=False, noise=Noise(0.0, 1.0), steps=0, converted=True)


CURRICULA = {"right_to_left": right_to_left, "left_to_right": left_to_right, "joint": joint, "adapt": adapt}


def stage_specs(cfg: GrowConfig) -> list[StageSpec]:
    """Every stage of the run, in the order they run, with the level paths each one anchors."""
    specs = CURRICULA[cfg.curriculum.kind](cfg)
    if cfg.curriculum.final_steps:
        specs.append(final_stage(cfg, len(specs) + 1))
    if cfg.model.init_from:
        specs = [convert_stage(cfg)] + [replace(s, index=s.index + 1) for s in specs]
    paths = level_paths(cfg)
    if paths is None or not cfg.curriculum.anchor:
        return specs
    return [replace(spec, anchors=changed_levels(spec, paths), anchor_fraction=cfg.curriculum.anchor)
            for spec in specs]


def changed_levels(spec: StageSpec, paths: dict[int, tuple[int, int]]) -> tuple[int, ...]:
    """The levels (other than the stage's own) whose path runs through something the stage trains.

    Growing right to left, stage k's trainable adapters sit on blocks k+1..; every level
    whose path k'..L contains one of them changes while block k trains. A whole-stack stage
    changes every path.
    """
    trained = set(spec.train) | set(spec.adapters)
    # A stage tied to a level already trains its own path at that level. A stage on a band or
    # on U(0, 1) (the whole-stack stage) does not: the level whose path it runs (level 1 grown
    # right to left) is anchored like the others, at its own r.
    own = (spec.first, spec.last) if spec.level is not None else None
    return tuple(k for k, (a, b) in sorted(paths.items())
                 if k != spec.level and (a, b) != own and spec.first <= a and b <= spec.last
                 and trained & set(range(a, b + 1)))


def final_stage(cfg: GrowConfig, index: int) -> StageSpec:
    """The whole stack on t ~ U(0, 1), after growth (``curriculum.final_trains``):

    adapters     every block frozen in 4-bit with a trainable adapter: QLoRA over the whole
                 model, so it costs a QLoRA pass and the export merges it;
    free_block   only the blocks no level's own path uses (block 1 grown right to left, block L
                 left to right) train, in full precision: every other path is left bitwise as
                 growth made it;
    both         the free blocks in full precision and every other block's adapter.
    """
    L, trains = cfg.model.num_blocks, cfg.curriculum.final_trains
    paths = level_paths(cfg) or {}
    used = {b for k, (a, z) in paths.items() if (a, z) != (1, L) for b in range(a, z + 1)}
    free = tuple(k for k in range(1, L + 1) if k not in used)
    train = free if trains in ("free_block", "both") else ()
    adapters = tuple(k for k in range(1, L + 1) if k not in train) if trains in ("adapters", "both") else ()
    return StageSpec(index=index, label="whole", first=1, last=L, train=train,
                     adapters=adapters if cfg.lora.enabled else (), trains_ends=False, noise=Noise(0.0, 1.0),
                     steps=cfg.curriculum.final_steps)


def level_paths(cfg: GrowConfig) -> dict[int, tuple[int, int]] | None:
    """For a depth-tied model, the blocks that serve schedule level k: {k: (first, last)}.

    Right to left: blocks k..L (what stage k trained); left to right with time as depth:
    blocks 1..k. None for a model that only runs as a whole stack (joint, time as input
    grown left to right): the samplers that step through levels do not apply to it.
    """
    L, c = cfg.model.num_blocks, cfg.curriculum
    if c.kind == "right_to_left":
        return {k: (k, L) for k in range(1, L + 1)}
    if c.kind == "left_to_right" and c.time == "depth":
        return {k: (1, k) for k in range(1, L + 1)}
    return None


def find_stage(specs: list[StageSpec], text: str, flag: str) -> StageSpec:
    """The stage a user names on the command line: its index (3), label (block04) or name."""
    from grow.errors import UserError

    for spec in specs:
        if text in (str(spec.index), spec.label, spec.name):
            return spec
    names = ", ".join(f"{s.index}={s.label}" for s in specs)
    raise UserError(f"{flag}: no stage {text!r} in this run; expected an index or label of: {names}")

"""grow as an lm-evaluation-harness model: ``--model grow --model_args path=RUN_OR_EXPORT,...``.

A masked-diffusion LM has no left-to-right factorisation to read log-probabilities off, so
``loglikelihood`` reports the negative of the masked-diffusion *bound* (LLaDA's eval form):

    -log p(x | c) <= E_{m ~ U{1..n}} [ (n / m) * sum_{i in M} -log p(x_i | c, x with M masked) ]

for a continuation x of n tokens after a context c, where M is a uniformly random set of m
continuation positions (the context is never masked). ``mc_num`` draws of (m, M) per request
estimate the expectation; three choices reduce its variance without biasing it:

- ``counts``: ``stratified`` (default) -- m_j = 1 + floor(n * ((u + j) / mc_num mod 1)), one
  u per request, so the counts cover 1..n evenly; ``antithetic`` -- pairs m, n + 1 - m; ``iid``
  -- m_j drawn independently (LLaDA's plain form);
- ``masks``: ``independent`` (default) -- a fresh random order of the continuation per draw;
  ``nested`` -- one order per request and draw j masks its m_j first positions (grow's nested
  masks, ``grow.noise.nested_mask``: the masks of a request are subsets of one another).
- draws that come out identical (a one-token continuation: every draw masks that token) are
  run once, so a one-token continuation costs one forward and its value is exact.

The randomness of a request is a pure function of (``seed``, its context tokens): the same
request scores the same whatever the batch it is in, and the choices of one multiple-choice
question (same context) share their count and mask draws -- common random numbers, which
make the comparison between choices less noisy than each value.

A draw's noise level is the masked fraction of the whole sequence it feeds the network (what
a time-conditioned model is given and what ``grow.sample.level_of`` measures). With
``stack=level`` a depth-tied model (right to left; left to right with time as depth) runs the
blocks of the schedule level nearest that fraction (``Loaded.level_path``), as the depth
samplers do; with ``stack=whole`` every block runs. The default is ``level`` for a depth-tied
model grown without a final whole-stack stage and ``whole`` otherwise (``default_stack``).

``loglikelihood_rolling``: the same bound for a whole document after the separator token, in
lm-eval's rolling windows of ``max_length`` tokens; each window after the first scores its new
half given the half before it; a lower bound on the log-likelihood, so perplexities
derived from it are upper bounds. ``generate_until``: grow's samplers (``grow.sample``;
``mode``, ``steps``, ``block_length``, ``gen_length`` model args), the output cut at the first
``until`` string and at the end-of-document token.

Every sequence starts with the tokenizer's separator (the token the corpus packer writes
between documents), so the model sees a document start as it did in training; contexts
longer than ``max_length`` (default: the sequence length the model was trained on) lose
their oldest tokens.

lm-eval 0.4 discovers models only through its own registry: this module registers ``grow``
when imported. ``python -m grow.harness ARGS`` is the ``lm_eval`` command line with it
registered; ``grow eval RUN --tasks ...`` runs tasks from grow's command line.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from tqdm.auto import tqdm

from grow.errors import UserError
from grow.noise import nested_mask

# A score stream of its own, apart from training (0) and held-out (1) masks (grow.noise).
HARNESS_SALT = 2
COUNTS = ("stratified", "antithetic", "iid")
MASKS = ("independent", "nested")
STACKS = ("level", "whole")


def _key(seed: int, tokens: Sequence[int]) -> list[int]:
    """Seed material for numpy: (seed, salt, a 63-bit digest of the tokens)."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8).digest()
    return [int(seed), HARNESS_SALT, int.from_bytes(digest, "little") >> 1]


def mask_draws(n: int, mc_num: int, rng: np.random.Generator, counts: str = "stratified",
               masks: str = "independent") -> list[tuple[int, ...]]:
    """``mc_num`` sets of masked continuation positions (0-based, each non-empty) for n tokens."""
    if counts == "stratified":
        u = rng.random()
        m = 1 + np.floor(n * (((u + np.arange(mc_num)) / mc_num) % 1.0)).astype(int)
    elif counts == "antithetic":
        first = 1 + np.floor(n * rng.random((mc_num + 1) // 2)).astype(int)
        m = np.stack([first, n + 1 - first], axis=1).reshape(-1)[:mc_num]
    elif counts == "iid":
        m = 1 + np.floor(n * rng.random(mc_num)).astype(int)
    else:
        raise UserError(f"counts: expected one of {', '.join(COUNTS)}, got {counts!r}")
    m = np.clip(m, 1, n)
    if masks == "nested":  # one score per token for all draws: draw j masks the m_j lowest
        scores = torch.from_numpy(rng.random((1, n)))
        return [tuple(nested_mask(scores, k / n)[0].nonzero().flatten().tolist()) for k in m]
    if masks != "independent":
        raise UserError(f"masks: expected one of {', '.join(MASKS)}, got {masks!r}")
    return [tuple(sorted(np.argsort(rng.random(n), kind="stable")[:k].tolist())) for k in m]


@dataclass
class _Row:
    """One network input: a sequence with some continuation positions masked."""

    request: int
    tokens: tuple[int, ...]
    start: int
    """Where the continuation starts in ``tokens``."""
    masked: tuple[int, ...]
    """The masked continuation positions, relative to ``start``."""
    weight: float
    """How many of the request's draws this row stands for (0: only for is_greedy)."""
    greedy: bool = False
    """The all-masked row, whose argmaxes decide is_greedy."""


def final_steps(loaded) -> int:
    """Steps of the run's final whole-stack stage (curriculum.final_steps; an export's grow.json)."""
    if loaded.config is not None:
        return int(loaded.config.curriculum.final_steps)
    return int((loaded.meta.get("curriculum") or {}).get("final_steps") or 0)


def default_stack(loaded) -> str:
    """``level`` for a depth-tied model that growth alone trained, else ``whole``.

    Measured on the local cloze tasks (docs/evaluate.md): after growth alone the level paths win
    by far (block 1 only ever saw all-[MASK] input, so the whole stack ignores context at light
    noise); after a final stage over the whole stack at t ~ U(0, 1), the whole stack wins.
    """
    return "level" if loaded.paths and not final_steps(loaded) else "whole"


class GrowLM(LM):
    """A grown run or an exported grow model, scored by Monte Carlo over masked-diffusion draws."""

    def __init__(
        self,
        path: str | None = None,
        pretrained: str | None = None,
        mc_num: int = 32,
        batch_size: int | str = 32,
        seed: int = 0,
        counts: str = "stratified",
        masks: str = "independent",
        stack: str | None = None,
        max_length: int | None = None,
        mode: str | None = None,
        steps: int | None = None,
        block_length: int = 32,
        gen_length: int = 64,
        temperature: float = 0.0,
        device: str | None = None,
        max_batch_size: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from grow.engine import resolve_device
        from grow.inference import load_denoiser
        from grow.sample import MODES, check_mode, modes_for

        path = path or pretrained
        if not path:
            raise UserError("--model_args: expected path=RUN_OR_EXPORT (a grow run or exported model directory)")
        if unused:
            raise UserError(f"--model_args: unknown option(s) {', '.join(sorted(unused))} for --model grow; "
                            "expected path, mc_num, batch_size, seed, counts, masks, stack, max_length, mode, "
                            "steps, block_length, gen_length, temperature, device")
        self.mc_num = _positive_int(mc_num, "mc_num")
        # lm-eval passes its --batch_size here ("auto" sizes nothing for us: use the default)
        self.batch_size = 32 if str(batch_size).startswith("auto") else _positive_int(batch_size, "batch_size")
        try:
            self.seed = int(seed)
        except (TypeError, ValueError):
            raise UserError(f"seed: expected an integer, got {seed!r}") from None
        if counts not in COUNTS:
            raise UserError(f"counts: expected one of {', '.join(COUNTS)}, got {counts!r}")
        if masks not in MASKS:
            raise UserError(f"masks: expected one of {', '.join(MASKS)}, got {masks!r}")
        self.counts, self.masks = counts, masks
        self._device = resolve_device(str(device) if device else "auto")
        self.loaded = load_denoiser(path, self._device, log=lambda line: None)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        stack = stack or default_stack(self.loaded)
        if stack not in STACKS:
            raise UserError(f"stack: expected one of {', '.join(STACKS)}, got {stack!r}")
        self.stack = stack
        from grow.data.tokenizer import separator_id

        self.sep = separator_id(self.tokenizer)
        context = self.model.config.max_position_embeddings
        trained = (self.loaded.config.data.seq_len if self.loaded.config is not None
                   else self.loaded.meta.get("seq_len", context))
        self.max_length = _positive_int(max_length or min(trained, context), "max_length")
        if self.max_length > context:
            raise UserError(f"max_length: {self.max_length} exceeds the model's {context} positions")
        depth_tied = self.loaded.paths is not None
        self.mode = mode or self.loaded.meta.get("sampling", {}).get("mode") or modes_for(
            self.loaded.corruption, depth_tied)[0]
        if self.mode not in MODES:
            raise UserError(f"mode: unknown sampler {self.mode!r}; expected one of {', '.join(MODES)}")
        check_mode(self.mode, self.loaded.corruption, depth_tied, str(path))
        self.steps = None if steps is None else _positive_int(steps, "steps")
        self.block_length = _positive_int(block_length, "block_length")
        self.gen_length = _positive_int(gen_length, "gen_length")
        self.temperature = float(temperature)
        self.path = str(path)

    # ------------------------------------------------------------------ lm-eval's API

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval writes under results["config"]: enough to reproduce the numbers."""
        return {"grow_source": self.loaded.source, "grow_path": self.path, "mc_num": self.mc_num,
                "seed": self.seed, "counts": self.counts, "masks": self.masks, "stack": self.stack,
                "max_length": self.max_length, "gen_mode": self.mode, "num_blocks": self.model.num_blocks,
                "schedule": list(self.loaded.ratios)}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self.score_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        # the document-start token; a tokenizer without one gets a mask, which is never scored
        prefix = self.sep if self.sep is not None else self.loaded.mask_id
        for i, req in enumerate(requests):
            tokens = self._encode(req.args[0])
            # max_seq_len + 1 tokens per window (context and predicted) must fit max_length. A
            # causal model sees the window's earlier tokens as context whatever context_len is;
            # the bound scores a window's new tokens jointly, given only the window's context
            # part, so windows after the first keep half of it as context.
            windows = get_rolling_token_windows(tokens, prefix, self.max_length - 1, max(1, self.max_length // 2))
            for window in windows:
                context, continuation = make_disjoint_window(window)
                pairs.append((list(context), list(continuation)))
                owner.append(i)
        scores = self.score_tokens(pairs, prepend=False, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (value, _) in zip(owner, scores):
            totals[i] += value
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from grow.sample import generate

        out = []
        for req in tqdm(requests, desc="grow generate", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(kwargs.pop("max_gen_toks", self.gen_length))
            temperature = float(kwargs.pop("temperature", self.temperature)) if kwargs.pop("do_sample", True) else 0.0
            length = min(length, self.max_length - 1)
            prompt = self._with_sep(self._encode(context))[-(self.max_length - length):]
            generator = torch.Generator(device=self._device).manual_seed(_seed_of(_key(self.seed, prompt)))
            opts: dict[str, Any] = {}
            if self.mode in ("iterative", "semi-ar"):
                opts["steps"] = self.steps
            if self.mode == "semi-ar":
                opts["block_length"] = min(self.block_length, length)
            result = generate(self.model, torch.tensor([prompt], device=self._device), length, self.mode,
                              mask_id=self.loaded.mask_id, ratios=self.loaded.ratios, paths=self.loaded.paths,
                              temperature=temperature, generator=generator, **opts)
            ids = result.generated[0].tolist()
            stop = {i for i in (self.sep, self.tokenizer.pad_token_id) if i is not None}
            ids = ids[: next((j for j, tok in enumerate(ids) if tok in stop), len(ids))]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    # ------------------------------------------------------------------ the bound

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _with_sep(self, tokens: list[int]) -> list[int]:
        return ([self.sep] if self.sep is not None else []) + list(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, split where a causal harness model would split them:
        trailing spaces of the context go to the continuation, and the continuation is what the
        whole string adds to the context's tokens."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        if whole[: len(ctx)] != ctx:  # the join merged tokens across the boundary
            return ctx, self._encode(continuation)
        return ctx, whole[len(ctx):]

    def _rows(self, index: int, context: list[int], continuation: list[int], prepend: bool) -> list[_Row]:
        n = len(continuation)
        if n == 0:
            return []
        if n > self.max_length - 1:
            raise UserError(f"max_length: a continuation of {n} tokens does not fit {self.max_length} positions "
                            "with any context")
        context = self._with_sep(context) if prepend else list(context)
        context = context[max(0, len(context) + n - self.max_length):]
        tokens = tuple(context + continuation)
        draws = mask_draws(n, self.mc_num, np.random.default_rng(_key(self.seed, context)), self.counts, self.masks)
        weights: dict[tuple[int, ...], int] = defaultdict(int)
        for draw in draws:
            weights[draw] += 1
        rows = [_Row(index, tokens, len(context), masked, float(w)) for masked, w in weights.items()]
        everything = tuple(range(n))
        if everything in weights:
            next(r for r in rows if r.masked == everything).greedy = True
        else:
            rows.append(_Row(index, tokens, len(context), everything, 0.0, greedy=True))
        return rows

    def _blocks(self, ratio: float) -> tuple[int | None, int | None]:
        """The blocks a draw at this noise level runs: its nearest level's path, or the whole stack."""
        if self.stack == "whole" or not self.loaded.paths:
            return None, None
        ratios = self.loaded.ratios
        k = min(range(len(ratios)), key=lambda i: (abs(ratios[i] - ratio), i)) + 1
        return self.loaded.level_path(k) or (None, None)

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], *, prepend: bool = True,
                     disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(lower bound on log p(continuation | context), is_greedy) per (context, continuation) pair.

        is_greedy: with every continuation token masked, each one is the network's argmax.
        """
        if self.loaded.corruption.replaces_tokens:
            raise UserError(f"loglikelihood: {self.path} was trained with {self.loaded.corruption.name} (token "
                            "replacement) noise, never with [MASK], so the masked-diffusion bound does not apply; "
                            "only generation tasks run on it")
        rows = [row for i, (ctx, cont) in enumerate(pairs) for row in self._rows(i, ctx, cont, prepend)]
        # one forward per batch of rows of one length run through the same blocks (no padding:
        # the model has no attention mask); a time-conditioned model gets each row's own level
        groups: dict[tuple, list[_Row]] = defaultdict(list)
        for row in rows:
            groups[(len(row.tokens), self._blocks(len(row.masked) / len(row.tokens)))].append(row)
        nll = [0.0] * len(pairs)
        greedy = [True] * len(pairs)
        mask_id = self.loaded.mask_id
        batches = [(key, group[i:i + self.batch_size]) for key, group in sorted(groups.items(), key=_group_order)
                   for i in range(0, len(group), self.batch_size)]
        for (_, (first, last)), batch in tqdm(batches, desc="grow loglikelihood", disable=disable_tqdm):
            ids = torch.tensor([row.tokens for row in batch], device=self._device)
            where = torch.zeros_like(ids, dtype=torch.bool)
            for b, row in enumerate(batch):
                where[b, [row.start + j for j in row.masked]] = True
            x = ids.masked_fill(where, mask_id)
            t = where.float().mean(1) if self.loaded.time_input else None
            hidden = self.model.forward_from(self.model.embed(x), first, last, t)
            logits = self.model.head(hidden[where]).float()
            targets = ids[where]
            ce = F.cross_entropy(logits, targets, reduction="none").double().cpu()
            logits[:, mask_id] = -math.inf
            hits = (logits.argmax(-1) == targets).cpu()
            offset = 0
            for row in batch:
                m = len(row.masked)
                n = len(row.tokens) - row.start
                if row.weight:
                    nll[row.request] += row.weight / self.mc_num * n / m * float(ce[offset:offset + m].sum())
                if row.greedy:
                    greedy[row.request] = bool(hits[offset:offset + m].all())
                offset += m
        return [(-value, g) for value, g in zip(nll, greedy)]


def _group_order(item):
    (length, (first, last)), _ = item
    return (length, first or 0, last or 0)


def _seed_of(key: list[int]) -> int:
    return int(np.random.default_rng(key).integers(2**62))


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() not in (str(number), f"{number}.0"):
        raise UserError(f"{name}: expected a positive integer, got {value!r}")
    return number


if "grow" not in model_registry:
    register_model("grow")(GrowLM)


# ---------------------------------------------------------------------- running tasks


def task_manager_for(tasks: str):
    """(task names, TaskManager) for ``--tasks``: comma-separated registered task names and/or
    paths to task YAML files or directories of them. Paths are indexed on their own; lm-eval's
    thousands of bundled tasks are indexed only when a name is not a path (it takes a while)."""
    from lm_eval.tasks import TaskManager

    names, include = [], []
    for item in [s.strip() for s in tasks.split(",") if s.strip()]:
        path = Path(item)
        if path.is_dir():
            include.append(str(path.resolve()))
            names += [_task_name(p) for p in sorted(path.glob("*.yaml"))]
        elif path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise UserError(f"--tasks: no task file {item}")
            include.append(str(path.resolve().parent))
            names.append(_task_name(path))
        else:
            names.append(item)
    if not names:
        raise UserError(f"--tasks: expected task names or task YAML files, got {tasks!r}")
    bundled = any(not Path(n).suffix and n not in _local_names(include) for n in names)
    manager = TaskManager(include_path=sorted(set(include)) or None, include_defaults=bundled or not include)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise UserError(f"--tasks: unknown task(s) {', '.join(missing)} (a name lm-eval knows, or a task YAML file)")
    return names, manager


def _task_name(path: Path) -> str:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !function and friends
    try:
        config = yaml.load(path.read_text(), Loader=_Loader) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--tasks: cannot read {path}: {exc}") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise UserError(f"--tasks: {path} has no 'task: NAME' entry")
    return name


def _local_names(include: list[str]) -> set[str]:
    return {_task_name(p) for d in include for p in Path(d).glob("*.y*ml")}


def evaluate_tasks(model: str, tasks: str, *, mc_num: int = 32, batch_size: int = 32, seed: int = 0,
                   limit: float | None = None, device: str = "auto", log_samples: bool = False,
                   **model_args: Any) -> dict[str, Any]:
    """Run lm-eval tasks on a run or export; lm-eval's results dict."""
    import lm_eval

    names, manager = task_manager_for(tasks)
    lm = GrowLM(path=model, mc_num=mc_num, batch_size=batch_size, seed=seed, device=device, **model_args)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                   log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed)


def results_table(results: dict[str, Any]) -> str:
    """One line per task and metric: value and standard error, as lm-eval reports them.

    (lm-eval's own ``make_table`` needs pytablewriter >= 1, which the pinned python-dateutil
    4 rules out; the 0.x pytablewriter that pip picks instead prints letters as headers.)
    """
    lines = [f"{'task':<24} {'metric':<18} {'filter':<12} {'value':>9} {'stderr':>9}  n"]
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective", "")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
            lines.append(f"{task:<24} {metric:<18} {filt:<12} {value:>9.4f} {err:>9}  {n}")
    return "\n".join(lines)


def results_json(results: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def main() -> None:
    """``python -m grow.harness ...``: lm-eval's own command line, with ``--model grow`` known."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as exc:  # grow's own input errors: one line, exit 2, as from `grow`
        print(f"grow: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""CUDA paths: bf16 stages with bitsandbytes' CUDA 4-bit kernels, the memory account, export.

Marked ``gpu``: skipped on machines without CUDA (CI), run on a GPU machine with
``pytest -m gpu``. The planner-vs-measurement comparison lives in bench/plan_vs_measured.py.
"""

import pytest
import torch

from conftest import tiny_overrides
from grow.cli import main
from grow.store import list_stages

pytestmark = pytest.mark.gpu


def test_bf16_growth_on_cuda_with_4bit_suffix_then_export(tmp_path, corpus_file):
    run, out = tmp_path / "run", tmp_path / "hf"
    sets = [*tiny_overrides(corpus_file, blocks=3, steps=6), "--set", "train.device=cuda",
            "--set", "train.precision=bf16", "--set", "quant.compute_dtype=bf16"]
    assert main(["train", "configs/tiny.yaml", "--out", str(run), *sets]) == 0
    stages = list_stages(run, verify=True)
    assert sorted(stages) == [1, 2, 3]
    for k in (2, 3):
        memory = stages[k].manifest["memory"]
        assert memory["peak_kind"] == "cuda_max_allocated" and memory["peak_bytes"] > 0
        assert memory["frozen_4bit"]["params"] > 0
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32"]) == 0

    from transformers import AutoModelForMaskedLM

    from grow.stages import load_run

    _, model, _, _ = load_run(run, "cuda")
    hf = AutoModelForMaskedLM.from_pretrained(out).cuda().eval()
    ids = torch.randint(3, 300, (2, 32), device="cuda")
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(input_ids=ids).logits.float()
    # CUDA bf16 compute in the 4-bit suffix vs an fp32 export of the dequantized weights.
    assert (ours - theirs).abs().max().item() < 0.1

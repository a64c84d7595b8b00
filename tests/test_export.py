"""grow export: one stock EuroBertForMaskedLM per run, the same function as the grown model.

One tiny 3-block run (4-bit NF4 suffix with LoRA adapters, the default) is grown once for
the module; exports of it are cheap (a second each). The hub is mocked at ``HfApi``.
"""

import json
import shutil

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_overrides, write_corpus
from grow.cli import main
from grow.errors import UserError
from grow.export import check_repo_id, export_run, redact
from grow.model import BLOCK_LINEARS
from grow.stages import load_run
from grow.store import list_stages, load_weights

EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "grow.json",
                "README.md"}
FAKE_TOKEN = "hf_FAKE1234567890abcdefSECRET"


def run_cli(*args):
    return main([str(a) for a in args])


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("grow: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export-run")
    corpus = write_corpus(base / "corpus.txt")
    path = base / "run"
    assert run_cli("train", "configs/tiny.yaml", "--out", path, *tiny_overrides(corpus, blocks=3)) == 0
    return path


@pytest.fixture(scope="module")
def grown(run):
    """(config, model, tokenizer) of the run as training left it, and its held-out split."""
    from grow.data import load_corpus

    cfg, model, tokenizer, _ = load_run(run, require_complete=True)
    corpus = load_corpus(cfg.data, run / "tokenizer", cfg.train.seed, log=lambda s: None)
    return cfg, model, tokenizer, corpus.heldout


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The default export (dequantized; fp32 because the run trained in fp32)."""
    out = tmp_path_factory.mktemp("exports") / "model"
    export_run(run, out, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def exported_original(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "original"
    export_run(run, out, merge_into="original", log=lambda s: None)
    return out


def load_hf(directory):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(directory)).eval()


def corrupted(heldout, ratio, mask_id, n=4, seed=0):
    from grow.noise import HELDOUT_SALT, corrupt, mask_scores, nested_mask

    ids = heldout[:n]
    mask = nested_mask(mask_scores(list(range(n)), ids.shape[1], seed, HELDOUT_SALT), ratio)
    return corrupt(ids, mask, mask_id)


# --------------------------------------------------------------------------- what is written


def test_export_is_a_stock_masked_lm_without_adapters(exported, run, grown):
    from transformers import AutoTokenizer, EuroBertForMaskedLM

    assert {p.name for p in exported.iterdir()} == EXPORT_FILES
    assert not list(exported.parent.glob(".*"))  # no temp or old directories left beside it
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["EuroBertForMaskedLM"] and config["model_type"] == "eurobert"
    assert "auto_map" not in config and config["dtype"] == "float32"
    hf = load_hf(exported)
    assert type(hf) is EuroBertForMaskedLM
    assert not [n for n in hf.state_dict() if "lora" in n or "base_layer" in n]
    assert not [n for n, _ in hf.named_modules() if "lora" in n]
    linears = [m for m in hf.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)  # no peft or bitsandbytes layer
    assert len(hf.model.layers) == 3
    on_disk = load_weights(exported) if (exported / "model.safetensors.index.json").exists() else load_file(
        exported / "model.safetensors")
    assert not [k for k in on_disk if "lora" in k] and "lm_head.weight" in on_disk

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    _, _, run_tokenizer, _ = grown
    assert tokenizer.mask_token == run_tokenizer.mask_token == "[MASK]"
    assert tokenizer.mask_token_id == run_tokenizer.mask_token_id == config["mask_token_id"]
    text = "in the beginning god created the heavens"
    assert tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"]


def test_grow_json_and_model_card(exported, run, grown):
    cfg = grown[0]
    meta = json.loads((exported / "grow.json").read_text())
    stages = list_stages(run)
    assert meta["format_version"] == 2
    assert meta["schedule"] == cfg.ratios()
    assert meta["curriculum"] == {"kind": "right_to_left", "time": "depth", "final_steps": 0}
    assert meta["paths"] == {"1": [1, 3], "2": [2, 3], "3": [3, 3]}
    assert meta["sampling"] == {"mode": "depth", "steps": 64, "temperature": 0.0}
    assert meta["merge_into"] == "dequantized" and meta["dtype"] == "fp32"
    assert meta["merge"] == {"adapter_blocks": [2, 3], "dequantized_blocks": [2, 3]}
    assert [s["stage"] for s in meta["stages"]] == ["stage-01-block03", "stage-02-block02", "stage-03-block01"]
    for i, s in enumerate(meta["stages"], start=1):
        m = stages[i].manifest
        assert (s["noise"], s["steps"], s["tokens_seen"], s["heldout_ce"]) == (
            m["stage"]["noise"], m["steps"], m["tokens_seen"], m["heldout_ce"])
    last = stages[3].manifest["levels"]
    assert [(e["level"], e["whole"], e["path"]) for e in meta["levels"]] == [
        (k, last["whole"][str(k)], last["path"][str(k)]) for k in (1, 2, 3)]
    assert meta["command"] == (f"grow export {run} --out {exported} --dtype fp32 --merge-into dequantized "
                               "--max-shard-size 2GB")
    assert set(meta["versions"]) >= {"grow", "torch", "transformers"}
    assert meta["check"]["max_abs_logit_diff"] <= 1e-4

    card = (exported / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {"library_name": "transformers", "pipeline_tag": "fill-mask",
                                     "tags": ["diffusion", "masked-diffusion", "grow"]}
    assert meta["command"] in body and "AutoModelForMaskedLM.from_pretrained" in body and "grow sample" in body
    for s in meta["stages"]:
        assert f"| {s['stage']} |" in body and f"{s['heldout_ce']:.4f} |" in body
    for e in meta["levels"]:  # the whole-stack figures a downloader gets
        assert f"| {e['level']} | {e['ratio']:.3f} | {e['whole']:.4f} | {e['path']:.4f} |" in body
    assert "dequantized" in body


# --------------------------------------------------------------------------- the function is preserved


def test_dequantized_export_computes_what_training_computed(exported, grown):
    from grow.evaluate import heldout_ce

    cfg, model, tokenizer, heldout = grown
    hf = load_hf(exported)
    mask_id = tokenizer.mask_token_id
    with torch.no_grad():
        for ratio in cfg.ratios():
            ids = corrupted(heldout, ratio, mask_id)
            diff = (model(ids) - hf(input_ids=ids).logits).abs().max().item()
            assert diff <= 1e-4, (ratio, diff)
    kw = dict(mask_token_id=mask_id, seed=cfg.train.seed, batch_size=4, batches=2)
    for ratio in cfg.ratios():
        ours = heldout_ce(lambda x, t: model(x), heldout, ratio, **kw)
        theirs = heldout_ce(lambda x, t: hf(input_ids=x).logits, heldout, ratio, **kw)
        assert abs(ours - theirs) <= 1e-4


def test_merged_weights_are_base_plus_adapter_delta_from_the_peft_files(exported, exported_original, run):
    """Independent of grow's merge: W + (B @ A) * alpha / r from the last stage's peft files."""
    import bitsandbytes.functional as F

    stage1 = list_stages(run)[3].path
    adapters = load_file(stage1 / "adapter_model.safetensors")
    adapter_config = json.loads((stage1 / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    deq, orig = load_weights_any(exported), load_weights_any(exported_original)
    stored = {k: load_weights(list_stages(run)[4 - k].path) for k in (1, 2, 3)}  # stage 4-k trained block k
    nonzero = 0
    for k in (2, 3):
        for name in BLOCK_LINEARS:
            key = f"model.layers.{k - 1}.{name}"
            A = adapters[f"base_model.model.{key}.lora_A.weight"]
            B = adapters[f"base_model.model.{key}.lora_B.weight"]
            delta = (B @ A) * scale
            nonzero += int(delta.abs().max() > 0)
            W = stored[k][f"{key}.weight"]
            torch.testing.assert_close(orig[f"{key}.weight"], W + delta, rtol=0, atol=1e-6)
            packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            torch.testing.assert_close(deq[f"{key}.weight"], F.dequantize_4bit(packed, state) + delta,
                                       rtol=0, atol=1e-6)
    assert nonzero == 14  # every adapter learned something, so the merge was really tested
    for name in BLOCK_LINEARS:  # block 1 never ran in 4-bit nor had an adapter
        key = f"model.layers.0.{name}.weight"
        assert torch.equal(deq[key], stored[1][key]) and torch.equal(orig[key], stored[1][key])


def load_weights_any(directory):
    if (directory / "model.safetensors.index.json").exists():
        return load_weights(directory)
    return load_file(directory / "model.safetensors")


def test_original_merge_differs_from_training_but_is_finite(exported_original, grown):
    cfg, model, tokenizer, heldout = grown
    hf = load_hf(exported_original)
    ids = corrupted(heldout, 0.5, tokenizer.mask_token_id)
    with torch.no_grad():
        diff = (model(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert diff > 0 and torch.isfinite(torch.tensor(diff))
    meta = json.loads((exported_original / "grow.json").read_text())
    assert meta["merge_into"] == "original" and meta["merge"]["dequantized_blocks"] == []
    assert 0 < meta["check"]["max_abs_logit_diff"] < float("inf")
    assert "full-precision" in (exported_original / "README.md").read_text()


def test_bf16_sharded_export_reloads_and_samples(run, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert run_cli("export", run, "--out", out, "--dtype", "bf16", "--max-shard-size", "40KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for v in load_weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "grow.json").read_text())["dtype"] == "bf16"
    hf = load_hf(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    capsys.readouterr()
    assert run_cli("sample", out, "--length", 8, "--temperature", 0, "--device", "cpu") == 0
    assert capsys.readouterr().out.strip()


# --------------------------------------------------------------------------- the output directory


def test_existing_out_is_refused_without_overwrite(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_cli("export", run, "--out", out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("grow: error: --out:") and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_may_not_be_the_run(run, capsys):
    assert run_cli("export", run, "--out", run, "--overwrite") == 2
    assert one_error_line(capsys.readouterr().err).startswith("grow: error: --out:")
    assert len(list_stages(run)) == 3


def test_overwrite_replaces_only_after_the_new_export_is_complete(run, tmp_path, monkeypatch):
    import grow.export

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old export")

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(grow.export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run, out, overwrite=True, log=lambda s: None)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the temp directory is gone

    monkeypatch.undo()
    export_run(run, out, overwrite=True, log=lambda s: None)
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_incomplete_run_is_refused(run, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("stage-03-*"))
    assert run_cli("export", partial, "--out", tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("grow: error: RUN:") and "2 of 3 stages" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the hub (mocked)


@pytest.mark.parametrize("repo_id", ["a/b/c", "user/re po", "user/repo--x", "user/repo..x", "user/repo.git",
                                     "user/" + "x" * 92, "üser/repo", "user/-repo", ""])
def test_bad_repo_id_is_refused_before_any_work(repo_id, run, tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: called.append(a))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert run_cli("export", run, "--out", tmp_path / "out", "--push-to-hub", repo_id) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("grow: error: --push-to-hub:")
    assert not (tmp_path / "out").exists() and not called


def test_good_repo_ids_pass():
    for repo_id in ("user/repo", "repo", "Org-1/my_model.v2", "u/" + "x" * 94):
        check_repo_id(repo_id)
    with pytest.raises(UserError, match="--push-to-hub"):
        check_repo_id("u/" + "x" * 95)


def test_push_without_a_token_is_refused_before_any_work(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert run_cli("export", run, "--out", tmp_path / "out", "--push-to-hub", "user/repo") == 2
    assert "HF_TOKEN" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_hub_flags_need_push_to_hub(run, tmp_path, capsys):
    assert run_cli("export", run, "--out", tmp_path / "out", "--private") == 2
    assert "--push-to-hub" in one_error_line(capsys.readouterr().err)


class FakeHub:
    """Records every call grow makes on ``HfApi``; ``upload_folder`` may fail."""

    def __init__(self, monkeypatch, fail: Exception | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: set[str] = set()
        hub = self

        def create_repo(api, *args, **kwargs):
            hub.calls.append(("create_repo", args, kwargs))

        def create_branch(api, *args, **kwargs):
            hub.calls.append(("create_branch", args, kwargs))

        def upload_folder(api, *args, **kwargs):
            hub.calls.append(("upload_folder", args, kwargs))
            from pathlib import Path

            hub.uploaded = {p.name for p in Path(kwargs["folder_path"]).iterdir()}
            if fail is not None:
                raise fail
            return "https://huggingface.co/user/repo/commit/abc"

        for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_folder", upload_folder)]:
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)


def test_push_to_hub_creates_the_repo_and_branch_then_uploads_the_export(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = FakeHub(monkeypatch)
    out = tmp_path / "model"
    assert run_cli("export", run, "--out", out, "--push-to-hub", "user/repo", "--private", "--revision", "dev") == 0
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    _, args, kwargs = hub.calls[0]
    assert args == ("user/repo",) and kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    _, args, kwargs = hub.calls[1]
    assert args == ("user/repo",) and kwargs == {"branch": "dev", "exist_ok": True, "repo_type": "model"}
    _, args, kwargs = hub.calls[2]
    assert kwargs["folder_path"] == str(out) and kwargs["repo_id"] == "user/repo" and kwargs["revision"] == "dev"
    assert kwargs["repo_type"] == "model" and kwargs["commit_message"]
    assert "token" not in kwargs and all("token" not in c[2] for c in hub.calls)
    assert hub.uploaded == EXPORT_FILES  # the finished export, not a temp directory
    out_text = capsys.readouterr().out
    assert "pushed" in out_text and "https://huggingface.co/user/repo" in out_text
    meta = json.loads((out / "grow.json").read_text())
    assert meta["command"].endswith("--push-to-hub user/repo --private --revision dev")
    assert 'from_pretrained("user/repo")' in (out / "README.md").read_text()


def test_push_without_revision_creates_no_branch(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = FakeHub(monkeypatch)
    assert run_cli("export", run, "--out", tmp_path / "model", "--push-to-hub", "repo") == 0
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is False and hub.calls[1][2]["revision"] is None


def test_failed_upload_keeps_the_export_and_says_how_to_retry(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    FakeHub(monkeypatch, fail=ConnectionError("503 Service Unavailable\nretry later"))
    out = tmp_path / "model"
    assert run_cli("export", run, "--out", out, "--push-to-hub", "user/repo") == 1
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("grow: error: --push-to-hub: upload to user/repo failed")
    assert "ConnectionError: 503 Service Unavailable" in line and "retry later" not in line
    assert f"hf upload user/repo {out} ." in line and "is complete" in line


def test_redact_removes_the_token_and_token_shaped_strings():
    assert redact(f"Bearer {FAKE_TOKEN} failed", FAKE_TOKEN) == "Bearer *** failed"
    assert redact("other hf_abcdefghijklmnopqrstuvwxyz0123 leaked", None) == "other hf_*** leaked"
    assert redact("user/repo not found", FAKE_TOKEN) == "user/repo not found"

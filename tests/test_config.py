"""Config: YAML -> validated dataclasses, --set overrides, one-line errors naming the field."""

from pathlib import Path

import pytest

from grow.config import GrowConfig, load_config
from grow.errors import UserError

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, tmp_path):
    from test_convert import shipped_config

    cfg = shipped_config(path, tmp_path)
    assert isinstance(cfg, GrowConfig)
    assert len(cfg.ratios()) == cfg.model.num_blocks


def test_tiny_is_the_design_card_example():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.ratios() == [1.00, 0.75, 0.55, 0.40, 0.25, 0.15]
    assert (cfg.model.num_blocks, cfg.model.hidden_size, cfg.data.seq_len) == (6, 128, 128)
    assert 4000 <= cfg.data.vocab_size <= 8000


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/tiny.yaml", ["train.lr=3e-3", "model.hidden_size=64", "schedule.ratios=null",
                                             "schedule.kind=cosine", "lora.targets=[Wq, Wv, down_proj]"])
    assert cfg.train.lr == 0.003 and cfg.model.hidden_size == 64
    assert cfg.schedule.ratios is None and cfg.ratios()[0] == 1.0 and cfg.ratios()[-1] == 0.15
    assert cfg.lora.targets == ["q_proj", "v_proj", "down_proj"]


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.model.intermediate_size % 64 == 0 and cfg.model.num_kv_heads == cfg.model.num_heads


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("model: [1, 2", [], r"not valid YAML"),
        ("- a\n- b\n", [], r"must be a mapping"),
        ("model:\n  widht: 3\n", [], r"^model\.widht: unknown field"),
        ("bogus: {}\n", [], r"^bogus: unknown field"),
        ("model:\n  hidden_size: abc\n", [], r"^model\.hidden_size: expected an integer"),
        ("", ["schedule.ratios=[1.0, 0.5, 0.7, 0.4, 0.2, 0.1]"], r"schedule\.ratios: must be strictly decreasing"),
        ("", ["schedule.ratios=[1.5, 0.9, 0.7, 0.4, 0.2, 0.1]"], r"schedule\.ratios\[0\]: mask ratio 1.5 is outside"),
        ("", ["schedule.ratios=[1.0, 0.9, 0.7, 0.4, 0.2, 0.0]"], r"outside \(0, 1\]"),
        ("", ["schedule.ratios=[1.0, 0.5, 0.2]"], r"schedule\.ratios: has 3 levels but model\.num_blocks=6"),
        ("", ["stability.gamma=1.5"], r"^stability\.gamma: expected a residual gain in \(0, 1\]"),
        ("", ["stability.gamma=0"], r"^stability\.gamma"),
        ("", ["model.num_heads=3"], r"^model\.num_heads: 3 heads do not divide"),
        ("", ["model.num_kv_heads=3"], r"^model\.num_kv_heads"),
        ("", ["train.precision=fp8"], r"^train\.precision: expected one of fp32, bf16"),
        ("", ["train.steps=[1, 2]"], r"^train\.steps: has 2 entries"),
        ("", ["lora.rank=0"], r"^lora\.rank"),
        ("", ["lora.targets=[Wz]"], r"^lora\.targets: unknown target module 'Wz'"),
        ("", ["quant.quant_type=int3"], r"^quant\.quant_type: expected one of nf4, fp4"),
        ("", ["nosection"], r"^--set: expected section\.key=value"),
        ("", ["data.seq_len=1024"], r"^data\.seq_len: 1024 exceeds model\.max_position_embeddings"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(_write(tmp_path, text), overrides)


def test_missing_file():
    with pytest.raises(UserError, match="config: no such file"):
        load_config("does/not/exist.yaml")


def test_a_config_names_only_what_it_changes_from_its_base(tmp_path):
    from grow.config import load_config

    (tmp_path / "base.yaml").write_text("model: {num_blocks: 3, hidden_size: 64}\ntrain: {steps: [1, 2, 3]}\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nmodel: {hidden_size: 32}\ntrain: {steps: 5}\n")
    cfg = load_config(tmp_path / "variant.yaml")
    assert (cfg.model.num_blocks, cfg.model.hidden_size, cfg.train.steps) == (3, 32, 5)  # merged; a list replaced
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="no such file: .*nowhere.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_a_final_stage_of_adapters_needs_lora():
    with pytest.raises(UserError, match="curriculum.final_trains: adapters trains the LoRA adapters"):
        load_config("configs/tiny.yaml", ["lora.enabled=false"])
    cfg = load_config("configs/tiny.yaml", ["lora.enabled=false", "curriculum.final_trains=free_block"])
    assert cfg.curriculum.final_steps > 0

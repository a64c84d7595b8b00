"""Safety promises that hold for the whole package: no code execution on load, no token leaks."""

import ast
import logging
import re
from pathlib import Path

import huggingface_hub
import pytest

from conftest import tiny_overrides, write_corpus
from grow.cli import main

PACKAGE = Path(__file__).resolve().parent.parent / "grow"
FORBIDDEN = {
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "pickle.load": re.compile(r"pickle\s*\.\s*loads?\b"),
}
FAKE_TOKEN = "hf_FAKE1234567890abcdefSECRET"


def sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5, f"no package sources found under {PACKAGE}"
    return files


def test_no_unsafe_loading_anywhere_in_the_package():
    found = []
    for path in sources():
        text = path.read_text()
        for name, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    assert not found, "unsafe loading in grow/:\n" + "\n".join(found)


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, "torch.load without weights_only=True: " + ", ".join(offenders)


# --------------------------------------------------------------------------- the hub token


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("safety-run")
    corpus = write_corpus(base / "corpus.txt")
    path = base / "run"
    assert main(["train", "configs/tiny.yaml", "--out", str(path), *tiny_overrides(corpus, blocks=2)]) == 0
    return path


def leaky_hub(monkeypatch, fail: bool) -> None:
    """A hub library whose exceptions carry the token (as request dumps of some versions did)."""

    def create_repo(api, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(api, **kwargs):
        if fail:
            raise PermissionError(f"401 Client Error for url https://huggingface.co/api (token={FAKE_TOKEN}) "
                                  f"\nrequest headers: {{'authorization': 'Bearer {FAKE_TOKEN}'}}")
        return "https://huggingface.co/user/repo/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda api, repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def every_file_text(*directories: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for d in directories for p in d.rglob("*") if p.is_file())


@pytest.mark.parametrize("capture", ["capsys", "capfd"])
def test_the_hub_token_never_leaks(capture, run, tmp_path, monkeypatch, caplog, request):
    cap = request.getfixturevalue(capture)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    seen = []

    # A failing upload whose exception text carries the token.
    leaky_hub(monkeypatch, fail=True)
    failed = tmp_path / "failed"
    assert main(["export", str(run), "--out", str(failed), "--push-to-hub", "user/repo"]) == 1
    out, err = cap.readouterr()
    assert "upload to user/repo failed" in err and "PermissionError" in err  # the failure is reported...
    assert "***" in err  # ...with the token redacted
    seen += [out, err]

    # A successful upload.
    leaky_hub(monkeypatch, fail=False)
    pushed = tmp_path / "pushed"
    assert main(["export", str(run), "--out", str(pushed), "--push-to-hub", "user/repo", "--revision", "main"]) == 0
    out, err = cap.readouterr()
    assert "pushed" in out
    seen += [out, err]

    assert (failed / "grow.json").is_file() and (pushed / "grow.json").is_file()
    seen.append(every_file_text(failed, pushed, run))
    seen += [r.getMessage() for r in caplog.records]
    for text in seen:
        assert FAKE_TOKEN not in text

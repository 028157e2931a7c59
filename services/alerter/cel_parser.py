"""cel-python's parser, its grammar analysed once a machine rather than once a process.

cel-python builds one Lark LALR parser a process, on the first expression compiled, from its
grammar: 0.11 s of analysis, most of a ten-rule file's load (0.13 s), paid by `trawl up` when it
checks the rules and again by the alerter it starts. Lark can keep that analysis in a file and
load it (0.01 s), checked against the grammar's and the options' hash, so a cel-python upgrade
analyses again. The file is in the user's cache directory (not Lark's default, a name anyone can
create in /tmp before it), written under a name of its own and renamed into place, so a process
never reads one half written by another. Where no cache directory can be written, the parser is
built as cel-python builds it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import celpy
import lark
from celpy.celparser import CELParser

from trawl.logs import get_logger

log = get_logger(__name__)


def cache_dir() -> Path:
    """Where Trawl keeps what it can make again: $XDG_CACHE_HOME/trawl, or ~/.cache/trawl."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "trawl"


def _build(cache: str | bool) -> lark.Lark:
    # The options cel-python's CELParser gives, with the tree class its interpreted runner uses.
    return lark.Lark(
        (Path(celpy.__file__).parent / "cel.lark").read_text(encoding="utf-8"),
        parser="lalr",
        start="expr",
        debug=True,
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": CELParser.ambiguous_literals},
        propagate_positions=True,
        maybe_placeholders=False,
        priority="invert",
        tree_class=lark.Tree,
        cache=cache,
    )


def load_cel_parser(directory: Path | None = None) -> None:
    """Set cel-python's process-wide parser from the cached analysis (made and cached when
    missing or stale); nothing when this process has one already."""
    if CELParser.CEL_PARSER is not None:
        return
    folder = directory or cache_dir()
    path = folder / f"cel-grammar-lark-{lark.__version__}.cache"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            CELParser.CEL_PARSER = _build(str(path))  # Lark analyses again when the hash differs
            return
        handle, scratch = tempfile.mkstemp(dir=folder, prefix=".cel-grammar-")
        os.close(handle)
        os.unlink(scratch)  # Lark writes it; an empty file would be read as a stale cache
        try:
            CELParser.CEL_PARSER = _build(scratch)
            os.replace(scratch, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
    except OSError as exc:  # no writable cache directory: analyse in this process, as cel-python does
        log.debug("cel_parser_not_cached", directory=str(folder), error=str(exc))
        CELParser.CEL_PARSER = _build(False)

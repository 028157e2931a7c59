"""The committed generated code must be what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    # protoc finds the mypy plugins on PATH, which is the venv's bin when run from `make test`.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    fresh = {p.name: p.read_text() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_text() for p in (ROOT / "trawl" / "v1").iterdir() if p.is_file()}
    stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
    extra = sorted(set(committed) - set(fresh))
    assert not stale, f"regenerate with `make proto`: stale {stale}"
    assert not extra, f"generated files without a .proto: {extra}"

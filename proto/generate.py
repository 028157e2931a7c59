"""Generate the Python modules of the wire contract from proto/trawl/v1/*.proto.

The generated code is committed under trawl/v1/ (so an install needs no protoc);
tests/unit/test_wire_fresh.py regenerates into a temporary folder and fails when the
committed files differ, so a .proto change without a regeneration cannot land.

    python proto/generate.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "trawl" / "v1").glob("*.proto"))
GRPC_FILES = {"recorder.proto"}


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py and *_pb2.pyi (and *_pb2_grpc.py for services) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTO_FILES:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--mypy_out={out_dir}"]
        if proto.name in GRPC_FILES:
            args += [f"--grpc_python_out={out_dir}", f"--mypy_grpc_out={out_dir}"]
        if protoc.main([*args, str(proto)]) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    init = out_dir / "trawl" / "v1" / "__init__.py"
    init.write_text('"""Generated protobuf modules of the wire contract (see proto/)."""\n')
    return sorted((out_dir / "trawl" / "v1").iterdir())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent)

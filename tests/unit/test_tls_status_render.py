"""`trawl tls status`'s table: a Go process's line names the calling convention its hooks
read (the live tests, tests/live/test_tls_go_live.py, ask a running collector)."""

from __future__ import annotations

from trawl.collector.tls_status import render


def row(pid: int, library: str, version: str, abi: str, hooked: bool, reason: str = "") -> dict[str, object]:
    return {
        "pid": pid,
        "comm": "prog",
        "pod_uid": "",
        "pod": "",
        "library": library,
        "version": version,
        "abi": abi,
        "path": f"/bin/prog{pid}",
        "hooked": hooked,
        "symbols": [],
        "reason": reason,
    }


def test_a_go_process_line_names_its_abi_and_an_openssl_one_none() -> None:
    report = {
        "node": "n1",
        "bpf": "loaded",
        "chunks_published": 3,
        "lost": {},
        "processes": [
            row(10, "go", "go1.16.15", "stack", True),
            row(11, "go", "go1.19.8", "register", True),
            row(12, "openssl", "3", "", True),
            row(13, "go", "go1.21.3", "", False, "unsupported architecture: ELF machine 183 (amd64 only)"),
        ],
    }
    lines = {line.split()[0]: line for line in render([report]).splitlines()[2:]}
    assert " go go1.16.15 (stack ABI) " in lines["10"] and " yes " in lines["10"]
    assert " go go1.19.8 (register ABI) " in lines["11"]
    assert " openssl 3 " in lines["12"] and "ABI" not in lines["12"]
    assert " no " in lines["13"] and "ABI" not in lines["13"].split("unsupported")[0]

"""Where Go's crypto/tls is in an executable (trawl.collector.tls_go), on stand-in ELF files
written here with the layouts Go's linker writes (`.gopclntab` of Go 1.16 and of 1.20,
`.go.buildinfo` of 1.18+ and before): real Go binaries, stripped and not, are read by
tests/live/test_tls_go_live.py, which builds them with Go. Bad files give None, never an error."""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trawl.collector.tls_go import (
    PCLNTAB_GO116,
    PCLNTAB_GO120,
    READ,
    WRITE,
    GoBinaries,
    StaticSsl,
    abi_of_prologue,
    abi_of_version,
    inspect,
    inspect_executable,
    register_abi,
    returns_of,
)

TEXT = 0x401000
# push rbp; mov rbp, rsp; ret; int3; nop; pop rbp; ret  (RETs at +4 and +7)
WRITE_CODE = b"\x55\x48\x89\xe5\xc3\xcc\x90\x5d\xc3" + b"\xcc" * 7
# xor eax, eax; ret; (a byte no decoder takes) ; ret  (RETs at +2 and +4)
READ_CODE = b"\x31\xc0\xc3\x0f\xc3" + b"\xcc" * 11
NAMES = [b"main.main", WRITE.encode(), READ.encode()]


def pclntab(magic: int, text: int, entries: list[int], end: int) -> bytes:
    """A .gopclntab naming NAMES at `entries` (offsets from `text`)."""
    names = b"".join(name + b"\0" for name in NAMES)
    name_offsets = [sum(len(name) + 1 for name in NAMES[:index]) for index in range(len(NAMES))]
    count = len(NAMES)
    if magic == PCLNTAB_GO120:
        header_size = 72
        funcnames = header_size
        pcln = funcnames + len(names)
        functab = b"".join(
            struct.pack("<II", entry, (count * 8 + 4) + index * 8) for index, entry in enumerate(entries)
        )
        functab += struct.pack("<I", end)
        funcs = b"".join(struct.pack("<Ii", entry, name_offsets[i]) for i, entry in enumerate(entries))
        words = [count, 0, text, funcnames, 0, 0, 0, pcln]
    else:
        header_size = 64
        funcnames = header_size
        pcln = funcnames + len(names)
        functab = b"".join(
            struct.pack("<QQ", text + entry, (count * 16 + 8) + index * 16) for index, entry in enumerate(entries)
        )
        functab += struct.pack("<Q", text + end)
        funcs = b"".join(struct.pack("<Qi4x", text + entry, name_offsets[i]) for i, entry in enumerate(entries))
        words = [count, 0, funcnames, 0, 0, 0, pcln]
    header = struct.pack("<IBBBB", magic, 0, 0, 1, 8) + b"".join(struct.pack("<Q", word) for word in words)
    return header.ljust(header_size, b"\0") + names + functab + funcs


def buildinfo(version: str, modinfo: str = "") -> bytes:
    """Go 1.18+'s .go.buildinfo: the version and the module information inline, each after its length."""
    encoded, module = version.encode(), modinfo.encode()
    assert len(encoded) < 128 and len(module) < 128  # one-byte varints
    header = b"\xff Go buildinf:" + bytes([8, 2]) + b"\0" * 16
    return header + bytes([len(encoded)]) + encoded + bytes([len(module)]) + module


def elf(sections: dict[str, tuple[int, bytes]], machine: int = 62) -> bytes:
    """A 64-bit little-endian ELF executable of these (name: (address, bytes)) sections."""
    names = b"\0" + b"".join(name.encode() + b"\0" for name in [*sections, ".shstrtab"])
    body = b""
    offsets = {}
    for name, (_, data) in sections.items():
        offsets[name] = 64 + len(body)
        body += data
    strtab_offset = 64 + len(body)
    body += names
    shoff = 64 + len(body)
    headers = b"\0" * 64  # section 0
    position = 1
    for name, (address, data) in sections.items():
        headers += struct.pack("<IIQQQQIIQQ", position, 1, 6, address, offsets[name], len(data), 0, 0, 16, 0)
        position += len(name) + 1
    headers += struct.pack("<IIQQQQIIQQ", position, 3, 0, 0, strtab_offset, len(names), 0, 0, 1, 0)
    count = len(sections) + 2
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, TEXT, 0, shoff, 0, 64, 56, 0, 64, count, count - 1)
    return header + body + headers


def go_file(
    tmp_path: Path, version: str, magic: int, machine: int = 62, prologue: bytes = b"", modinfo: str = ""
) -> Path:
    """A Go executable with crypto/tls's two functions (each starting with `prologue`)."""
    if prologue:  # the check, then a RET (all of a function that fits its 16 bytes)
        write = read = (prologue + b"\xc3").ljust(16, b"\xcc")
    else:
        write, read = WRITE_CODE, READ_CODE
    code = b"\xcc" * 16 + write + read
    path = tmp_path / "prog"
    path.write_bytes(
        elf(
            {
                ".text": (TEXT, code),
                ".gopclntab": (0x500000, pclntab(magic, TEXT, [0, 16, 32], 48)),
                ".go.buildinfo": (0x600000, buildinfo(version, modinfo)),
            },
            machine,
        )
    )
    return path


def test_the_register_abi_go_binary_gives_each_function_entry_and_returns(tmp_path: Path) -> None:
    found = inspect(str(go_file(tmp_path, "go1.21.3", PCLNTAB_GO120)))
    assert found is not None and found.error == "" and found.version == "go1.21.3"
    by_name = {function.name: function for function in found.functions}
    assert by_name[WRITE].entry == TEXT + 16 and by_name[WRITE].returns == (TEXT + 20, TEXT + 24)
    assert by_name[READ].entry == TEXT + 32 and by_name[READ].returns == (TEXT + 34, TEXT + 36)


# The stack-bound check that opens a Go function: the register ABI's through g in R14
# (cmp rsp, [r14+0x10]), the stack ABI's after loading g from thread-local storage
# (mov rcx, fs:[-8]; cmp rsp, [rcx+0x10]).
REGISTER_PROLOGUE = b"\x49\x3b\x66\x10"
STACK_PROLOGUE = b"\x64\x48\x8b\x0c\x25\xf8\xff\xff\xff\x48\x3b\x61\x10"


def test_go_before_1_17_is_hooked_with_the_stack_abi(tmp_path: Path) -> None:
    old = inspect(str(go_file(tmp_path, "go1.16.15", PCLNTAB_GO116, prologue=STACK_PROLOGUE)))
    assert old is not None and (old.error, old.abi) == ("", "stack")
    assert [function.name for function in old.functions] == [WRITE, READ]
    assert all(function.returns for function in old.functions)


def test_the_abi_comes_from_the_experiments_in_force_and_the_code_must_agree(tmp_path: Path) -> None:
    # 1.17 with GOEXPERIMENT=noregabi: the linker's " X:" suffix says the stack ABI.
    found = inspect(str(go_file(tmp_path, "go1.17.13 X:noregabi", PCLNTAB_GO116, prologue=STACK_PROLOGUE)))
    assert found is not None and (found.error, found.abi) == ("", "stack")
    # 1.19 asked for noregabi (the build setting) and compiled the register ABI: register.
    asked = inspect(
        str(
            go_file(
                tmp_path,
                "go1.19.8",
                PCLNTAB_GO120,
                prologue=REGISTER_PROLOGUE,
                modinfo="path\tgotls\nbuild\tGOEXPERIMENT=noregabi\nbuild\tGOOS=linux\n",
            )
        )
    )
    assert asked is not None and (asked.error, asked.abi, asked.experiment) == ("", "register", "noregabi")
    # No version: the code decides.
    unversioned = inspect(str(go_file(tmp_path, "", PCLNTAB_GO120, prologue=STACK_PROLOGUE)))
    assert unversioned is not None and (unversioned.error, unversioned.abi) == ("", "stack")
    # The build information and the code disagree: not hooked, and why.
    odd = inspect(str(go_file(tmp_path, "go1.16.15", PCLNTAB_GO116, prologue=REGISTER_PROLOGUE)))
    assert odd is not None and odd.functions == []
    assert odd.error == "unsupported Go ABI: the build information (go1.16.15) and the code (register ABI) disagree"
    nothing = inspect(str(go_file(tmp_path, "", PCLNTAB_GO120)))
    assert nothing is not None and nothing.error.startswith("unsupported Go ABI: no Go version")


def test_other_architectures_are_reported_not_hooked(tmp_path: Path) -> None:
    arm = inspect(str(go_file(tmp_path, "go1.21.3", PCLNTAB_GO120, machine=183)))
    assert arm is not None and arm.error == "unsupported architecture: ELF machine 183 (amd64 only)"


def test_the_1_16_table_layout_is_read(tmp_path: Path) -> None:
    # A 1.17 binary keeps 1.16's table layout and has the register ABI.
    found = inspect(str(go_file(tmp_path, "go1.17.13", PCLNTAB_GO116)))
    assert found is not None and found.error == ""
    assert [(function.name, function.entry) for function in found.functions] == [(WRITE, TEXT + 16), (READ, TEXT + 32)]


def test_not_go_or_go_without_tls_is_none(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(elf({".text": (TEXT, b"\xc3")}))
    assert inspect(str(plain)) is None
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert inspect(str(script)) is None
    assert inspect(str(tmp_path / "missing")) is None
    no_tls = tmp_path / "no-tls"
    table = pclntab(PCLNTAB_GO120, TEXT, [0, 16, 32], 48).replace(b"crypto/tls", b"crypto/xyz")
    no_tls.write_bytes(elf({".text": (TEXT, b"\xcc" * 48), ".gopclntab": (0x500000, table)}))
    assert inspect(str(no_tls)) is None


def test_an_executable_is_read_once_per_version_of_the_file(tmp_path: Path) -> None:
    path = go_file(tmp_path, "go1.21.3", PCLNTAB_GO120)
    cache = GoBinaries()
    first = cache.lookup(str(path), path.stat())
    assert first is not None
    assert cache.lookup(str(path), path.stat()) is first
    path.write_bytes(b"replaced")
    assert cache.lookup(str(path), path.stat()) is None


def test_abi_of_versions_and_prologues() -> None:
    versions = ("go1.16.15", "go1.17", "go1.17.13 X:noregabi", "go1.17.2 X:noregabiargs", "go1.19.8", "devel +abc")
    assert [abi_of_version(version) for version in versions] == [
        "stack",
        "register",
        "stack",
        "stack",
        "register",
        "",
    ]
    assert abi_of_prologue(REGISTER_PROLOGUE + WRITE_CODE, TEXT) == "register"
    assert abi_of_prologue(STACK_PROLOGUE + WRITE_CODE, TEXT) == "stack"
    assert abi_of_prologue(WRITE_CODE, TEXT) == ""


def test_returns_and_versions() -> None:
    assert returns_of(b"\xc3\x90\xc2\x08\x00\xc3", 0x1000) == (0x1000, 0x1002, 0x1005)
    assert [register_abi(v) for v in ("go1.16.15", "go1.17", "go1.22.1", "devel +abc", "")] == [
        False,
        True,
        True,
        False,
        False,
    ]


@given(st.data())
def test_damaged_files_give_none_or_a_result_never_an_error(data: st.DataObject) -> None:
    good = bytearray(
        elf(
            {
                ".text": (TEXT, b"\xcc" * 16 + WRITE_CODE + READ_CODE),
                ".gopclntab": (0x500000, pclntab(PCLNTAB_GO120, TEXT, [0, 16, 32], 48)),
                ".go.buildinfo": (0x600000, buildinfo("go1.21.3")),
            }
        )
    )
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(good) - 1))
        good[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(good)))
    with tempfile.NamedTemporaryFile() as file:
        file.write(bytes(good[:cut]))
        file.flush()
        result = inspect(file.name)
    assert result is None or all(function.entry >= 0 for function in result.functions)


def test_an_executable_defining_ssl_functions_is_static_ssl_and_one_importing_them_is_not(tmp_path: Path) -> None:
    """Built here with gcc: one executable defines SSL_read and SSL_write itself (as one with
    OpenSSL linked in does), another calls them from a shared library it links (as the openssl
    command does): only the first is a target, stripped of .symtab or not (.dynsym is read)."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc (make test installs it)")
    (tmp_path / "own.c").write_text(
        "int SSL_read(void) { return 1; }\nint SSL_write(void) { return 2; }\nint main(void) { return 0; }\n"
    )
    (tmp_path / "lib.c").write_text("int SSL_read(void) { return 1; }\nint SSL_write(void) { return 2; }\n")
    (tmp_path / "user.c").write_text(
        "int SSL_read(void);\nint SSL_write(void);\nint main(void) { return SSL_read(); }\n"
    )
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, timeout=60)
    run(["gcc", "-rdynamic", "-o", "own", "own.c"])
    run(["gcc", "-rdynamic", "-s", "-o", "own-stripped", "own.c"])
    run(["gcc", "-shared", "-fPIC", "-o", "libfake.so", "lib.c"])
    run(["gcc", "-o", "user", "user.c", "-L.", "-lfake"])
    for name in ("own", "own-stripped"):
        assert inspect_executable(str(tmp_path / name)) == StaticSsl(frozenset({"SSL_read", "SSL_write"})), name
    assert inspect_executable(str(tmp_path / "user")) is None

"""Go's crypto/tls inside an executable: where to hook it, read from the file itself.

Go links its TLS statically, and a stripped binary (`-ldflags=-s -w`) has no ELF symbol
table, but every Go binary keeps `.gopclntab`, the runtime's own table of function names and
entry addresses (tracebacks need it): `(*Conn).Write` and `(*Conn).Read` are found there. The
Go version comes from `.go.buildinfo` (what `go version <file>` prints).

Go moves a goroutine's stack when it grows, which breaks a uretprobe (it rewrites the return
address on the stack), so the return of each function is hooked with a uprobe on every RET
instruction of its body, found by disassembling it with capstone.

Both of Go's amd64 calling conventions are hooked (`GoBinary.abi`). The register ABI (Go
1.17 and later): arguments in RAX (the *Conn), RBX and RCX (the slice's pointer and length),
the result in RAX and the running goroutine in R14, which keys the pairing of entry and return
(a goroutine may move between threads inside the call). The stack ABI (Go before 1.17, and
1.17 built with GOEXPERIMENT=noregabi): arguments and results on the stack, read there by the
program (bpf/tls_openssl.c says how those calls are paired). Which one a binary uses is read
from its build information: the Go version, and the experiments its toolchain had in force,
which the linker appends to that version (" X:noregabi"). The GOEXPERIMENT build setting
(`go version -m`) is what was asked for, not what was done: from Go 1.18 on, amd64 has the
register ABI whatever it says (Debian's Go 1.19 records GOEXPERIMENT=noregabi and compiles the
same code). The prologue of each function says it too (the register ABI checks the stack
bound through g in R14, the stack ABI loads g from thread-local storage first); a binary whose
code and build information disagree is not hooked. Other architectures are reported, not
hooked.
"""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
STT_FUNC = 2
BUILDINFO_MAGIC = b"\xff Go buildinf:"
# The first word of .gopclntab, by the Go versions that write that layout.
PCLNTAB_GO12 = 0xFFFFFFFB  # 1.2 to 1.15
PCLNTAB_GO116 = 0xFFFFFFFA  # 1.16, 1.17
PCLNTAB_GO118 = 0xFFFFFFF0  # 1.18, 1.19
PCLNTAB_GO120 = 0xFFFFFFF1  # 1.20 and later
WRITE = "crypto/tls.(*Conn).Write"
READ = "crypto/tls.(*Conn).Read"
GO_VERSION = re.compile(r"go(\d+)\.(\d+)")
# Executables looked at, by (device, inode, size, mtime): most are not Go, and a full scan
# looks at every process's executable again.
CACHE_MAX = 4096


class NotGo(Exception):
    """The file is not a Go executable (or not one this reader understands)."""


@dataclass(slots=True, frozen=True)
class GoFunction:
    name: str
    entry: int  # virtual address
    returns: tuple[int, ...]  # virtual addresses of its RET instructions


REGISTER_ABI = "register"
STACK_ABI = "stack"


@dataclass(slots=True)
class GoBinary:
    """A Go executable with crypto/tls linked in: where to hook it, or why it cannot be."""

    version: str  # "go1.19.8" ("go1.17.13 X:noregabi"); "" when the file carries no build information
    functions: list[GoFunction] = field(default_factory=list)
    error: str = ""  # why it is not hooked ("" when it can be)
    abi: str = ""  # REGISTER_ABI or STACK_ABI ("" when not known)
    experiment: str = ""  # the GOEXPERIMENT build setting, as recorded (Go 1.18 and later)


@dataclass(slots=True, frozen=True)
class _Section:
    addr: int
    offset: int
    size: int
    type: int = 0
    link: int = 0


class _Elf:
    """The little of a 64-bit little-endian ELF file this needs: sections by name."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.size = os.fstat(file.fileno()).st_size
        header = file.read(64)
        if len(header) < 64 or header[:4] != ELF_MAGIC:
            raise NotGo("not an ELF file")
        if header[4] != 2 or header[5] != 1:
            raise NotGo("not a 64-bit little-endian ELF file")
        (self.machine,) = struct.unpack_from("<H", header, 18)
        (shoff,) = struct.unpack_from("<Q", header, 40)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 58)
        if not shoff or shentsize < 64 or shnum == 0 or shstrndx >= shnum:
            raise NotGo("no section headers")
        file.seek(shoff)
        table = file.read(shentsize * shnum)
        raw: list[tuple[int, _Section]] = []
        for index in range(shnum):
            name, kind, _flags, addr, offset, size, link = struct.unpack_from("<IIQQQQI", table, index * shentsize)
            raw.append((name, _Section(addr, offset, size, kind, link)))
        names_section = raw[shstrndx][1]
        names = self.read(names_section.offset, names_section.size)
        self.by_index = [section for _, section in raw]
        self.sections: dict[str, _Section] = {}
        for name, section in raw:
            end = names.find(b"\0", name)
            self.sections[names[name:end].decode("latin-1")] = section

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise NotGo(f"{size} bytes at {offset} are beyond the file's end")
        self.file.seek(offset)
        return self.file.read(size)

    def section(self, name: str) -> bytes | None:
        found = self.sections.get(name)
        return None if found is None else self.read(found.offset, found.size)

    def at(self, addr: int, size: int) -> bytes:
        """`size` bytes at virtual address `addr` (from the section holding it)."""
        for section in self.sections.values():
            if section.addr and section.addr <= addr < section.addr + section.size:
                return self.read(section.offset + addr - section.addr, size)
        raise NotGo(f"address {addr:#x} is in no section")

    def defined_functions(self, wanted: set[str]) -> set[str]:
        """Which of `wanted` the file defines as functions (its own code, not imports), from
        .symtab or, stripped, .dynsym."""
        found: set[str] = set()
        for table_name in (".symtab", ".dynsym"):
            table = self.sections.get(table_name)
            if table is None or table.link >= len(self.by_index):
                continue
            strings = self.by_index[table.link]
            names = self.read(strings.offset, strings.size)
            symbols = self.read(table.offset, table.size)
            for position in range(0, len(symbols) - 23, 24):
                name, info, _other, section_index = struct.unpack_from("<IBBH", symbols, position)
                if info & 0xF != STT_FUNC or section_index == 0:  # not a function, or undefined (imported)
                    continue
                end = names.find(b"\0", name)
                text = names[name:end].decode("latin-1")
                if text in wanted:
                    found.add(text)
            if found:
                break
        return found


def defined_functions(path: str, wanted: set[str]) -> set[str]:
    """Which of `wanted` the ELF file at `path` defines itself (empty for anything else)."""
    try:
        with open(path, "rb") as file:
            return _Elf(file).defined_functions(wanted)
    except (OSError, NotGo, struct.error, IndexError, OverflowError, ValueError):
        return set()


def _uvarint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise NotGo("build information cut short")


def build_info(elf: _Elf) -> tuple[str, str]:
    """(Go version, module information) from .go.buildinfo (("", "") when absent): what `go
    version -m` prints. The module information of Go 1.18 and later has the build settings."""
    data = elf.section(".go.buildinfo")
    if data is None or not data.startswith(BUILDINFO_MAGIC) or len(data) < 32:
        return "", ""
    pointer_size, flags = data[14], data[15]
    if flags & 2:  # Go 1.18 and later: the strings inline, each after its length as a varint
        length, position = _uvarint(data, 32)
        version = data[position : position + length].decode("utf-8", "replace")
        length, position = _uvarint(data, position + length)
        return version, data[position : position + length].decode("utf-8", "replace")
    # Older: pointers to Go string headers (data pointer, length), the version's then the modinfo's.
    word = "<Q" if pointer_size == 8 else "<I"
    strings = []
    for at in (16, 16 + pointer_size):
        (header,) = struct.unpack_from(word, data, at)
        if not header:
            strings.append("")
            continue
        pointer, length = struct.unpack_from(word[0] + word[1] * 2, elf.at(header, pointer_size * 2))
        strings.append(elf.at(pointer, length).decode("utf-8", "replace") if length else "")
    return strings[0], strings[1]


def go_version(elf: _Elf) -> str:
    """The Go version the binary was built with, from .go.buildinfo ("" when absent)."""
    return build_info(elf)[0]


def build_setting(modinfo: str, name: str) -> str:
    """A `build NAME=value` line of the module information ("" when absent)."""
    prefix = f"build\t{name}="
    for line in modinfo.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    return ""


def abi_of_version(version: str) -> str:
    """The amd64 calling convention a Go version compiles to ("" for an unknown version).

    The experiments in force are the version's " X:" suffix (the linker writes it when they
    differ from the release's defaults). Go 1.17 turned the register ABI on by default and
    GOEXPERIMENT=noregabi (or noregabiargs) turned it off; from 1.18 on amd64 keeps it on."""
    match = GO_VERSION.search(version)
    if match is None:
        return ""
    release = (int(match.group(1)), int(match.group(2)))
    if release < (1, 17):
        return STACK_ABI
    if release == (1, 17):
        _, _, experiments = version.partition(" X:")
        if {"noregabi", "noregabiargs"} & set(experiments.split(",")):
            return STACK_ABI
    return REGISTER_ABI


def abi_of_prologue(code: bytes, entry: int) -> str:
    """The calling convention a function's stack-bound check shows ("" when it shows none): the
    register ABI compares SP with g's bound through R14, where g always is; the stack ABI loads
    g from thread-local storage (FS) first."""
    import capstone

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for count, (_address, _size, mnemonic, operands) in enumerate(disassembler.disasm_lite(code[:64], entry)):
        if "fs:" in operands:
            return STACK_ABI
        if "r14" in operands and mnemonic in ("cmp", "lea", "mov"):
            return REGISTER_ABI
        if count >= 3:
            break
    return ""


def _pclntab_functions(table: bytes, wanted: set[str]) -> dict[str, tuple[int, int]]:
    """(entry, end) virtual addresses of the wanted functions, from a .gopclntab."""
    (magic,) = struct.unpack_from("<I", table, 0)
    pointer_size = table[7]
    if pointer_size != 8:
        raise NotGo("not a 64-bit pclntab")

    def word(offset: int) -> int:
        return int(struct.unpack_from("<Q", table, offset)[0])

    def name_at(offset: int) -> str:
        end = table.find(b"\0", offset)
        return table[offset:end].decode("utf-8", "replace")

    found: dict[str, tuple[int, int]] = {}
    if magic in (PCLNTAB_GO118, PCLNTAB_GO120):
        count, text_start = word(8), word(24)
        names, functab = word(32), word(64)
        # (entry offset from text_start, func offset) pairs, 4 bytes each, count + 1 of them.
        for index in range(count):
            entry, func, next_entry = struct.unpack_from("<III", table, functab + index * 8)
            (name_offset,) = struct.unpack_from("<i", table, functab + func + 4)
            name = name_at(names + name_offset)
            if name in wanted:
                found[name] = (text_start + entry, text_start + next_entry)
    elif magic == PCLNTAB_GO116:
        count, names, functab = word(8), word(24), word(56)
        for index in range(count):
            entry, func, next_entry = struct.unpack_from("<QQQ", table, functab + index * 16)
            (name_offset,) = struct.unpack_from("<i", table, functab + func + 8)
            name = name_at(names + name_offset)
            if name in wanted:
                found[name] = (entry, next_entry)
    elif magic == PCLNTAB_GO12:
        count = word(8)
        for index in range(count):
            entry, func, next_entry = struct.unpack_from("<QQQ", table, 16 + index * 16)
            (name_offset,) = struct.unpack_from("<i", table, func + 8)
            name = name_at(name_offset)
            if name in wanted:
                found[name] = (entry, next_entry)
    else:
        raise NotGo(f"unknown pclntab magic {magic:#x}")
    return found


def returns_of(code: bytes, entry: int) -> tuple[int, ...]:
    """Addresses of the RET instructions in a function's machine code (amd64)."""
    import capstone

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    # Go pads between functions with INT3; data that does not decode is stepped over, not an end.
    disassembler.skipdata = True
    return tuple(
        address for address, _size, mnemonic, _ops in disassembler.disasm_lite(code, entry) if mnemonic == "ret"
    )


def register_abi(version: str) -> bool:
    return abi_of_version(version) == REGISTER_ABI


def inspect(path: str) -> GoBinary | None:
    """What to hook in the executable at `path`; None when it is not Go or has no crypto/tls."""
    try:
        with open(path, "rb") as file:
            elf = _Elf(file)
            table = elf.section(".gopclntab")
            if table is None:
                return None  # not Go (or a Go of another object format: nothing to hook here)
            version, modinfo = build_info(elf)
            functions = _pclntab_functions(table, {WRITE, READ})
            if not functions:
                return None  # Go without crypto/tls
            binary = GoBinary(version, experiment=build_setting(modinfo, "GOEXPERIMENT"))
            if elf.machine != EM_X86_64:
                binary.error = f"unsupported architecture: ELF machine {elf.machine} (amd64 only)"
                return binary
            prologues = set()
            for name in (WRITE, READ):
                if name not in functions:
                    continue
                entry, end = functions[name]
                code = elf.at(entry, end - entry)
                prologues.add(abi_of_prologue(code, entry))
                binary.functions.append(GoFunction(name, entry, returns_of(code, entry)))
            binary.abi = abi_of_version(version)
            seen = prologues - {""}
            if len(seen) > 1 or (binary.abi and seen and seen != {binary.abi}):
                binary.error = (
                    f"unsupported Go ABI: the build information ({version}) and the code"
                    f" ({', '.join(sorted(seen))} ABI) disagree"
                )
            elif not binary.abi and not seen:
                binary.error = "unsupported Go ABI: no Go version in the build information and none shown by the code"
            elif not binary.abi:
                binary.abi = seen.pop()
            if binary.error:
                binary.functions = []
            elif not all(function.returns for function in binary.functions):
                binary.error = "no RET instruction found in " + ", ".join(
                    function.name for function in binary.functions if not function.returns
                )
            return binary
    except (OSError, NotGo, struct.error, IndexError, OverflowError, ValueError):
        return None


# OpenSSL's functions that an executable with OpenSSL (or BoringSSL) linked in defines itself.
SSL_FUNCTIONS = frozenset({"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex"})


@dataclass(slots=True, frozen=True)
class StaticSsl:
    """An executable with OpenSSL or BoringSSL linked in, and the SSL functions it defines."""

    symbols: frozenset[str]


def inspect_executable(path: str) -> GoBinary | StaticSsl | None:
    """What of TLS an executable carries itself: Go's crypto/tls, OpenSSL's functions, or none."""
    go = inspect(path)
    if go is not None:
        return go
    symbols = defined_functions(path, set(SSL_FUNCTIONS))
    return StaticSsl(frozenset(symbols)) if symbols else None


class GoBinaries:
    """`inspect_executable` remembered per file, so a rescan reads each executable once."""

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[int, int, int, int], GoBinary | StaticSsl | None] = OrderedDict()

    def lookup(self, path: str, stat: os.stat_result) -> GoBinary | StaticSsl | None:
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key in self._seen:
            self._seen.move_to_end(key)
            return self._seen[key]
        found = inspect_executable(path)
        self._seen[key] = found
        if len(self._seen) > CACHE_MAX:
            self._seen.popitem(last=False)
        return found

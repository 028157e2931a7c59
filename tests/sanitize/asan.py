"""An AddressSanitizer + UBSan build of Trawl's five C extensions, and the means to import it.

`python -m tests.sanitize.asan build` compiles the extensions that setup.py declares, with the
sanitizers, into `build/asan/` (never into the source tree that the ordinary tests import).
`install()` then makes exactly those five module names resolve to the sanitized builds, ahead
of the editable install's finder and of every `sys.path` entry: under pytest the rootdir sits
first on `sys.path` and holds the ordinary builds (`trawl/_calljson...so`,
`services/collector/_ring...so` reached through the `trawl/collector` symlink), so putting
`build/asan` on `PYTHONPATH` alone would not win. `verify()` proves it, module by module,
from `module.__file__`, and that the sanitizer runtime is really in the process.

The process must start with the runtime preloaded, since CPython itself is not built with ASan:
`LD_PRELOAD=$(gcc -print-file-name=libasan.so)`, `PYTHONMALLOC=malloc` (so every Python object
is its own malloc block with red zones around it, instead of a slice of a pymalloc arena where
an overread lands silently in the neighbour), `ASAN_OPTIONS=detect_leaks=0:abort_on_error=1`
(CPython frees little at exit) and `UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1`. The
Makefile's `sanitize` target sets them; `environment()` returns them for a child process.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD_DIR = ROOT / "build" / "asan"
TEMP_DIR = ROOT / "build" / "asan-objects"

# The module names setup.py builds; `build()` checks that setup.py still declares exactly these.
EXTENSIONS = (
    "trawl.collector._ring",
    "trawl.collector._pcapfile",
    "trawl._calljson",
    "trawl._otlpspans",
    "trawl.dissector._express",
)

# -O1 keeps the reports' stack traces readable; -fno-sanitize-recover makes a UBSan finding
# fatal at the check itself (halt_on_error does the same at run time; both, to be sure).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
COMPILE_FLAGS = [*SANITIZE_FLAGS, "-O1", "-g", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


def module_path(name: str, base: Path = BUILD_DIR) -> Path:
    """Where build_ext puts the extension `name` under `base` (its package path, ABI suffix)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return base.joinpath(*name.split(".")[:-1], name.rsplit(".", 1)[1] + suffix)


def build(build_dir: Path = BUILD_DIR, temp_dir: Path = TEMP_DIR) -> list[Path]:
    """Compile the five extensions with the sanitizers into `build_dir`; returns their paths.
    Reads the extension list from setup.py itself, so a new source file or macro there is
    built here too; only the optimisation and sanitizer flags differ."""
    # setuptools first: it puts its own distutils in place of the one the import below names.
    from distutils.core import run_setup

    import setuptools  # type: ignore[import-untyped]  # noqa: F401

    with contextlib.chdir(ROOT):  # setup.py names its sources relative to the project root
        distribution = run_setup("setup.py", script_args=["build_ext"], stop_after="init")
    extensions = list(distribution.ext_modules or [])
    declared = sorted(extension.name for extension in extensions)
    if declared != sorted(EXTENSIONS):
        raise SystemExit(f"setup.py declares {declared}, tests/sanitize/asan.py expects {sorted(EXTENSIONS)}")
    for extension in extensions:
        kept = [flag for flag in extension.extra_compile_args if not flag.startswith(("-O", "-g"))]
        extension.extra_compile_args = [*kept, *(flag for flag in COMPILE_FLAGS if flag not in kept)]
        extension.extra_link_args = [*extension.extra_link_args, *SANITIZE_FLAGS]
    command = distribution.get_command_obj("build_ext")
    command.build_lib = str(build_dir)
    command.build_temp = str(temp_dir)
    command.inplace = False
    command.parallel = os.cpu_count() or 1
    with contextlib.chdir(ROOT):
        distribution.run_command("build_ext")
    built = [module_path(name, build_dir) for name in EXTENSIONS]
    missing = [str(path) for path in built if not path.is_file()]
    if missing:
        raise SystemExit(f"the sanitized build did not produce {missing}")
    return built


class SanitizedExtensionFinder(importlib.abc.MetaPathFinder):
    """Resolves the five extension names to their builds under `build_dir`, nothing else."""

    def __init__(self, build_dir: Path = BUILD_DIR) -> None:
        self.build_dir = build_dir

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in EXTENSIONS:
            return None
        location = module_path(fullname, self.build_dir)
        if not location.is_file():
            # Falling through would import the ordinary build and test nothing: refuse instead.
            raise ImportError(f"no sanitized build of {fullname} at {location} (python -m tests.sanitize.asan build)")
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(location))
        return importlib.util.spec_from_file_location(fullname, location, loader=loader)


def install(build_dir: Path = BUILD_DIR) -> None:
    """Put the finder first on `sys.meta_path`; an extension already imported from elsewhere is an error."""
    early = [
        name
        for name in EXTENSIONS
        if name in sys.modules and not Path(getattr(sys.modules[name], "__file__", "")).is_relative_to(build_dir)
    ]
    if early:
        raise RuntimeError(f"imported before the sanitized build could be installed: {early}")
    if not any(isinstance(finder, SanitizedExtensionFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SanitizedExtensionFinder(build_dir))


def sanitizer_runtime_loaded() -> bool:
    """Whether libasan is mapped into this process (it must be, LD_PRELOADed, before any sanitized .so)."""
    maps = Path("/proc/self/maps").read_text()
    return "libasan.so" in maps


def verify(build_dir: Path = BUILD_DIR) -> dict[str, str]:
    """Import the five extensions and check that each comes from `build_dir` and that the ASan
    runtime is loaded; returns module name -> file, for the stage's log."""
    if not sanitizer_runtime_loaded():
        raise RuntimeError("libasan is not loaded: run with LD_PRELOAD=$(gcc -print-file-name=libasan.so)")
    files: dict[str, str] = {}
    for name in EXTENSIONS:
        module = importlib.import_module(name)
        location = Path(module.__file__ or "")
        if not location.is_relative_to(build_dir):
            raise RuntimeError(f"{name} was imported from {location}, not from the sanitized build in {build_dir}")
        files[name] = str(location)
    return files


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a sanitized child process needs (the same as the Makefile's `sanitize` target)."""
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = dict(os.environ if base is None else base)
    env.update(
        LD_PRELOAD=libasan,
        PYTHONMALLOC="malloc",
        ASAN_OPTIONS=ASAN_OPTIONS,
        UBSAN_OPTIONS=UBSAN_OPTIONS,
    )
    return env


def _module_files() -> dict[str, Path]:
    """Importable module name -> source file, for the project's own code and tests."""
    files: dict[str, Path] = {}
    package_dirs = {
        "trawl": ROOT / "trawl",
        "trawl.collector": ROOT / "services" / "collector",
        "trawl.dissector": ROOT / "services" / "dissector",
        "trawl.enricher": ROOT / "services" / "enricher",
        "trawl.recorder": ROOT / "services" / "recorder",
        "trawl.alerter": ROOT / "services" / "alerter",
        "tests": ROOT / "tests",
    }
    for package, directory in package_dirs.items():
        for source in directory.rglob("*.py"):
            relative = source.relative_to(directory).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            # The symlinks trawl/<service> -> services/<service> would list a service twice.
            files.setdefault(name, source)
    return files


def _imports(source: Path, name: str) -> set[str]:
    """Every module `source` imports, at any depth of its code (function-level imports too)."""
    found: set[str] = set()
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    try:
        tree = ast.parse(source.read_text(), str(source))
    except SyntaxError:
        # Unreadable here means it fails under pytest too; count it as reaching the extensions so
        # its tests are not dropped from the sanitized run by this selection.
        return set(EXTENSIONS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return found | {parent for module in found for parent in _parents(module)}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


# Where the in-process tests live (integration and live tests drive the services as subprocesses).
TEST_ROOTS = ("tests/unit", "tests/fuzz", "tests/oracle")


def tests_importing_extensions(roots: Iterable[str] = TEST_ROOTS) -> list[str]:  # noqa: PT028 - not a test
    """The test files under `roots` whose imports reach one of the five extensions, directly or
    through any chain of the project's modules. Computed from the sources on every run, so a new
    test that drives the C parts is sanitized without anyone adding it to a list."""
    files = _module_files()
    imports = {name: _imports(path, name) for name, path in files.items()}
    # Grow the set of modules that reach an extension until no module is added (cycles are fine).
    reaching = set(EXTENSIONS)
    grown = True
    while grown:
        grown = False
        for name, targets in imports.items():
            if name not in reaching and not targets.isdisjoint(reaching):
                reaching.add(name)
                grown = True

    selected = []
    for name, path in sorted(files.items()):
        under = path.relative_to(ROOT).as_posix()
        in_roots = any(under.startswith(f"{root}/") for root in roots)
        if path.name.startswith("test_") and in_roots and name in reaching:
            selected.append(under)
    return selected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sanitize.asan", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="compile the five extensions with ASan + UBSan into build/asan/")
    commands.add_parser("tests", help="print the test files whose imports reach a C extension")
    commands.add_parser("verify", help="import the sanitized extensions and print where they come from")
    args = parser.parse_args(argv)
    if args.command == "build":
        for path in build():
            sys.stdout.write(f"{path.relative_to(ROOT)}\n")
    elif args.command == "tests":
        sys.stdout.write(" ".join(tests_importing_extensions()) + "\n")
    else:
        install()
        for name, location in verify().items():
            sys.stdout.write(f"{name}: {location}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""pytest plugin for the sanitized run (`pytest -p tests.sanitize.plugin`, see the Makefile's
`sanitize` target): the four C extensions come from the ASan + UBSan build in build/asan/, and
the run stops before collecting anything if they do not, or if libasan is not preloaded."""

from __future__ import annotations

import pytest

from tests.sanitize.asan import install, verify

# Tests that measure the allocator itself, which ASan replaces: they pass in the ordinary run and
# would say nothing here (ASan's malloc ignores mallopt; its quarantine of freed blocks raises
# the RSS high-water mark whatever the code does).
MEASURE_THE_ALLOCATOR = {
    "tests/unit/test_afpacket_live.py::test_batch_buffers_are_served_from_the_heap_on_glibc": "mallopt is glibc's",
    "tests/unit/test_express_c.py::test_feeding_in_a_loop_does_not_grow_memory": "RSS under ASan's quarantine",
}

_FILES = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: test modules import the extensions at module level (and one of them
    # importorskips a module that fails to load, which would pass a sanitized run by skipping).
    install()
    try:
        config.stash[_FILES] = verify()
    except RuntimeError as exc:
        raise pytest.UsageError(f"sanitized run: {exc}") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"sanitized: {name} from {location}" for name, location in config.stash[_FILES].items()]
    lines += [f"not run under ASan: {test} ({why})" for test, why in MEASURE_THE_ALLOCATOR.items()]
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deselected = [item for item in items if item.nodeid in MEASURE_THE_ALLOCATOR]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.nodeid not in MEASURE_THE_ALLOCATOR]

"""Trawl: Kubernetes API traffic analyzer.

The `trawl` package is the small shared kernel (wire contract, bus, config, logs, CLI);
each service lives in its own subpackage (`trawl.collector`, `trawl.dissector`, ...),
sourced from `services/<name>/`.
"""

__version__ = "0.1.0"

import sys as _sys
from importlib.abc import Loader as _Loader
from importlib.abc import MetaPathFinder as _MetaPathFinder
from importlib.machinery import ModuleSpec as _ModuleSpec
from importlib.machinery import PathFinder as _PathFinder
from types import ModuleType as _ModuleType


class _NatsTransportWithoutAiohttp(_MetaPathFinder, _Loader):
    """nats-py's transport module imports aiohttp for WebSocket servers only (ws://, wss://),
    and aiohttp builds SSL contexts at import: a quarter of a second at every service's start,
    for a transport Trawl does not use by default. nats.aio.transport is executed with aiohttp
    kept out (nats-py then leaves its WebSocket transport unset; trawl.bus gives it aiohttp when
    a ws:// server is configured); any later `import aiohttp` works as usual."""

    def __init__(self) -> None:
        self._loader: _Loader | None = None

    def find_spec(self, name: str, path: object, target: object = None) -> _ModuleSpec | None:
        if name != "nats.aio.transport":
            return None
        _sys.meta_path.remove(self)  # once
        spec = _PathFinder.find_spec(name, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None or "aiohttp" in _sys.modules:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: _ModuleSpec) -> _ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: _ModuleType) -> None:
        assert self._loader is not None
        _sys.modules["aiohttp"] = None  # type: ignore[assignment]
        try:
            self._loader.exec_module(module)
        finally:
            del _sys.modules["aiohttp"]


if "nats.aio.transport" not in _sys.modules:
    _sys.meta_path.insert(0, _NatsTransportWithoutAiohttp())

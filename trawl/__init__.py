"""Trawl: Kubernetes API traffic analyzer.

The `trawl` package is the small shared kernel (wire contract, bus, config, logs, CLI);
each service lives in its own subpackage (`trawl.collector`, `trawl.dissector`, ...),
sourced from `services/<name>/`.
"""

__version__ = "0.1.0"

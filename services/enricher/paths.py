"""The low-cardinality form of a URL path, shared by the spans, the RED metrics and the route
learner. A module of its own, without OpenTelemetry: the route learner runs in every `trawl
analyze`, which must not pay the SDK's import when it exports nothing."""

from __future__ import annotations

import re

# Matched whole (fullmatch) and in ASCII only: a trailing newline or a non-ASCII digit is text, as
# the compiled encoder (trawl/_otlpspans.c) reads it.
NUMERIC = re.compile(r"[0-9]+")
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Hex ids (object ids, hashes): long enough and with at least one digit, so /cafe or /deadbeef-words stay.
HEX_ID = re.compile(r"(?=.*[0-9])[0-9a-fA-F]{12,}")


def template_path(path: str) -> str:
    """The low-cardinality form of a URL path: numeric, UUID and long hex segments become {id}."""
    path = path.split("?", 1)[0]
    segments = path.split("/")
    return "/".join(
        "{id}" if NUMERIC.fullmatch(segment) or UUID.fullmatch(segment) or HEX_ID.fullmatch(segment) else segment
        for segment in segments
    )

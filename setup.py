"""Compiled part of the distribution; everything else is declared in pyproject.toml.

`trawl.collector._ring` turns whole TPACKET_V3 ring blocks into pcap records (see
services/collector/_ring.c); `pip install -e .` and wheel builds compile it. The collector
falls back to a slow pure-Python loop, with a warning, when it is missing.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "trawl.collector._ring",
            sources=["services/collector/_ring.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=False,
        ),
        # services/collector/_pcapfile.c: record boundaries of classic pcap files, so replay and `trawl analyze`
        # read whole batches (see services/collector/replay.py, which falls back to Python when this is missing).
        Extension(
            "trawl.collector._pcapfile",
            sources=["services/collector/_pcapfile.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=False,
        ),
        # trawl/_calljson.c: ApiCall -> protobuf JSON text for `trawl analyze --json` (see trawl/render.py,
        # which falls back to its Python encoder when this is missing).
        Extension(
            "trawl._calljson",
            sources=["trawl/_calljson.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=False,
        ),
        # trawl/_otlpspans.c: enriched ApiCalls -> OTLP ExportTraceServiceRequest bytes, the span path of
        # the enricher and `trawl analyze --otlp-endpoint` (see services/enricher/wire_spans.py, which
        # falls back to the OpenTelemetry SDK path when this is missing).
        Extension(
            "trawl._otlpspans",
            sources=["trawl/_otlpspans.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=False,
        ),
        # services/dissector/_express.c: the compiled HTTP/1 lane of the dissector (see
        # services/dissector/express.py, which gives demoted flows back to the Python path).
        Extension(
            "trawl.dissector._express",
            sources=["services/dissector/_express.c"],
            depends=[
                "services/dissector/_express_h2.h",
                "services/dissector/_express_redis.h",
                "services/dissector/_express_kafka.h",
                "services/dissector/_pbjson.h",
            ],
            # HTTP/2 header blocks are decoded by libnghttp2's HPACK inflater (Debian: libnghttp2-dev),
            # RESP by libhiredis's reader (libhiredis-dev).
            libraries=["nghttp2", "hiredis"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=False,
        ),
    ]
)

"""moto's S3 server as the test peer for S3 (`moto[server]`, ThreadedMotoServer), once per test
session: no S3 can be installed here, and moto answers boto3 with S3's own HTTP protocol
(signatures, checksums, Object Lock headers, versions), so trawl.s3 runs as against AWS. Tests
name their own buckets. Registered in tests/conftest.py, so every test module shares the one
server.

`aws_env` puts credentials for it where boto3 looks for them (the standard AWS variables), for
code that takes boto3's own chain (the recorder, `trawl up`'s children)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.delenv("AWS_PROFILE", raising=False)
        yield


@pytest.fixture(scope="session")
def s3_url(aws_env: None, moto_url: str) -> str:
    """moto's server, with boto3's environment credentials set."""
    return moto_url


def s3(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def locked_bucket(url: str, name: str) -> None:
    s3(url).create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)

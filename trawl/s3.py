"""S3 for every service that writes there: the client, a checked PUT, and what names credentials.

The recorder ships sealed recordings (trawl.recorder.upload) and the alerter uploads alert
evidence (trawl.alerter.actions, the `s3:` action) through these few functions, so both speak
to S3 the same way:

- `s3_client(settings)`: a boto3 client for an endpoint (AWS when `endpoint_url` is None; MinIO,
  Ceph or moto's server otherwise) and a region. Credentials are boto3's own chain (the standard
  AWS_* variables, a profile, an instance role) unless `Credentials` are given, read from the
  environment variables a config names (`credentials_from_env`). One attempt per call: the
  callers retry with their own backoff and count their failures, so botocore's hidden retries
  would only make an S3 that is down slower to notice.
- `put_verified(...)`: a PUT with the body's SHA-256 (`ChecksumAlgorithm=SHA256` and the value,
  so S3 refuses a body that arrived different; Object Lock needs a checksum header anyway) and
  the Object Lock retention when one is asked, then a HEAD with checksum mode on: the stored
  checksum and retention must be what was sent, or `UploadError`.

boto3 blocks: call these from a worker thread (`asyncio.to_thread`), never on an event loop.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

LockMode = Literal["GOVERNANCE", "COMPLIANCE"]
LOCK_MODES: tuple[LockMode, ...] = ("GOVERNANCE", "COMPLIANCE")


class UploadError(Exception):
    """An upload that went through but does not verify; `reason` labels the caller's counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ClientSettings(Protocol):
    """What a client needs of a service's S3 settings (the recorder's S3Settings has them)."""

    @property
    def endpoint_url(self) -> str | None: ...

    @property
    def region(self) -> str | None: ...


@dataclass(frozen=True)
class Credentials:
    """Keys read from the environment variables a config names (never written in a config)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def credentials_from_env(
    access_key_env: str,
    secret_key_env: str,
    session_token_env: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials | str:
    """The credentials these variables hold, or why not (which variable is not set)."""
    env = os.environ if environ is None else environ
    missing = [name for name in (access_key_env, secret_key_env, session_token_env) if name and not env.get(name)]
    if missing:
        return f"environment variable {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
    return Credentials(env[access_key_env], env[secret_key_env], env[session_token_env] if session_token_env else None)


def s3_client(
    settings: ClientSettings,
    credentials: Credentials | None = None,
    *,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
) -> S3Client:
    """A boto3 S3 client for the settings; one attempt per call (the caller retries)."""
    import boto3
    from botocore.config import Config

    keys: dict[str, Any] = {}
    if credentials is not None:
        keys = {
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key,
            "aws_session_token": credentials.session_token,
        }
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        ),
        **keys,
    )


def retain_until(days: float, now: datetime | None = None) -> datetime:
    """The Object Lock retain-until date `days` from now (UTC)."""
    return (now or datetime.now(UTC)) + timedelta(days=days)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_verified(
    client: S3Client,
    bucket: str,
    key: str,
    body: bytes | IO[bytes],
    sha256: str,
    lock_mode: str | None,
    retain_until: datetime | None,
    *,
    content_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """PUT with its SHA-256 (hex) and Object Lock retention, then HEAD: the stored checksum, and
    the retention, must be what was sent. Returns the version id ("" on an unversioned bucket);
    UploadError when it does not verify, botocore's errors when S3 refuses or is away."""
    checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
    options: dict[str, Any] = {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": checksum}
    if lock_mode and retain_until:
        options.update(ObjectLockMode=lock_mode, ObjectLockRetainUntilDate=retain_until)
    if content_type:
        options["ContentType"] = content_type
    if metadata:
        options["Metadata"] = dict(metadata)
    put = client.put_object(Bucket=bucket, Key=key, Body=body, **options)
    version = str(put.get("VersionId") or "")
    versioned: dict[str, Any] = {"VersionId": version} if version else {}
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **versioned)
    if head.get("ChecksumSHA256") != checksum:
        raise UploadError("remote_checksum", f"{key}: stored SHA-256 {head.get('ChecksumSHA256')!r}, sent {checksum!r}")
    if lock_mode and retain_until:
        until = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockMode") != lock_mode or until is None or until < retain_until - timedelta(seconds=1):
            raise UploadError(
                "object_lock", f"{key}: stored retention {head.get('ObjectLockMode')} until {until}, asked {lock_mode}"
            )
    return version

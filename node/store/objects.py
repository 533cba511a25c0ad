"""Instance files in an S3-compatible object store, content-addressed.

Each instance is one object whose key is the SHA-256 of its bytes (``<prefix>ab/<sha256>
.dcm``), so a retried upload writes the same bytes to the same key: idempotent. Only the
core S3 API is used (PUT, multipart upload, GET, HEAD), so that any S3-compatible store
serves.

Checksums, both ways:

- upload: every PUT and every part carries Content-MD5 (a store that checks it refuses a
  body damaged on the way), and the store's answer is checked too: the ETag it returns is
  the MD5 of what it stored (of each part, for a multipart upload, whose whole object must
  then have the size sent), with no server-side encryption or SSE-S3 (AES256); with SSE-KMS
  it is not, and the read check below is what remains;
- download: the bytes are hashed as they arrive and must have the key's SHA-256;
  otherwise ``ObjectCorrupt`` and nothing of them is kept.

Credentials come from a file (AWS's credentials-file format) or the environment, and are
never logged (boto3 logs none at the levels the node sets).
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from node.errors import ConfigError, ImageShareError, StorageFailed
from node.store.secrets import read_secret

CHUNK = 1024 * 1024
# S3's bounds on the parts of a multipart upload (all but the last).
MIN_PART_BYTES = 5 * 1024**2
MAX_PARTS = 10_000

log = logging.getLogger(__name__)


class ObjectCorrupt(ImageShareError):
    """An object's bytes are not those its content address names."""


@dataclass(frozen=True)
class ObjectStoreSettings:
    endpoint: str  # empty: the provider's default (AWS)
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""
    credentials_file: Path | None = None  # None: the environment (AWS_ACCESS_KEY_ID, ...)
    server_side_encryption: str = ""  # "", "AES256" or "aws:kms"
    kms_key_id: str = ""
    multipart_threshold_bytes: int = 64 * 1024**2
    part_bytes: int = 16 * 1024**2


def read_credentials(path: Path) -> tuple[str, str]:
    """The access key pair in ``path`` (AWS's credentials-file format, profile
    ``[default]``); ConfigError naming what is missing, never a value."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(read_secret(path).decode("utf-8"))
        profile = parser["default"]
        return profile["aws_access_key_id"].strip(), profile["aws_secret_access_key"].strip()
    except (configparser.Error, UnicodeDecodeError, KeyError) as exc:
        raise ConfigError(
            f"{path.name}: needs a [default] profile with aws_access_key_id and"
            " aws_secret_access_key"
        ) from exc


def _md5_base64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class S3Objects:
    """The bucket holding a node's instance files (thread-safe: boto3 clients are)."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        keys: dict[str, str] = {}
        if settings.credentials_file is not None:
            access, secret = read_credentials(settings.credentials_file)
            keys = {"aws_access_key_id": access, "aws_secret_access_key": secret}
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint or None,
            region_name=settings.region,
            config=Config(
                s3={"addressing_style": "path"},
                # Checksums are the node's own (above): the SDK's newer default trailers
                # (aws-chunked) are not part of the core API every S3 store speaks.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=32,
            ),
            **keys,
        )
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)

    def key(self, digest: str) -> str:
        return f"{self.settings.prefix}{digest[:2]}/{digest}.dcm"

    def check_bucket(self) -> None:
        """Fail at start-up, clearly, when the bucket cannot be reached."""
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except self._errors as exc:
            raise ConfigError(f"cannot reach the object store's bucket: {exc}") from None

    @contextlib.contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise StorageFailed(f"the object store failed to {doing}: {exc}") from exc

    def _put_options(self) -> dict[str, str]:
        options = {"Bucket": self.settings.bucket}
        if self.settings.server_side_encryption:
            options["ServerSideEncryption"] = self.settings.server_side_encryption
            if self.settings.kms_key_id:
                options["SSEKMSKeyId"] = self.settings.kms_key_id
        return options

    @property
    def _etag_is_md5(self) -> bool:
        return self.settings.server_side_encryption in ("", "AES256")

    def _check_etag(self, answer: dict[str, Any], expected: str, what: str) -> None:
        etag = str(answer.get("ETag", "")).strip('"')
        if self._etag_is_md5 and etag != expected:
            raise ObjectCorrupt(f"the object store stored other bytes than were sent ({what})")

    def put(self, digest: str, path: Path, size: int) -> None:
        """Store the file ``path`` (``size`` bytes, SHA-256 ``digest``) at its key; on
        return the store has acknowledged it whole."""
        with self._failures("store an instance"), open(path, "rb") as source:
            if size <= self.settings.multipart_threshold_bytes:
                data = source.read()
                answer = self._client.put_object(
                    Key=self.key(digest),
                    Body=data,
                    ContentMD5=_md5_base64(data),
                    **self._put_options(),
                )
                self._check_etag(answer, hashlib.md5(data).hexdigest(), "upload")
            else:
                self._put_multipart(digest, source, size)

    def _put_multipart(self, digest: str, source: IO[bytes], size: int) -> None:
        key = self.key(digest)
        part_bytes = max(self.settings.part_bytes, -(-size // MAX_PARTS), MIN_PART_BYTES)
        upload = self._client.create_multipart_upload(Key=key, **self._put_options())
        upload_id = upload["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            while data := source.read(part_bytes):
                number = len(parts) + 1
                answer = self._client.upload_part(
                    Bucket=self.settings.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ContentMD5=_md5_base64(data),
                )
                self._check_etag(answer, hashlib.md5(data).hexdigest(), f"part {number}")
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            self._client.complete_multipart_upload(
                Bucket=self.settings.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            # A whole upload's ETag has no one agreed form across S3 stores: its length,
            # with every part's MD5 checked above, is what is checked of it.
            stored = self._client.head_object(Bucket=self.settings.bucket, Key=key)
            if int(stored["ContentLength"]) != size:
                raise ObjectCorrupt("the object store stored other bytes than were sent")
        except BaseException:
            with contextlib.suppress(*self._errors):
                self._client.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id
                )
            raise

    def fetch(self, digest: str, destination: Path, max_bytes: int) -> None:
        """Download the object of ``digest`` to ``destination``, verified: its bytes must
        hash to ``digest`` (ObjectCorrupt otherwise) and number at most ``max_bytes``.
        Written beside ``destination`` and renamed, so a reader never sees part of it."""
        partial = destination.with_name(f"{destination.name}.{uuid.uuid4().hex}.part")
        hasher = hashlib.sha256()
        size = 0
        try:
            with self._failures("read an instance"), open(partial, "wb") as out:
                answer = self._client.get_object(Bucket=self.settings.bucket, Key=self.key(digest))
                body = answer["Body"]
                try:
                    while chunk := body.read(CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise ObjectCorrupt("a stored object is larger than any instance")
                        hasher.update(chunk)
                        out.write(chunk)
                finally:
                    body.close()
            if hasher.hexdigest() != digest:
                log.error("object %s does not match its SHA-256; not served", self.key(digest))
                raise ObjectCorrupt("a stored instance failed its checksum; it is not served")
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)

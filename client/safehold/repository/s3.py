"""A store in an S3-compatible bucket (AWS, MinIO, Ceph RGW, R2, B2), through boto3.

Credentials, region and endpoint come only from the standard AWS environment and
config files (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
AWS_ENDPOINT_URL, AWS_PROFILE), never from a flag, so no secret reaches argv.

Writes go straight into a multipart upload: memory is bounded by PART_SIZE x
(PARTS_IN_FLIGHT + 1), the parts being sent plus the one being filled. A write that
fails or is abandoned aborts the upload, so no object appears. Every request is retried
on transient errors (tenacity); a read that breaks half-way is not resumed silently.
"""

from __future__ import annotations

import collections
import contextlib
import io
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import boto3
import botocore.exceptions
import tenacity
from botocore.config import Config

from safehold.client.errors import RepositoryError
from safehold.repository.store import S3_SCHEME, check_name
from safehold.streams import as_binary

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

PART_SIZE = 8 * 1024 * 1024
"""Bytes per multipart part (S3's minimum is 5 MiB except for the last part)."""
PARTS_IN_FLIGHT = 2
"""Parts uploaded concurrently while the next one fills."""
ATTEMPTS = 5
T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "InternalError",
    "ServiceUnavailable",
}


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in _TRANSIENT_CODES
    return isinstance(
        exc, botocore.exceptions.HTTPClientError | botocore.exceptions.EndpointConnectionError
    )


def retried(call: Callable[[], T]) -> T:
    """call(), again after a transient error, a few times with backoff; what still
    fails is a RepositoryError saying what S3 answered."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_transient),
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=0.2, max=5),
        reraise=True,
    )
    try:
        return retrying(call)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise RepositoryError(f"S3 storage: {err}", reason="STORAGE_FAILED") from None


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/")."""
    rest = url.removeprefix(S3_SCHEME)
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket: write s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class S3Store:
    """Objects under s3://bucket/prefix/, one level deep."""

    def __init__(
        self,
        url: str,
        *,
        part_size: int = PART_SIZE,
        parts_in_flight: int = PARTS_IN_FLIGHT,
        client: S3Client | None = None,
    ) -> None:
        self.bucket, self.prefix = split_url(url)
        self.location = f"{S3_SCHEME}{self.bucket}/{self.prefix}"
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        # tenacity does the retrying, so that botocore does not retry a retry.
        self._s3 = client or boto3.session.Session().client(
            "s3", config=Config(retries={"total_max_attempts": 1})
        )

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def objects(self) -> dict[str, datetime]:
        paginator = self._s3.get_paginator("list_objects_v2")

        def list_all() -> dict[str, datetime]:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
            return {
                obj["Key"][len(self.prefix) :]: obj["LastModified"]
                for page in pages
                for obj in page.get("Contents", [])
            }

        return {n: t for n, t in retried(list_all).items() if n and not n.startswith(".")}

    def exists(self, name: str) -> bool:
        key = self._key(name)

        def head() -> bool:
            try:
                self._s3.head_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True

        return retried(head)

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        key = self._key(name)
        if self.exists(name):
            raise FileExistsError(f"{self.location}{name} exists; a repository never overwrites")
        with ThreadPoolExecutor(self.parts_in_flight, thread_name_prefix="s3-part") as pool:
            writer = _MultipartWriter(
                self._s3,
                self.bucket,
                key,
                part_size=self.part_size,
                pool=pool,
                in_flight=self.parts_in_flight,
            )
            try:
                yield writer  # type: ignore[misc]
                writer.finish()
            except BaseException:
                writer.abort()
                raise

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        reply = retried(lambda: self._s3.get_object(Bucket=self.bucket, Key=self._key(name)))
        body = reply["Body"]
        try:
            yield as_binary(_BodyReader(body))
        finally:
            body.close()

    def delete(self, name: str) -> None:
        retried(lambda: self._s3.delete_object(Bucket=self.bucket, Key=self._key(name)))


class _BodyReader(io.RawIOBase):
    """A boto3 StreamingBody as a raw stream."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data: bytes = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _MultipartWriter(io.RawIOBase):
    """Bytes written become parts of one multipart upload, at most parts_in_flight at once.

    Nothing is uploaded until a whole part has filled: a small object is one PUT.
    """

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        key: str,
        *,
        part_size: int,
        pool: ThreadPoolExecutor,
        in_flight: int,
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._pool = pool
        self._in_flight = in_flight
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._pending: collections.deque[Future[CompletedPartTypeDef]] = collections.deque()
        self._done: list[CompletedPartTypeDef] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            with memoryview(self._buffer) as view:
                part = bytes(view[: self._part_size])  # one copy, not two
            del self._buffer[: self._part_size]
            self._send(part)
        return len(data)

    def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            reply = retried(
                lambda: self._s3.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            )
            self._upload_id = reply["UploadId"]
        while len(self._pending) >= self._in_flight:
            self._done.append(self._pending.popleft().result())
        number = len(self._done) + len(self._pending) + 1
        self._pending.append(self._pool.submit(self._upload_part, self._upload_id, number, part))

    def _upload_part(self, upload_id: str, number: int, part: bytes) -> CompletedPartTypeDef:
        reply = retried(
            lambda: self._s3.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=part
            )
        )
        return {"ETag": reply["ETag"], "PartNumber": number}

    def finish(self) -> None:
        if self._upload_id is None:
            body = bytes(self._buffer)
            retried(lambda: self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=body))
            return
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._done.append(self._pending.popleft().result())
        upload_id = self._upload_id
        parts = sorted(self._done, key=lambda p: p["PartNumber"])
        retried(
            lambda: self._s3.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        )

    def abort(self) -> None:
        """Drop the upload: its parts are deleted and no object appears."""
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            with contextlib.suppress(Exception):
                future.result()
        self._pending.clear()
        self._buffer.clear()
        if self._upload_id is not None:
            upload_id = self._upload_id
            retried(
                lambda: self._s3.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=upload_id
                )
            )

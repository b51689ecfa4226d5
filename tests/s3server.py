"""A real S3-protocol server on loopback (moto's standalone server) for repository tests.

The product is pointed at it only through the standard AWS environment variables, as an
operator would point it at MinIO.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass
class S3Server:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """The variables a user sets for an S3-compatible endpoint (fake keys)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> S3Client:
        """A test-side client, to set up buckets and look behind the product's back."""
        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def keys(self, bucket: str) -> list[str]:
        reply = self.client().list_objects_v2(Bucket=bucket)
        return sorted(obj["Key"] for obj in reply.get("Contents", []))

    def multipart_uploads(self, bucket: str) -> list[str]:
        reply = self.client().list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in reply.get("Uploads", [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def s3_server(log_path: str) -> Iterator[S3Server]:
    """moto_server on a free loopback port, until the block ends."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_CALL_RESET_API": "false"},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = Path(log_path).read_text()
                    raise AssertionError(f"moto did not start: {log_text}") from None
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

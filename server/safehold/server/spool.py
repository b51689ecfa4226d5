"""Spooling an upload to a private file on disk while counting and hashing it.

An upload is never held in memory and never touches the database before its
size and SHA-256 have been checked against the trailer.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
from pathlib import Path
from types import TracebackType

from safehold.files import private_temp_file
from safehold.server.errors import ChecksumMismatch, SizeMismatch, SpoolFailed, UploadTooLarge
from safehold.v1 import backup_service_pb2 as pb

log = logging.getLogger(__name__)

SPOOL_PREFIX = "safehold-spool-"
SCRATCH_PREFIXES = (SPOOL_PREFIX, "safehold-snapshot-", "safehold-acl-")


class Spool:
    """One upload's temp file (mode 0600), deleted when the block ends."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = private_temp_file(directory, SPOOL_PREFIX)
        self.size = 0
        self._max_bytes = max_bytes
        self._sha256 = hashlib.sha256()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        """Append a chunk; refuse it as soon as the upload crosses the limit."""
        if self._max_bytes and self.size + len(data) > self._max_bytes:
            raise UploadTooLarge(
                f"the upload is larger than this server's limit of {self._max_bytes} bytes "
                "(--max-upload-bytes)"
            )
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFailed(
                    f"the spool directory {self.path.parent} is out of space after "
                    f"{self.size} bytes; free space or set --spool-dir"
                ) from None
            raise
        self._sha256.update(data)
        self.size += len(data)

    def finish(self, trailer: pb.Digest) -> None:
        """Flush to disk and compare what arrived with what the client says it sent."""
        try:
            self._file.flush()
        except OSError as exc:
            raise SpoolFailed(f"cannot write the spool file: {exc.strerror}") from None
        self._file.close()
        if trailer.size_bytes != self.size:
            raise SizeMismatch(
                f"the trailer says {trailer.size_bytes} bytes but {self.size} arrived"
            )
        if not hmac.compare_digest(trailer.sha256, self._sha256.digest()):
            raise ChecksumMismatch(
                "the SHA-256 in the trailer does not match the bytes that arrived "
                f"(received {self._sha256.hexdigest()})"
            )


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete spool and snapshot files a killed server left behind."""
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if path.name.startswith(SCRATCH_PREFIXES) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in removed:
        log.info("removed a leftover from an earlier run: %s", path)
    return removed


def check_writable(directory: Path) -> None:
    """Fail at start-up, not at the first restore, when the spool dir is unusable."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"the spool directory {directory} is not writable")

"""The small interface every database engine implements, and how to pick one.

The servicer only frames streams; everything that knows about pg_dump or
SQLite pages lives behind this interface, one module per engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from safehold.server.config import Config, PostgresTarget
from safehold.v1 import backup_service_pb2 as pb

CHUNK_BYTES = 1024 * 1024
"""Size of a stream chunk: large enough to amortise per-message cost, far under 4 MiB."""


@dataclass(frozen=True)
class Notice:
    """Something the operator should know, sent to the caller and logged."""

    reason: str
    message: str


Notify = Callable[[Notice], None]


@dataclass(frozen=True)
class EngineInfo:
    """What GetServerInfo reports and a backup manifest carries."""

    version: str
    database_name: str
    size_bytes: int
    tool_versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """What the operator should fix, such as a role with more rights than it needs."""
    schema_version: str = ""
    """The application's schema version (schema_version.py); empty when unknown."""
    restore_blockers: list[str] = field(default_factory=list)
    """What would stop a restore before it starts (e.g. a schema the role does not own)."""


@dataclass(frozen=True)
class RestoreOptions:
    """The caller's choices for one restore, from its header."""

    allow_version_mismatch: bool = False
    terminate_blocking_sessions: bool = False
    allow_schema_downgrade: bool = False


class Engine(Protocol):
    """One database, backed up and restored with its engine's own tools."""

    kind: pb.Engine.ValueType
    dump_format: pb.DumpFormat.ValueType
    """The format backup() produces."""
    file_suffix: str
    """File name suffix of that format, e.g. `.sqlite`."""

    def info(self) -> EngineInfo:
        """Describe the engine and the database."""
        ...

    def check(self) -> None:
        """Reach the database cheaply, as the configured role; raise DatabaseUnavailable
        when it cannot be reached or authenticated. Health probes call it."""
        ...

    def backup(self, compression_level: int | None) -> AbstractContextManager[Iterator[bytes]]:
        """A consistent snapshot as chunks. Entering may raise before any byte exists
        (e.g. a version check); iteration raises BackupFailed instead of ending when
        the snapshot did not complete. Leaving releases everything it started."""
        ...

    def snapshot(self, dest: Path) -> None:
        """Write a complete backup to dest, atomically (temp file, then rename), mode 0600."""
        ...

    def inspect(self, path: Path, options: RestoreOptions) -> list[Notice]:
        """Check that the file at path is a backup this engine can restore.

        Raises EngineMismatch, NotABackup or VersionMismatch; returns what the
        caller should be told even though the restore may go ahead.
        """
        ...

    def restore(self, path: Path, options: RestoreOptions, notify: Notify) -> None:
        """Replace the whole database with the inspected backup at path.

        Either everything is replaced or nothing is: an engine that rolled back
        raises a SafeholdError with database UNCHANGED. Any other exception
        means the engine cannot vouch for the database's state.
        """
        ...


def read_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """Full CHUNK_BYTES pieces of a file or pipe until its end."""
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def open_engine(config: Config) -> Engine:
    """The engine that config's database URL names."""
    if isinstance(config.target, PostgresTarget):
        from safehold.server.engines.postgres import PostgresEngine

        return PostgresEngine(
            config.target,
            config.password,
            config.lock_timeout_seconds,
            schema_query=config.schema_version_query,
            restore_timeout=config.restore_timeout_seconds,
        )
    from safehold.server.engines.sqlite import SqliteEngine

    return SqliteEngine(
        config.target,
        config.spool_dir,
        config.lock_timeout_seconds,
        inspect_timeout=config.inspect_timeout_seconds,
        schema_query=config.schema_version_query,
    )

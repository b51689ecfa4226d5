"""A typed client over the generated stubs, used as a context manager.

    with Client("127.0.0.1:50051", password) as client:
        client.backup("app.dump")
        client.restore("app.dump")

Backups stream straight to an unnamed file that gets its name only once the
trailer's size and SHA-256 match and its first bytes are the format the
manifest promised (output.py decides where); restores stream from disk. Nothing is held
whole in memory. Connecting, and calls that have not moved a byte yet, are
retried; anything else is not, since a half-sent restore must not be re-sent
silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import grpc
import tenacity
from grpc_health.v1 import health_pb2, health_pb2_grpc

from safehold.client.credentials import check_tls, no_password, password_from
from safehold.client.diagnose import explain
from safehold.client.errors import (
    BadLocalFile,
    ConnectionFailed,
    EngineMismatch,
    IncompleteBackup,
    InsufficientPrivilege,
    InvalidBackup,
    SafeholdError,
    from_rpc_error,
)
from safehold.client.output import Destination, Sink, open_sink, plan, safe_name
from safehold.contract import PASSWORD_METADATA_KEY, DatabaseState, Reason
from safehold.formats import SNIFF_BYTES, engine_label, engine_of, file_suffix, sniff
from safehold.read_ahead import read_ahead
from safehold.streams import ChunksReader, as_binary, read_head
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    # Only for types: the repository package imports this package's errors.
    from safehold.repository import Manifest, Repository, crypto

DEFAULT_TARGET = "127.0.0.1:50051"
UPLOAD_CHUNK_BYTES = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class TlsOptions:
    """Trust `ca` for the server (system roots if None); present cert/key when set.
    `server_name` is the name to expect in the server's certificate when the target
    address is not one of its names (e.g. a health check on 127.0.0.1)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Progress:
    """How far a call is: phase is a RestorePhase name without its prefix, or BACKUP."""

    phase: str
    bytes_done: int
    bytes_total: int | None


@dataclass(frozen=True)
class ServerInfo:
    """What the server guards."""

    engine: str
    engine_version: str
    database_name: str
    database_size_bytes: int
    safehold_version: str
    tool_versions: dict[str, str]
    max_upload_bytes: int
    warnings: list[str]
    """What the operator should fix on the server side (e.g. a superuser role)."""
    pre_restore_directory: str = ""
    newest_pre_restore_backup: str = ""
    schema_version: str = ""
    """The application's schema version of the database; empty when unknown."""
    database_location: str = ""
    """Exactly which database: `postgresql user@host:port/name` or `sqlite /path`."""
    restore_blockers: list[str] = field(default_factory=list)
    """What would stop a restore before it starts; empty when one can go ahead."""


@dataclass(frozen=True)
class BackupResult:
    """A verified backup on disk."""

    path: Path
    size_bytes: int
    sha256: str
    engine: str
    engine_version: str
    database_name: str
    created_at: datetime
    schema_version: str = ""
    """The application's schema version in the backup; empty when unknown."""


@dataclass(frozen=True)
class RestoreResult:
    """A finished restore."""

    engine: str
    bytes_restored: int
    pre_restore_backup_path: str
    duration: timedelta
    notices: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RepositoryBackupResult:
    """A backup the server took into its own repository (CreateRepositoryBackup)."""

    manifest: Manifest
    repository: str
    backups_in_repository: int
    pruned: int


ProgressCallback = Callable[[Progress], None]
Opener = Callable[[], contextlib.AbstractContextManager[BinaryIO]]
"""Opens the bytes to restore, from the start, each time it is called."""
NoticeCallback = Callable[[str, str], None]


class Client:
    """One connection to a safehold server. Close it, or use it in a `with` block."""

    def __init__(
        self,
        target: str | None = None,
        password: str | None = None,
        *,
        tls: TlsOptions | None = None,
        connect_timeout: float = 10.0,
        attempts: int = 4,
    ) -> None:
        self.target = target or os.environ.get("SAFEHOLD_TARGET") or DEFAULT_TARGET
        password = password if password is not None else password_from(None)
        if not password:
            raise no_password(" (or pass password=)")
        self._metadata = ((PASSWORD_METADATA_KEY, password),)
        self._connect_timeout = connect_timeout
        self._attempts = attempts
        self._tls = tls
        self._channel = open_channel(self.target, tls)
        self._stub = pb_grpc.BackupServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def server_info(self) -> ServerInfo:
        """Engine, versions and database of the server."""

        def call() -> ServerInfo:
            self._wait_until_connected()
            reply = self._call(
                lambda: self._stub.GetServerInfo(
                    pb.GetServerInfoRequest(), metadata=self._metadata, timeout=60
                )
            )
            return ServerInfo(
                engine=engine_label(reply.engine),
                engine_version=reply.engine_version,
                database_name=reply.database_name,
                database_size_bytes=reply.database_size_bytes,
                safehold_version=reply.safehold_version,
                tool_versions=dict(reply.tool_versions),
                max_upload_bytes=reply.max_upload_bytes,
                warnings=list(reply.warnings),
                pre_restore_directory=reply.pre_restore_directory,
                newest_pre_restore_backup=reply.newest_pre_restore_backup,
                schema_version=reply.schema_version,
                database_location=reply.database_location,
                restore_blockers=list(reply.restore_blockers),
            )

        return self._retrying(call)

    def repository_backups(
        self, database: str | None = None, *, page_size: int = 100
    ) -> Iterator[Manifest]:
        """The backups in the server's own repository (`serve --repository`), newest
        first, fetched a page at a time as the iterator is consumed."""
        token = ""
        while True:
            request = pb.ListRepositoryBackupsRequest(
                page_size=page_size, page_token=token, database_name=database or ""
            )

            def call(
                request: pb.ListRepositoryBackupsRequest = request,
            ) -> pb.ListRepositoryBackupsResponse:
                self._wait_until_connected()
                return self._call(
                    lambda: self._stub.ListRepositoryBackups(
                        request, metadata=self._metadata, timeout=120
                    )
                )

            reply: pb.ListRepositoryBackupsResponse = self._retrying(call)
            yield from (manifest_of(entry) for entry in reply.backups)
            token = reply.next_page_token
            if not token:
                return

    def backup_now(self, *, timeout: float = 24 * 3600) -> RepositoryBackupResult:
        """Have the server take a backup into its own repository now, as its scheduled
        runs do (encrypted, verified, retention applied). Not retried once sent: the
        server may have stored it."""
        self._wait_until_connected()
        reply = self._call(
            lambda: self._stub.CreateRepositoryBackup(
                pb.CreateRepositoryBackupRequest(), metadata=self._metadata, timeout=timeout
            )
        )
        listed = self._call(
            lambda: self._stub.ListRepositoryBackups(
                pb.ListRepositoryBackupsRequest(page_size=1),
                metadata=self._metadata,
                timeout=120,
            )
        )
        return RepositoryBackupResult(
            manifest=manifest_of(reply.backup),
            repository=listed.repository,
            backups_in_repository=reply.backups_in_repository,
            pruned=reply.pruned,
        )

    def backup(
        self,
        dest: str | os.PathLike[str] | Destination,
        *,
        force: bool = False,
        compression_level: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> BackupResult:
        """Save a complete backup to dest: a file (replaced only with force), a
        directory to put the server's suggested name in (never replacing a file),
        or `-` for stdout; see output.plan(). The file appears only once verified."""
        if not isinstance(dest, Destination):
            dest = plan(dest, force=force)
        request = pb.BackupRequest(compression_level=compression_level)
        return self._retrying(lambda: self._backup_once(dest, request, on_progress))

    def restore(
        self,
        src: str | os.PathLike[str],
        *,
        allow_version_mismatch: bool = False,
        terminate_blocking_sessions: bool = False,
        allow_schema_downgrade: bool = False,
        on_progress: ProgressCallback | None = None,
        on_notice: NoticeCallback | None = None,
    ) -> RestoreResult:
        """Replace the server's database with the backup at src.

        Refuses, before sending a byte, a file that is no backup or is for
        another engine than the server's. The server refuses a backup whose
        application schema is newer than the database's (SchemaNewer) unless
        allow_schema_downgrade.
        """
        src = Path(src)
        src = Path(src)
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise BadLocalFile(f"cannot read {src}: {exc.strerror}; nothing was sent") from None
        return self._restore_from(
            str(src),
            lambda: open(src, "rb"),
            size,
            allow_version_mismatch=allow_version_mismatch,
            terminate_blocking_sessions=terminate_blocking_sessions,
            allow_schema_downgrade=allow_schema_downgrade,
            on_progress=on_progress,
            on_notice=on_notice,
        )

    def restore_backup(
        self,
        repository: Repository,
        manifest: Manifest,
        *,
        identities: Sequence[crypto.Identity] = (),
        allow_version_mismatch: bool = False,
        terminate_blocking_sessions: bool = False,
        allow_schema_downgrade: bool = False,
        on_progress: ProgressCallback | None = None,
        on_notice: NoticeCallback | None = None,
    ) -> RestoreResult:
        """Replace the server's database with a backup from a repository.

        It is decrypted with identities as it is sent and checked against the
        manifest's size and SHA-256: a mismatch ends the upload before its trailer,
        so the server never restores it. A wrong identity fails before any byte is sent.
        """
        return self._restore_from(
            f"{repository.location}/{manifest.name}",
            lambda: repository.open_plaintext(manifest, identities),
            manifest.size_bytes,
            allow_version_mismatch=allow_version_mismatch,
            terminate_blocking_sessions=terminate_blocking_sessions,
            allow_schema_downgrade=allow_schema_downgrade,
            on_progress=on_progress,
            on_notice=on_notice,
        )

    def _restore_from(
        self,
        label: str,
        opener: Opener,
        size: int,
        *,
        allow_version_mismatch: bool,
        terminate_blocking_sessions: bool,
        allow_schema_downgrade: bool,
        on_progress: ProgressCallback | None,
        on_notice: NoticeCallback | None,
    ) -> RestoreResult:
        """Check what is to be sent (see _check_backup), then send it."""
        engine = self._check_backup(label, opener)
        header = pb.RestoreHeader(
            engine=engine,
            expected_size_bytes=size,
            allow_version_mismatch=allow_version_mismatch,
            terminate_blocking_sessions=terminate_blocking_sessions,
            allow_schema_downgrade=allow_schema_downgrade,
        )
        return self._retrying(lambda: self._restore_once(opener, header, on_progress, on_notice))

    def check_backup_file(self, src: Path) -> pb.Engine.ValueType:
        """Refuse, before a byte is sent, a file that is missing, is no backup, is for
        another engine than the server's, or that the server could not restore (the
        CLI asks this before its confirmation prompt)."""
        return self._check_backup(str(src), lambda: open(src, "rb"))

    def _check_backup(self, label: str, opener: Opener) -> pb.Engine.ValueType:
        """The engine of what opener opens, refused before a byte is sent when it
        cannot be read, is no backup, is for another engine than the server's, or
        the server could not restore it."""
        try:
            with opener() as f:
                engine = engine_of(sniff(read_head(f, SNIFF_BYTES)))
        except OSError as exc:
            raise BadLocalFile(f"cannot read {label}: {exc.strerror}; nothing was sent") from None
        if engine == pb.ENGINE_UNSPECIFIED:
            raise InvalidBackup(
                f"{label} is not a backup (neither a SQLite file nor a pg_dump archive or script); "
                "nothing was sent",
                reason=Reason.NOT_A_BACKUP,
                database_state=DatabaseState.UNCHANGED,
            )
        info = self.server_info()
        if info.engine != engine_label(engine):
            raise EngineMismatch(
                f"{label} is a {engine_label(engine)} backup but the server's database is "
                f"{info.engine}; nothing was sent",
                reason=Reason.ENGINE_MISMATCH,
                database_state=DatabaseState.UNCHANGED,
            )
        if info.restore_blockers:
            raise InsufficientPrivilege(
                "; ".join(info.restore_blockers) + "; nothing was sent",
                reason=Reason.INSUFFICIENT_PRIVILEGE,
                database_state=DatabaseState.UNCHANGED,
            )
        return engine

    def backup_to(
        self,
        repository: Repository,
        *,
        recipients: Sequence[crypto.Recipient] = (),
        compression_level: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Manifest:
        """Stream a backup into a repository (directory or s3://), age-encrypted to
        recipients if any, with no local temp file; it is listed only once complete."""
        from safehold.repository import Artefact

        request = pb.BackupRequest(compression_level=compression_level)

        def once() -> Manifest:
            with self._backup_call(request) as (manifest, responses):
                _check_manifest(manifest)
                artefact = Artefact(
                    engine=engine_label(manifest.engine),
                    engine_version=manifest.engine_version,
                    dump_format=pb.DumpFormat.Name(manifest.dump_format),
                    database_name=manifest.database_name,
                    created_at=manifest.created_at.ToDatetime(tzinfo=UTC),
                    safehold_version=manifest.safehold_version,
                    suggested_name=safe_name(
                        manifest.suggested_file_name, file_suffix(manifest.dump_format)
                    ),
                    schema_version=manifest.schema_version or None,
                )
                stream = _BackupStream(responses, on_progress)
                return repository.write(artefact, as_binary(stream), recipients)

        return self._retrying(once)

    @contextlib.contextmanager
    def _backup_call(
        self, request: pb.BackupRequest
    ) -> Iterator[tuple[pb.BackupManifest, Iterator[pb.BackupResponse]]]:
        """A started backup call: the server's manifest, and the frames after it."""
        self._wait_until_connected()
        call = self._stub.Backup(request, metadata=self._metadata)
        responses = iter(call)
        try:
            first = self._call(lambda: next(responses, None))
            if first is None or first.WhichOneof("frame") != "manifest":
                raise IncompleteBackup("the server's backup stream did not start with a manifest")
            yield first.manifest, responses
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    def _backup_once(
        self, dest: Destination, request: pb.BackupRequest, on_progress: ProgressCallback | None
    ) -> BackupResult:
        with self._backup_call(request) as (manifest, responses):
            _check_manifest(manifest)
            with open_sink(
                dest, manifest.suggested_file_name, file_suffix(manifest.dump_format)
            ) as sink:
                checked = _FormatCheck(sink, manifest.dump_format)
                stream = _BackupStream(responses, on_progress)
                try:
                    # Unbuffered: each chunk goes on as it arrives (a stream's reader sees
                    # it at once, and what it was given is known if the call breaks).
                    while data := stream.read(UPLOAD_CHUNK_BYTES):
                        checked.write(data)
                except ConnectionFailed as err:
                    # A stream cannot take back what it was given: never send it twice.
                    err.retryable = err.retryable and not (dest.streams and checked.passed_on)
                    raise
                checked.finish()
                result = BackupResult(
                    path=dest.path,
                    size_bytes=stream.size,
                    sha256=stream.sha256,
                    engine=engine_label(manifest.engine),
                    engine_version=manifest.engine_version,
                    database_name=manifest.database_name,
                    created_at=manifest.created_at.ToDatetime(),
                    schema_version=manifest.schema_version,
                )
                path = sink.commit(_sidecar(result, manifest))
            return dataclasses.replace(result, path=path)

    def _restore_once(
        self,
        opener: Opener,
        header: pb.RestoreHeader,
        on_progress: ProgressCallback | None,
        on_notice: NoticeCallback | None,
    ) -> RestoreResult:
        upload = _Upload(opener, header)
        self._wait_until_connected()
        call = self._stub.Restore(iter(upload), metadata=self._metadata)
        responses = iter(call)
        notices: list[tuple[str, str]] = []
        try:
            for response in _iterate(responses):
                kind = response.WhichOneof("frame")
                if kind == "progress" and on_progress:
                    p = response.progress
                    on_progress(
                        Progress(
                            pb.RestorePhase.Name(p.phase).removeprefix("RESTORE_PHASE_"),
                            p.bytes_done,
                            p.bytes_total if p.HasField("bytes_total") else None,
                        )
                    )
                elif kind == "notice":
                    notices.append((response.notice.reason, response.notice.message))
                    if on_notice:
                        on_notice(response.notice.reason, response.notice.message)
                elif kind == "result":
                    r = response.result
                    return RestoreResult(
                        engine=engine_label(r.engine),
                        bytes_restored=r.bytes_restored,
                        pre_restore_backup_path=r.pre_restore_backup_path,
                        duration=r.duration.ToTimedelta(),
                        notices=notices,
                    )
        except SafeholdError as err:
            if upload.error:  # the server only saw the upload end early: say why
                raise upload.error from None
            if isinstance(err, ConnectionFailed):
                err.retryable = not upload.sent_data
            raise
        finally:
            call.cancel()  # type: ignore[no-untyped-call]
        raise SafeholdError(
            "the server ended the restore without a result; the database state is unknown: "
            "check the server log",
            database_state=DatabaseState.UNKNOWN,
        )

    def _retrying(self, call: Callable[[], T]) -> T:
        """Retry what cannot have changed anything yet: unreachable server,
        or a call that failed before any data moved."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_safe_to_retry),
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=0.2, max=3),
            reraise=True,
        )
        return retrying(call)

    def _wait_until_connected(self) -> None:
        """Ask the health service, waiting up to connect_timeout for the server,
        so that an unreachable server is an error, not a hang. The server's own
        status, not BackupService's: a database that is down is for the call to
        report (DATABASE_UNAVAILABLE, with the server's reason), not a lost server."""
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(),
                timeout=self._connect_timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise from_rpc_error(err) from None
            raise self.unreachable() from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionFailed(
                f"the safehold server at {self.target} is not serving (shutting down?)",
                reason="UNAVAILABLE",
                code=grpc.StatusCode.UNAVAILABLE,
            )

    def unreachable(self) -> ConnectionFailed:
        """The error for a server not reached within connect_timeout, saying why when a
        probe can tell (nothing listening, TLS on one side only, no client certificate).
        Not retried: the time it names is the time it took."""
        why = explain(self.target, self._tls)
        error = ConnectionFailed(
            f"cannot reach the safehold server at {self.target} within "
            f"{self._connect_timeout:g}s: " + (why or "check the address and that it is running"),
            reason="UNAVAILABLE",
            code=grpc.StatusCode.UNAVAILABLE,
        )
        error.retryable = False
        return error

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class _Upload:
    """The request frames of a restore, read from the source as they are sent.

    If the source fails (damaged or undecryptable backup, broken read), the upload
    ends without its trailer, so the server refuses it, and `error` says why.
    """

    def __init__(self, opener: Opener, header: pb.RestoreHeader) -> None:
        self._open = opener
        self._header = header
        self.sent_data = False
        self.error: SafeholdError | None = None

    def __iter__(self) -> Iterator[pb.RestoreRequest]:
        yield pb.RestoreRequest(header=self._header)
        digest = hashlib.sha256()
        size = 0
        try:
            with self._open() as f:
                while chunk := f.read(UPLOAD_CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    self.sent_data = True
                    yield pb.RestoreRequest(chunk=chunk)
        except SafeholdError as err:
            self.error = err
            return
        except OSError as err:
            self.error = SafeholdError(
                f"reading the backup failed after {size} bytes: {err}; the upload was "
                "ended before its trailer",
                reason="SOURCE_FAILED",
                database_state=DatabaseState.UNCHANGED,
            )
            return
        yield pb.RestoreRequest(trailer=pb.Digest(size_bytes=size, sha256=digest.digest()))


class _BackupStream(ChunksReader):
    """The chunks of a backup stream as a reader, whose end raises unless the
    trailer matches what arrived: nothing downstream sees a clean end otherwise."""

    def __init__(
        self, responses: Iterator[pb.BackupResponse], on_progress: ProgressCallback | None
    ) -> None:
        super().__init__(self._receive(_iterate(responses), on_progress))
        self._digest = hashlib.sha256()
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _receive(
        self, responses: Iterator[pb.BackupResponse], on_progress: ProgressCallback | None
    ) -> Iterator[bytes]:
        """Chunks as they arrive; hashed in a read-ahead thread, so that hashing
        overlaps gRPC's receive and the caller's writing (docs/benchmarks.md)."""

        def hash_chunk(response: pb.BackupResponse) -> None:
            if response.WhichOneof("frame") == "chunk":
                self._digest.update(response.chunk)

        with read_ahead(responses, each=hash_chunk) as received:
            for response in received:
                kind = response.WhichOneof("frame")
                if kind == "chunk":
                    chunk = response.chunk  # each access copies the bytes out of the message
                    self.size += len(chunk)
                    if on_progress:
                        on_progress(Progress("BACKUP", self.size, None))
                    yield chunk
                elif kind == "trailer":
                    trailer = response.trailer
                    if trailer.size_bytes != self.size or not hmac.compare_digest(
                        trailer.sha256, self._digest.digest()
                    ):
                        raise IncompleteBackup(
                            f"the backup's trailer does not match what arrived ({self.size} "
                            "bytes); the partial file was deleted"
                        )
                    return
                else:
                    raise IncompleteBackup(f"unexpected {kind} frame in the backup stream")
        raise IncompleteBackup(
            f"the backup stream ended after {self.size} bytes without a trailer; "
            "the partial file was deleted"
        )


def _iterate(responses: Iterator[T]) -> Iterator[T]:
    """The responses of a stream, with gRPC errors turned into SafeholdErrors."""
    try:
        yield from responses
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


def manifest_of(entry: pb.RepositoryBackup) -> Manifest:
    """A RepositoryBackup of the contract as the repository package's Manifest."""
    from safehold.repository import Manifest

    return Manifest(
        name=entry.name,
        engine=engine_label(entry.engine),
        engine_version=entry.engine_version,
        dump_format=pb.DumpFormat.Name(entry.dump_format),
        database_name=entry.database_name,
        created_at=entry.created_at.ToDatetime(tzinfo=UTC),
        safehold_version=entry.safehold_version,
        size_bytes=entry.artefact.size_bytes,
        sha256=entry.artefact.sha256.hex(),
        stored_size_bytes=entry.stored.size_bytes,
        stored_sha256=entry.stored.sha256.hex(),
        encryption=entry.encryption,
        schema_version=entry.schema_version or None,
    )


def _safe_to_retry(exc: BaseException) -> bool:
    return (
        isinstance(exc, ConnectionFailed)
        and exc.retryable
        and exc.code == grpc.StatusCode.UNAVAILABLE
    )


def open_channel(target: str, tls: TlsOptions | None) -> grpc.Channel:
    """A channel to target: plaintext, or TLS (with a client certificate when given)."""
    options: list[tuple[str, int | str]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    check_tls(tls.ca, tls.cert, tls.key)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes() if tls.ca else None,
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )
    return grpc.secure_channel(target, credentials, options=options)


def _check_manifest(manifest: pb.BackupManifest) -> None:
    """Refuse, before a byte is saved, a manifest that does not say what it sends."""
    engine = engine_of(manifest.dump_format)
    if engine == pb.ENGINE_UNSPECIFIED or engine != manifest.engine:
        raise InvalidBackup(
            f"the server's manifest announces a {engine_label(manifest.engine)} backup in "
            f"format {_format_name(manifest.dump_format)}, which is no backup it can send; "
            "nothing was saved",
            reason="NOT_A_BACKUP",
        )


class _FormatCheck:
    """Holds back the first bytes of a backup until they show the format the
    manifest promised, so that not even a stream gets a byte of anything else."""

    def __init__(self, sink: Sink, expected: pb.DumpFormat.ValueType) -> None:
        self._sink = sink
        self._expected = expected
        self._head: bytearray | None = bytearray()

    def write(self, chunk: bytes) -> None:
        if self._head is None:
            self._sink.write(chunk)
            return
        self._head += chunk
        if len(self._head) >= SNIFF_BYTES:
            self.finish()

    @property
    def passed_on(self) -> bool:
        """Whether any byte has reached the sink."""
        return self._head is None

    def finish(self) -> None:
        """Check what has been held back (all of a short backup) and pass it on."""
        if self._head is None:
            return
        found = sniff(bytes(self._head[:SNIFF_BYTES]))
        if found != self._expected:
            raise InvalidBackup(
                f"the server announced a {_format_name(self._expected)} backup but sent "
                f"{_format_name(found)}; nothing was saved",
                reason="NOT_A_BACKUP",
            )
        head, self._head = bytes(self._head), None
        self._sink.write(head)


def _format_name(fmt: pb.DumpFormat.ValueType) -> str:
    if fmt == pb.DUMP_FORMAT_UNSPECIFIED:
        return "no known format"
    return pb.DumpFormat.Name(fmt).removeprefix("DUMP_FORMAT_")


def _sidecar(result: BackupResult, manifest: pb.BackupManifest) -> bytes:
    """A small JSON beside the backup, so a file found later says what it is."""
    return (
        json.dumps(
            {
                "engine": result.engine,
                "engine_version": result.engine_version,
                "dump_format": pb.DumpFormat.Name(manifest.dump_format),
                "database_name": result.database_name,
                "created_at": result.created_at.isoformat() + "Z",
                "safehold_version": manifest.safehold_version,
                "schema_version": manifest.schema_version or None,
                "size_bytes": result.size_bytes,
                "sha256": result.sha256,
            },
            indent=2,
        )
        + "\n"
    ).encode()

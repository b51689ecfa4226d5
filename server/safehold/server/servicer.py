"""Frames safehold.v1.BackupService streams around an engine.

Backup: manifest, chunks, trailer. Restore: header, spool, verify, pre-restore
backup, replace, result. Every failure leaves as a SafeholdError status with
an ErrorInfo; nothing else reaches the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from safehold.contract import REQUEST_ID_KEY, DatabaseState, Reason
from safehold.formats import engine_label
from safehold.read_ahead import read_ahead
from safehold.server.config import Config
from safehold.server.engines import Engine, Notice, RestoreOptions
from safehold.server.errors import (
    BadFrame,
    Cancelled,
    EngineMismatch,
    InvalidRequest,
    RestoreFailed,
    RestoreInProgress,
    RollbackFailed,
    SafeholdError,
    ShuttingDown,
    TooManyBackups,
    TruncatedUpload,
    UploadTooLarge,
)
from safehold.server.gate import ReadWriteGate
from safehold.server.keeper import Keeper, NoRepository
from safehold.server.listing import entry, page
from safehold.server.logs import request_id
from safehold.server.metrics import Metrics
from safehold.server.pre_restore import PreRestoreHistory
from safehold.server.spool import Spool
from safehold.server.watchdog import IdleWatchdog, StallWatchdog
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SAFEHOLD_VERSION = version("safehold")
PROGRESS_EVERY_BYTES = 8 * 1024 * 1024
"""How often the receiving phase reports progress."""

Method = Callable[..., Generator[Any, None, None]]
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclasses.dataclass(frozen=True)
class Last:
    """A call's final message, sent only once the call has let go of everything
    (the restore lock, the spool, a backup slot, its place among the running
    calls): a caller who has it can start the next call at once, and a stopping
    server does not wait for a call whose answer is already out."""

    message: Any


def _serves(operation: str | None) -> Callable[[Method], Method]:
    """Run a stream as one call: its request id on every log line and sent back
    to the caller, counted in the metrics, and any error it raises turned into
    the rich status that ends the call."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def wrapper(
            self: BackupServicer, request: object, context: grpc.ServicerContext
        ) -> Generator[Any, None, None]:
            request_id.set(_request_id_of(context))
            try:
                context.send_initial_metadata(((REQUEST_ID_KEY, request_id.get()),))
                if operation:
                    self._metrics.started(operation)
                final = None
                with (
                    self._calls.running(operation),
                    contextlib.closing(method(self, request, context)) as items,
                ):
                    # closing(): a caller gone mid-call ends the method at once
                    # (its locks and files go), not whenever it is collected.
                    for item in items:
                        if isinstance(item, Last):
                            final = item.message  # the method goes on to its end first
                        else:
                            yield item
                if final is not None:
                    yield final
            except SafeholdError as err:
                log.warning(
                    "%s failed: %s [%s] (peer %s)",
                    method.__name__,
                    err.describe(),
                    err.reason,
                    context.peer(),
                    extra={"reason": err.reason.value, "peer": context.peer()},
                )
                if operation:
                    self._metrics.failed(operation, err.reason)
                context.abort_with_status(err.to_status())
            except GeneratorExit:
                if operation:
                    self._metrics.failed(operation, Reason.CANCELLED)
                raise
            except Exception:
                log.exception("%s failed unexpectedly", method.__name__)
                if operation:
                    self._metrics.failed(operation, Reason.INTERNAL)
                context.abort_with_status(
                    SafeholdError("internal error; the server log has the details").to_status()
                )
            finally:
                request_id.set("-")

        return wrapper

    return decorate


def _request_id_of(context: grpc.ServicerContext) -> str:
    """The caller's x-request-id when it sent a sane one, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class BackupServicer(pb_grpc.BackupServiceServicer):
    """Serves one engine; holds the restore lock and the backup/restore gate."""

    def __init__(self, engine: Engine, config: Config, metrics: Metrics) -> None:
        self._engine = engine
        self._config = config
        self._metrics = metrics
        self._restore_lock = threading.Lock()
        self._backup_slots = threading.BoundedSemaphore(config.max_concurrent_backups)
        self._gate = ReadWriteGate()
        self._stopping = threading.Event()
        self.keeper: Keeper | None = None
        """The server's repository (--repository), set by app.build()."""
        self.pre_restore = PreRestoreHistory.from_setting(
            config.pre_restore_path, config.data_dir, engine.file_suffix, config.keep_pre_restore
        )
        self._calls = _RunningCalls(metrics)

    def begin_shutdown(self) -> None:
        """Refuse new work; running calls finish within the server's grace period."""
        self._stopping.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no backup or restore runs, at most timeout; whether none does."""
        return self._calls.wait_idle(timeout)

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        reply: pb.GetServerInfoResponse = next(self._server_info(request, context))
        return reply

    @_serves(None)
    def _server_info(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> Generator[pb.GetServerInfoResponse, None, None]:
        info = self._engine.info()
        newest = self.pre_restore.newest()
        yield pb.GetServerInfoResponse(
            engine=self._engine.kind,
            engine_version=info.version,
            database_name=info.database_name,
            database_size_bytes=info.size_bytes,
            safehold_version=SAFEHOLD_VERSION,
            tool_versions=info.tool_versions,
            max_upload_bytes=self._config.max_upload_bytes,
            warnings=info.warnings,
            pre_restore_directory=str(self.pre_restore.directory),
            newest_pre_restore_backup=str(newest) if newest else "",
            schema_version=info.schema_version,
            database_location=self._config.target.describe(),
            restore_blockers=info.restore_blockers,
        )

    @_serves("backup")
    def Backup(
        self, request: pb.BackupRequest, context: grpc.ServicerContext
    ) -> Generator[pb.BackupResponse | Last, None, None]:
        self._refuse_when_stopping()
        level = request.compression_level if request.HasField("compression_level") else None
        if level is not None and not 0 <= level <= 9:
            raise InvalidRequest(f"compression_level must be 0-9, not {level}")
        sent = [0]
        stall = StallWatchdog(context, self._config.stall_timeout_seconds)
        try:
            with self._backup_slot():
                yield from stall.watch(self._stream_backup(level, sent))
        except GeneratorExit:
            log.warning(
                "backup %s after %d bytes; its snapshot was ended",
                "stalled" if stall.fired else "abandoned by the client",
                sent[0],
            )
            raise

    @contextlib.contextmanager
    def _backup_slot(self) -> Iterator[None]:
        """One of --max-concurrent-backups places, or TooManyBackups at once."""
        if not self._backup_slots.acquire(blocking=False):
            raise TooManyBackups(
                f"{self._config.max_concurrent_backups} backups are already running "
                "(--max-concurrent-backups); retry when one has finished"
            )
        try:
            yield
        finally:
            self._backup_slots.release()

    @contextlib.contextmanager
    def backup_frames(self) -> Iterator[Iterator[pb.BackupResponse]]:
        """The Backup RPC's frames for a caller in this process (the repository keeper):
        the same backup slots, read gate, engine path and shutdown refusal."""
        self._refuse_when_stopping()
        with self._backup_slot():
            frames = self._stream_backup(None, [0])
            try:
                # In process, the final frame needs no holding back (see Last).
                yield (f.message if isinstance(f, Last) else f for f in frames)
            finally:
                frames.close()

    def database_name(self) -> str:
        return self._engine.info().database_name

    def ListRepositoryBackups(
        self, request: pb.ListRepositoryBackupsRequest, context: grpc.ServicerContext
    ) -> pb.ListRepositoryBackupsResponse:
        reply: pb.ListRepositoryBackupsResponse = next(self._list_backups(request, context))
        return reply

    @_serves(None)
    def _list_backups(
        self, request: pb.ListRepositoryBackupsRequest, context: grpc.ServicerContext
    ) -> Generator[pb.ListRepositoryBackupsResponse, None, None]:
        yield page(self._keeper().repository, request)

    def CreateRepositoryBackup(
        self, request: pb.CreateRepositoryBackupRequest, context: grpc.ServicerContext
    ) -> pb.CreateRepositoryBackupResponse:
        reply: pb.CreateRepositoryBackupResponse = next(self._backup_now(request, context))
        return reply

    @_serves("repository_backup")
    def _backup_now(
        self, request: pb.CreateRepositoryBackupRequest, context: grpc.ServicerContext
    ) -> Generator[pb.CreateRepositoryBackupResponse, None, None]:
        result = self._keeper().run_now(self._config.lock_timeout_seconds)
        yield pb.CreateRepositoryBackupResponse(
            backup=entry(result.manifest),
            backups_in_repository=result.backups_in_repository,
            pruned=result.pruned,
        )

    def _keeper(self) -> Keeper:
        if self.keeper is None:
            raise NoRepository(
                "this server has no repository: start it with --repository (SAFEHOLD_REPOSITORY)"
            )
        return self.keeper

    def _stream_backup(
        self, level: int | None, sent: list[int]
    ) -> Generator[pb.BackupResponse | Last, None, None]:
        """Manifest, chunks, trailer; sent[0] counts the chunk bytes handed to gRPC."""
        started = time.monotonic()
        digest = hashlib.sha256()
        with (
            self._gate.reading(self._config.lock_timeout_seconds),
            self._engine.backup(level) as source,
            read_ahead(source, each=digest.update) as chunks,
        ):
            info = self._engine.info()
            created = timestamp_pb2.Timestamp()
            created.GetCurrentTime()
            stamp = created.ToDatetime().strftime("%Y%m%dT%H%M%SZ")
            log.info("backup of %s started", info.database_name)
            yield pb.BackupResponse(
                manifest=pb.BackupManifest(
                    engine=self._engine.kind,
                    engine_version=info.version,
                    dump_format=self._engine.dump_format,
                    safehold_version=SAFEHOLD_VERSION,
                    database_name=info.database_name,
                    created_at=created,
                    suggested_file_name=f"{info.database_name}-{stamp}{self._engine.file_suffix}",
                    schema_version=info.schema_version,
                )
            )
            for chunk in chunks:
                self._refuse_when_stopping()
                sent[0] += len(chunk)
                self._metrics.moved("backup", len(chunk))
                yield pb.BackupResponse(chunk=chunk)
        elapsed = time.monotonic() - started
        log.info(
            "backup of %s finished: %d bytes, sha256 %s, %.1fs",
            info.database_name,
            sent[0],
            digest.hexdigest(),
            elapsed,
            extra={"bytes": sent[0], "sha256": digest.hexdigest(), "seconds": round(elapsed, 3)},
        )
        self._metrics.finished("backup", elapsed)
        yield Last(pb.BackupResponse(trailer=pb.Digest(size_bytes=sent[0], sha256=digest.digest())))

    @_serves("restore")
    def Restore(
        self, request_iterator: Iterator[pb.RestoreRequest], context: grpc.ServicerContext
    ) -> Generator[pb.RestoreResponse | Last, None, None]:
        self._refuse_when_stopping()
        started = time.monotonic()
        with IdleWatchdog(
            request_iterator, context, self._config.stall_timeout_seconds
        ) as requests:
            yield from self._restore(requests, context, started)

    def _restore(
        self,
        requests: IdleWatchdog[pb.RestoreRequest],
        context: grpc.ServicerContext,
        started: float,
    ) -> Iterator[pb.RestoreResponse | Last]:
        header = self._read_header(requests)
        options = RestoreOptions(
            allow_version_mismatch=header.allow_version_mismatch,
            terminate_blocking_sessions=header.terminate_blocking_sessions,
            allow_schema_downgrade=header.allow_schema_downgrade,
        )
        if not self._restore_lock.acquire(blocking=False):
            raise RestoreInProgress("another restore is running; try again when it has finished")
        replaced = False
        try:
            log.info("restore started from %s", context.peer(), extra={"peer": context.peer()})
            with Spool(self._config.spool_dir, self._config.max_upload_bytes) as spool:
                yield from self._receive(requests, spool, header, context)
                requests.stop()
                yield _phase(pb.RESTORE_PHASE_VERIFYING, spool.size, spool.size)
                for notice in self._engine.inspect(spool.path, options):
                    yield _notice(notice)
                log.info("upload verified: %d bytes", spool.size)

                _still_wanted(context)
                yield _phase(pb.RESTORE_PHASE_PRE_RESTORE_BACKUP, 0)
                pre_restore = self.pre_restore.new_path()
                self._engine.snapshot(pre_restore)
                yield _notice(
                    Notice(
                        "PRE_RESTORE_BACKUP",
                        f"the database as it was before this restore is saved at {pre_restore}",
                    )
                )

                notices: list[Notice] = []
                try:
                    _still_wanted(context)
                    yield _phase(pb.RESTORE_PHASE_RESTORING, 0, spool.size)
                    with self._gate.writing(self._config.lock_timeout_seconds):
                        self._replace(spool.path, options, pre_restore, notices)
                except SafeholdError as err:
                    # Whatever failed after the snapshot, the caller learns where it is.
                    err.pre_restore_path = err.pre_restore_path or str(pre_restore)
                    raise
                replaced = True
                self.pre_restore.prune()
                for notice in notices:
                    yield _notice(notice)
                seconds = time.monotonic() - started
                elapsed = duration_pb2.Duration()
                elapsed.FromTimedelta(timedelta(seconds=seconds))
                log.info(
                    "restore finished: %d bytes in %.1fs",
                    spool.size,
                    seconds,
                    extra={"bytes": spool.size, "seconds": round(seconds, 3)},
                )
                self._metrics.finished("restore", seconds)
                yield _phase(pb.RESTORE_PHASE_DONE, spool.size, spool.size)
                result = pb.RestoreResult(
                    engine=self._engine.kind,
                    bytes_restored=spool.size,
                    pre_restore_backup_path=str(pre_restore),
                    duration=elapsed,
                )
                yield Last(pb.RestoreResponse(result=result))
        except GeneratorExit:
            # The client cancelled, disconnected or ran past its deadline.
            log.warning(
                "restore abandoned by the client; the database %s",
                "was restored before it left" if replaced else "is unchanged",
            )
            raise
        finally:
            self._restore_lock.release()

    def _refuse_when_stopping(self) -> None:
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down; retry against its replacement")

    def _read_header(self, requests: IdleWatchdog[pb.RestoreRequest]) -> pb.RestoreHeader:
        first = _next_frame(requests)
        if first is None:
            raise TruncatedUpload("the upload ended before its header")
        if first.WhichOneof("frame") != "header":
            raise BadFrame("the first frame of a restore must be its header")
        header = first.header
        if header.engine not in (pb.ENGINE_UNSPECIFIED, self._engine.kind):
            raise EngineMismatch(
                f"the backup is for {engine_label(header.engine)}, but this server's "
                f"database is {engine_label(self._engine.kind)}"
            )
        limit = self._config.max_upload_bytes
        if limit and header.HasField("expected_size_bytes") and header.expected_size_bytes > limit:
            raise UploadTooLarge(
                f"the backup is {header.expected_size_bytes} bytes, over this server's "
                f"limit of {limit} bytes (--max-upload-bytes)"
            )
        return header

    def _receive(
        self,
        requests: IdleWatchdog[pb.RestoreRequest],
        spool: Spool,
        header: pb.RestoreHeader,
        context: grpc.ServicerContext,
    ) -> Iterator[pb.RestoreResponse]:
        """Spool chunks until the trailer, then check it; report progress on the way."""
        total = header.expected_size_bytes if header.HasField("expected_size_bytes") else None
        yield _phase(pb.RESTORE_PHASE_RECEIVING, 0, total)
        reported = 0
        while (request := _next_frame(requests)) is not None:
            kind = request.WhichOneof("frame")
            if kind == "chunk":
                self._refuse_when_stopping()
                spool.write(request.chunk)
                self._metrics.moved("restore", len(request.chunk))
                if spool.size - reported >= PROGRESS_EVERY_BYTES:
                    reported = spool.size
                    yield _progress(pb.RESTORE_PHASE_RECEIVING, spool.size, total)
            elif kind == "trailer":
                if _next_frame(requests) is not None:
                    raise BadFrame("a frame followed the trailer; the trailer must be last")
                spool.finish(request.trailer)
                yield _progress(pb.RESTORE_PHASE_RECEIVING, spool.size, total)
                return
            else:
                raise BadFrame(f"unexpected {kind or 'empty'} frame while receiving chunks")
        # gRPC may end the request stream, rather than fail it, when the call dies.
        _still_wanted(context)
        raise TruncatedUpload(
            f"the upload ended after {spool.size} bytes without a trailer: it is incomplete"
        )

    def _replace(
        self, path: Path, options: RestoreOptions, pre_restore: Path, notices: list[Notice]
    ) -> None:
        """Restore; when the engine cannot vouch for what it left, put the
        pre-restore backup back and say which of the two happened."""
        try:
            self._engine.restore(path, options, notices.append)
        except SafeholdError:
            raise
        except Exception as exc:
            log.exception("restore failed part-way; putting the pre-restore backup back")
            try:
                self._engine.restore(
                    pre_restore,
                    RestoreOptions(allow_version_mismatch=True, allow_schema_downgrade=True),
                    notices.append,
                )
            except Exception:
                log.exception("putting the pre-restore backup back failed too")
                raise RollbackFailed(
                    f"the restore failed ({exc}) and so did putting the pre-restore backup back",
                    database=DatabaseState.UNKNOWN,
                    pre_restore_path=str(pre_restore),
                ) from None
            raise RestoreFailed(
                f"the restore failed: {exc}",
                database=DatabaseState.RESTORED_FROM_PRE_RESTORE_BACKUP,
                pre_restore_path=str(pre_restore),
            ) from None


class _RunningCalls:
    """How many backups and restores run, so that a stopping server can wait for them."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._cond = threading.Condition()
        self._count = 0

    @contextlib.contextmanager
    def running(self, operation: str | None) -> Iterator[None]:
        if operation is None:
            yield
            return
        with self._cond:
            self._count += 1
        try:
            with self._metrics.running(operation):
                yield
        finally:
            with self._cond:
                self._count -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            if self._count:
                log.info("waiting up to %gs for %d running call(s)", timeout, self._count)
            return self._cond.wait_for(lambda: self._count == 0, timeout)


def _still_wanted(context: grpc.ServicerContext) -> None:
    """Touch nothing for a caller that has gone (cancelled, disconnected, out of time)."""
    if not context.is_active() or context.time_remaining() <= 0:
        raise Cancelled("the client went away; the restore stopped before touching the database")


def _next_frame(requests: IdleWatchdog[pb.RestoreRequest]) -> pb.RestoreRequest | None:
    """The next frame, None at the end of the stream; a vanished client is Cancelled.

    When the idle watchdog has cancelled the call, gRPC may end the request
    stream either way (an error, or a plain end): both are the abandoned upload."""
    try:
        frame = next(requests, None)
    except grpc.RpcError:
        frame = None
        if not requests.fired:
            raise Cancelled("the client went away during the upload") from None
    if requests.fired:
        raise Cancelled(
            f"the client sent nothing for {requests.timeout:g}s; the upload was abandoned"
        )
    return frame


def _phase(
    phase: pb.RestorePhase.ValueType, done: int, total: int | None = None
) -> pb.RestoreResponse:
    """Progress that starts a phase, logged so the operator can follow along."""
    log.info("restore phase %s", pb.RestorePhase.Name(phase).removeprefix("RESTORE_PHASE_"))
    return _progress(phase, done, total)


def _progress(
    phase: pb.RestorePhase.ValueType, done: int, total: int | None = None
) -> pb.RestoreResponse:
    return pb.RestoreResponse(
        progress=pb.RestoreProgress(phase=phase, bytes_done=done, bytes_total=total)
    )


def _notice(notice: Notice) -> pb.RestoreResponse:
    log.info("restore notice %s: %s", notice.reason, notice.message)
    return pb.RestoreResponse(notice=pb.RestoreNotice(reason=notice.reason, message=notice.message))

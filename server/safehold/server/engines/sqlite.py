"""SQLite: snapshots and restores through SQLite's online backup API.

The backup API copies a consistent image while the application keeps its
connections open and keeps writing; restoring through the same API writes
the new pages into the live file in one transaction, so open connections,
WAL mode included, see the restored content and a failure changes nothing.

An upload is a file from a stranger. It is checked the way SQLite's "Defense
Against the Dark Arts" advises for untrusted database files: opened read-only
and immutable, with trusted_schema off (the schema may not call functions with
side effects), cell_size_check on, no attached databases, tight recursion
limits, and a deadline on the checks through a progress handler, so that an
index built to be slow is refused instead of holding the restore lock.

A backup made elsewhere (another page size, journal mode, auto-vacuum, a
sqlite3 `.backup`, `VACUUM INTO` or a plain copy) restores into the live file
whatever its mode: the one thing the backup API cannot do, change the page size
of a WAL database, is done on the spooled copy first (`VACUUM` to the live page
size). A text encoding other than the live database's is refused before
anything is touched: open connections cannot read a database whose encoding
changed under them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from safehold.files import atomic_path, private_temp_file
from safehold.formats import SNIFF_BYTES, engine_label, engine_of, sniff
from safehold.server import schema_version
from safehold.server.config import SqliteTarget
from safehold.server.engines import EngineInfo, Notice, Notify, RestoreOptions, read_chunks
from safehold.server.errors import (
    BackupFailed,
    DatabaseBusy,
    DatabaseUnavailable,
    EngineMismatch,
    NotABackup,
    RestoreFailed,
    SettingsMismatch,
)
from safehold.v1 import backup_service_pb2 as pb

log = logging.getLogger(__name__)

_HEADER_BYTES = 100


class SqliteEngine:
    """The SQLite database file at target.path."""

    kind = pb.ENGINE_SQLITE
    dump_format = pb.DUMP_FORMAT_SQLITE_FILE
    file_suffix = ".sqlite"

    def __init__(
        self,
        target: SqliteTarget,
        scratch_dir: Path,
        lock_timeout: float,
        *,
        inspect_timeout: float = 600,
        schema_query: str | None = None,
    ) -> None:
        self._path = target.path
        self._scratch_dir = scratch_dir
        self._lock_timeout = lock_timeout
        self._inspect_timeout = inspect_timeout
        self._schema_queries = schema_version.queries(schema_query)

    def info(self) -> EngineInfo:
        size = sum(
            p.stat().st_size
            for p in (self._path, self._path.with_name(self._path.name + "-wal"))
            if p.exists()
        )
        return EngineInfo(
            version=sqlite3.sqlite_version,
            database_name=self._path.stem,
            size_bytes=size,
            tool_versions={"sqlite": sqlite3.sqlite_version},
            schema_version=self._live_schema_version().value or "",
        )

    def check(self) -> None:
        try:
            with contextlib.closing(_connect_file(self._path, "ro")) as db:
                db.execute("PRAGMA busy_timeout = 2000")
                db.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(
                f"cannot read the SQLite database {self._path}: {exc}"
            ) from None

    @contextlib.contextmanager
    def backup(self, compression_level: int | None) -> Iterator[Iterator[bytes]]:
        # The snapshot must be a file of its own: streaming the live file would
        # hold the application's lock for as long as the slowest client takes.
        # It lives in the private scratch dir and always goes.
        tmp = private_temp_file(self._scratch_dir, "safehold-snapshot-")
        try:
            self._copy_live_to(tmp)
            with open(tmp, "rb") as f:
                yield read_chunks(f)
        finally:
            for leftover in (tmp, *_companions(tmp)):
                leftover.unlink(missing_ok=True)

    def snapshot(self, dest: Path) -> None:
        with atomic_path(dest) as tmp:
            self._copy_live_to(tmp)

    def inspect(self, path: Path, options: RestoreOptions) -> list[Notice]:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        found = sniff(head)
        if found != pb.DUMP_FORMAT_SQLITE_FILE:
            if engine_of(found) != pb.ENGINE_UNSPECIFIED:
                raise EngineMismatch(
                    f"the upload is a {engine_label(engine_of(found))} backup, "
                    "but this server's database is SQLite"
                )
            raise NotABackup("the upload is not a SQLite database (no SQLite header)")
        _check_page_alignment(head, path.stat().st_size)
        _check_encoding(head, _header(self._path))
        deadline = time.monotonic() + self._inspect_timeout
        try:
            with contextlib.closing(_connect_untrusted(path, deadline)) as db:
                problems = [row[0] for row in db.execute("PRAGMA integrity_check(10)")]
        except sqlite3.DatabaseError as exc:
            if time.monotonic() > deadline:
                raise NotABackup(
                    f"checking the upload took longer than {self._inspect_timeout:g}s "
                    "(--inspect-timeout): it is refused rather than left holding the restore"
                ) from None
            raise NotABackup(f"the upload is not a usable SQLite database: {exc}") from None
        if problems != ["ok"]:
            raise NotABackup("the upload fails SQLite's integrity check: " + "; ".join(problems))
        return []

    def restore(self, path: Path, options: RestoreOptions, notify: Notify) -> None:
        self._check_schema_version(path, options, notify)
        _keep_journal_mode(path, self._path)
        self._fit_page_size(path, notify)
        with contextlib.closing(_connect_file(path, "ro", immutable=True)) as source:
            try:
                self._copy(source, self._connect_live(), "restore")
            except sqlite3.Error as exc:
                # The backup API writes all pages in one transaction on the
                # destination; an error rolls it back.
                raise RestoreFailed(f"SQLite refused the restore: {exc}") from None
        self._checkpoint()

    def _fit_page_size(self, path: Path, notify: Notify) -> None:
        """A WAL database cannot change its page size, and the backup API refuses
        to try (SQLITE_READONLY): rewrite the spooled upload to the live page size."""
        live = _header(self._path)
        upload = _header(path)
        if not _is_wal(live) or _page_size(live) == _page_size(upload):
            return
        with open(path, "r+b") as f:  # the spooled copy, ours: it needs no WAL to be rewritten
            f.seek(18)
            f.write(b"\x01\x01")
        deadline = time.monotonic() + self._inspect_timeout
        try:
            with contextlib.closing(_connect_untrusted(path, deadline, writable=True)) as db:
                db.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 1)  # VACUUM attaches its new copy
                db.execute(f"PRAGMA page_size = {_page_size(live)}")
                db.execute("VACUUM")
        except sqlite3.Error as exc:
            raise SettingsMismatch(
                f"the backup's page size is {_page_size(upload)} bytes and the database, in "
                f"WAL mode, keeps its {_page_size(live)}; rewriting the backup failed ({exc}): "
                f"convert it first with sqlite3 BACKUP 'PRAGMA page_size={_page_size(live)}; "
                "VACUUM' and restore that"
            ) from None
        finally:
            path.with_name(path.name + "-journal").unlink(missing_ok=True)
        notify(
            Notice(
                "PAGE_SIZE_CONVERTED",
                f"the backup's page size ({_page_size(upload)} bytes) was rewritten to the "
                f"database's ({_page_size(live)} bytes), which a WAL database keeps",
            )
        )

    def _check_schema_version(self, path: Path, options: RestoreOptions, notify: Notify) -> None:
        """Compare the upload's schema version with the live database's. Here, not in
        inspect(): the live database is read only once the restore may wait for it
        (its locks are the application's), and before anything is written."""
        deadline = time.monotonic() + self._inspect_timeout
        try:
            with contextlib.closing(_connect_untrusted(path, deadline)) as db:
                upload = self._schema_version(db)
        except sqlite3.Error as exc:
            upload = schema_version.SchemaVersion(None, f"the upload cannot be read: {exc}")
        live = self._live_schema_version()
        for notice in schema_version.judge(upload, live, options.allow_schema_downgrade):
            notify(notice)

    def _live_schema_version(self) -> schema_version.SchemaVersion:
        try:
            with contextlib.closing(_connect_file(self._path, "ro")) as db:
                db.execute(f"PRAGMA busy_timeout = {int(self._lock_timeout * 1000)}")
                return self._schema_version(db)
        except sqlite3.Error as exc:
            return schema_version.SchemaVersion(None, f"the database cannot be read: {exc}")

    def _schema_version(self, db: sqlite3.Connection) -> schema_version.SchemaVersion:
        return schema_version.read(
            lambda sql: db.execute(sql).fetchall(), self._schema_queries, sqlite3.Error
        )

    def _copy_live_to(self, dest: Path) -> None:
        """Copy the live file (and its WAL) as bytes, inside a read transaction,
        then fold the copied WAL into the copy.

        The kernel copies a file several times faster than the backup API copies
        pages, and the read transaction is what makes the bytes one point in
        time: in rollback-journal mode it holds SHARED, so no writer can touch
        the file until the copy ends (a shorter wait for writers than the
        backup API's, which holds the same lock for longer). In WAL mode it
        blocks no writer; it pins the reader's snapshot, so a checkpoint may
        only write into the main file pages whose newer copies are in the WAL
        up to that snapshot, which the copied WAL holds too. Opening the copy
        replays its WAL up to the last complete commit (a frame half-written
        at the end fails its checksum and is ignored), and the checkpoint
        leaves one self-contained file.
        """
        wal = _companions(self._path)[0]
        dest_wal = _companions(dest)[0]
        try:
            with contextlib.closing(self._connect_live()) as live:
                live.execute("BEGIN")
                live.execute("SELECT count(*) FROM sqlite_schema").fetchone()
                _copy_private(self._path, dest)
                wal_copied = wal.exists() and _copy_private(wal, dest_wal) > 0
                live.execute("COMMIT")
            if wal_copied:
                with contextlib.closing(_connect_file(dest, "rw")) as copy:
                    busy = copy.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    if busy is None or busy[0] != 0:
                        raise BackupFailed("cannot fold the copied WAL into the snapshot")
            if dest.stat().st_size == 0:
                # A database nobody has written yet is an empty file; its backup is a
                # real SQLite file (header and empty schema), as the backup API made.
                with contextlib.closing(_connect_file(dest, "rw")) as copy:
                    copy.execute("VACUUM")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise DatabaseBusy(
                    f"the database stayed locked for {self._lock_timeout:.0f}s during the "
                    "snapshot; retry when the application's long transaction ends"
                ) from None
            raise BackupFailed(f"cannot snapshot the database: {exc}") from None
        except sqlite3.Error as exc:
            raise BackupFailed(f"cannot snapshot the database: {exc}") from None
        finally:
            for leftover in _companions(dest):
                leftover.unlink(missing_ok=True)

    def _copy(self, source: sqlite3.Connection, dest: sqlite3.Connection, what: str) -> None:
        """Copy every page in one step, so that concurrent writers cannot make it restart.

        Python's backup() retries forever while the other side is locked; the
        progress callback turns that into a bounded wait.
        """
        deadline = time.monotonic() + self._lock_timeout

        def give_up_when_late(status: int, _remaining: int, _total: int) -> None:
            if status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and (
                time.monotonic() > deadline
            ):
                raise DatabaseBusy(
                    f"the database stayed locked for {self._lock_timeout:.0f}s during the "
                    f"{what}; retry when the application's long transaction ends"
                )

        with contextlib.closing(dest):
            source.backup(dest, pages=-1, progress=give_up_when_late)

    def _connect_live(self) -> sqlite3.Connection:
        db = _connect_file(self._path, "rw")
        db.execute(f"PRAGMA busy_timeout = {int(self._lock_timeout * 1000)}")
        return db

    def _checkpoint(self) -> None:
        """Fold the restored pages from a WAL into the main file, so that a copy
        of the file alone is complete. Best effort: readers may hold it back."""
        try:
            with contextlib.closing(self._connect_live()) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("restored, but the WAL checkpoint did not run: %s", exc)


def _companions(path: Path) -> tuple[Path, Path, Path]:
    """The files SQLite keeps beside a database: WAL, shared memory, rollback journal."""
    wal, shm, journal = (path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))
    return wal, shm, journal


def _copy_private(src: Path, dest: Path) -> int:
    """Copy src over dest in the kernel (sendfile), dest readable by the owner
    only; the bytes copied."""
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT, 0o600))
    shutil.copyfile(src, dest)
    return dest.stat().st_size


def _connect_file(path: Path, mode: str, *, immutable: bool = False) -> sqlite3.Connection:
    """Open by URI so that the file is never created by accident and never
    mistaken for an in-memory name."""
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    if immutable:
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


_UNTRUSTED_LIMITS = {
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH: 10,
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 100,
    sqlite3.SQLITE_LIMIT_FUNCTION_ARG: 32,
}
_PROGRESS_STEPS = 10_000
"""Virtual machine steps between deadline checks: often enough, cheap enough."""
_WAL_VERSION = 2
"""Header bytes 18 and 19 (file format write and read versions): 2 means WAL, 1 rollback."""


def _connect_untrusted(
    path: Path, deadline: float, *, writable: bool = False
) -> sqlite3.Connection:
    """A file from a stranger, opened the way SQLite advises for untrusted files:
    read-only, unless it is safehold's own spooled copy being rewritten."""
    db = _connect_file(path, "rw") if writable else _connect_file(path, "ro", immutable=True)
    for pragma in ("trusted_schema = OFF", "cell_size_check = ON", "mmap_size = 0"):
        db.execute(f"PRAGMA {pragma}")
    for limit, value in _UNTRUSTED_LIMITS.items():
        db.setlimit(limit, value)
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
    return db


def _keep_journal_mode(upload: Path, live: Path) -> None:
    """The backup API copies the upload's header, and with it WAL mode: a WAL-mode
    upload would switch a rollback-journal database to WAL behind the
    application's back. Mark the (spooled, private) upload as rollback-journal
    when the live database is; the reverse needs nothing, since SQLite keeps a
    WAL destination in WAL mode itself."""
    if _is_wal(_header(live)):
        return
    with open(upload, "r+b") as f:
        f.seek(18)
        if f.read(2) == bytes([_WAL_VERSION, _WAL_VERSION]):
            f.seek(18)
            f.write(b"\x01\x01")


_ENCODINGS = {1: "UTF-8", 2: "UTF-16le", 3: "UTF-16be"}


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEADER_BYTES)


def _page_size(head: bytes) -> int:
    size = int.from_bytes(head[16:18], "big")
    return 65536 if size == 1 else size


def _is_wal(head: bytes) -> bool:
    return head[18:19] == bytes([_WAL_VERSION])


def _check_encoding(upload: bytes, live: bytes) -> None:
    """Open connections keep the text encoding they read; a database that
    changes it under them fails every query ("attached databases must use the
    same text encoding"). A live file with no header yet takes anything."""
    if len(live) < _HEADER_BYTES:
        return
    ours, theirs = (
        _ENCODINGS.get(int.from_bytes(h[56:60], "big"), "UTF-8") for h in (live, upload)
    )
    if ours != theirs:
        raise SettingsMismatch(
            f"the backup's text encoding is {theirs} and the database's is {ours}; the "
            "application's open connections could not read it. Convert the backup first: "
            "sqlite3 BACKUP .dump | sqlite3 CONVERTED (a new file is UTF-8), and restore that"
        )


def _check_page_alignment(head: bytes, size: int) -> None:
    """A SQLite file is a whole number of pages; anything else was cut off."""
    if len(head) < _HEADER_BYTES:
        raise NotABackup("the upload is shorter than a SQLite header")
    page_size = _page_size(head)
    if page_size < 512 or page_size & (page_size - 1) or size % page_size:
        raise NotABackup(
            f"the upload is not a whole SQLite database ({size} bytes, page size {page_size}): "
            "it looks truncated"
        )

"""PostgreSQL: pg_dump streamed straight into chunks; restores in one transaction.

Backup runs `pg_dump -Fc` and hands its stdout to the stream as it comes: no
temp file, and gRPC's flow control is the backpressure. Restore runs one psql
session that drops the database's own schemas and replays the dump inside one
transaction that safehold opens and commits itself (session.py), behind a
lexer that lets no meta-command or transaction control through
(script_guard.py). No CREATEDB right, no dropdb.

The package, by concern: tools.py (which tools, their versions, each child's
environment), archive.py (what a dump says about itself), ownership.py (owners
and grantees this server can take), privileges.py (what the role needs for an
owner-only restore), script_guard.py and session.py (the replay and its
transaction).
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from safehold.files import atomic_path
from safehold.formats import SNIFF_BYTES, sniff
from safehold.server import schema_version
from safehold.server.config import PostgresTarget
from safehold.server.engines import (
    CHUNK_BYTES,
    EngineInfo,
    Notice,
    Notify,
    RestoreOptions,
    read_chunks,
)
from safehold.server.engines.postgres import compression
from safehold.server.engines.postgres.archive import DumpHeader, major_of, read_header
from safehold.server.engines.postgres.ownership import ownership_flags
from safehold.server.engines.postgres.privileges import restore_blockers
from safehold.server.engines.postgres.schema_probe import SchemaProbe
from safehold.server.engines.postgres.script_guard import ScriptGuard, UnsafeScript
from safehold.server.engines.postgres.session import Replay, TransactionEscaped
from safehold.server.engines.postgres.tools import (
    MINIMUM_PSQL,
    Tools,
    connection_env,
    offline_env,
)
from safehold.server.engines.processes import Child, child
from safehold.server.errors import (
    BackupFailed,
    DatabaseBusy,
    DatabaseUnavailable,
    EngineMismatch,
    InsufficientPrivilege,
    NotABackup,
    RestoreFailed,
    SchemaNewer,
    VersionMismatch,
)
from safehold.v1 import backup_service_pb2 as pb

log = logging.getLogger(__name__)

_HARMLESS_OUTPUT = ("there is already a transaction in progress",)
_LOCK_TABLE = re.compile(r"Query was: LOCK TABLE (.+) IN ACCESS SHARE MODE")
_DANGEROUS_ROLES = ("pg_execute_server_program", "pg_write_server_files", "pg_read_server_files")

# Runs inside the restore's transaction, before the dump: everything the
# database's owner owns goes, so that objects missing from the backup are gone.
_PREAMBLE = """\
SET LOCAL lock_timeout = '{lock_timeout_ms}ms';
SET LOCAL client_min_messages = warning;
SET standard_conforming_strings = on;
DO $safehold$
DECLARE
    schema_name text;
BEGIN
    PERFORM pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;
    FOR schema_name IN
        SELECT nspname FROM pg_catalog.pg_namespace
        WHERE nspname <> 'information_schema' AND nspname !~ '^pg_'
    LOOP
        EXECUTE pg_catalog.format('DROP SCHEMA %I CASCADE', schema_name);
    END LOOP;
END
$safehold$;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
COMMENT ON SCHEMA public IS 'standard public schema';
"""


class PostgresEngine:
    """The PostgreSQL database at target, reached with password."""

    kind = pb.ENGINE_POSTGRESQL
    dump_format = pb.DUMP_FORMAT_PG_CUSTOM
    file_suffix = ".dump"

    def __init__(
        self,
        target: PostgresTarget,
        password: str,
        lock_timeout: float,
        *,
        schema_query: str | None = None,
        restore_timeout: float = 0,
    ) -> None:
        self._target = target
        self._password = password
        self._lock_timeout = lock_timeout
        self._restore_timeout = restore_timeout
        self._tools = Tools()
        self.compression = compression.for_tools(self._tools)
        self._schema_queries = schema_version.queries(schema_query)

    def info(self) -> EngineInfo:
        with self._connect() as db:
            row = db.execute(
                "SELECT current_setting('server_version'), pg_database_size(current_database())"
            ).fetchone()
            blockers = restore_blockers(db)
        assert row is not None
        version = str(row[0]).split()[0]
        if self._tools.select_for(version):
            self.compression = compression.for_tools(self._tools)
        return EngineInfo(
            version=version,
            database_name=self._target.dbname,
            size_bytes=int(row[1]),
            tool_versions={**self._tools.describe(), "psql (minimum)": MINIMUM_PSQL},
            warnings=self.role_warnings(),
            schema_version=self.live_schema_version().value or "",
            restore_blockers=blockers,
        )

    def check(self) -> None:
        with self._connect() as db:
            db.execute("SELECT 1")

    def live_schema_version(self) -> schema_version.SchemaVersion:
        """The database's schema version, each query read-only in its own
        transaction, bounded by the lock timeout."""
        timeout_ms = int(self._lock_timeout * 1000)
        with self._connect() as db:
            db.execute("SET default_transaction_read_only = on")
            db.execute(f"SET lock_timeout = {timeout_ms}".encode())
            db.execute(f"SET statement_timeout = {timeout_ms}".encode())
            return schema_version.read(
                lambda sql: db.execute(sql.encode()).fetchall(), self._schema_queries, psycopg.Error
            )

    def role_warnings(self) -> list[str]:
        """What the role may do beyond its database: a restored dump runs with it."""
        with self._connect() as db:
            row = db.execute(
                "SELECT rolsuper, rolcreaterole, ARRAY(SELECT b.rolname FROM pg_roles b "
                "WHERE b.rolname = ANY(%s) AND pg_has_role(current_user, b.oid, 'USAGE')) "
                "FROM pg_roles WHERE rolname = current_user",
                (list(_DANGEROUS_ROLES),),
            ).fetchone()
        if row is None:
            return []
        superuser, createrole, granted = bool(row[0]), bool(row[1]), list(row[2])
        powers = (["SUPERUSER"] if superuser else []) + (["CREATEROLE"] if createrole else [])
        powers += granted
        if not powers:
            return []
        return [
            f"the database role {self._target.user} has {', '.join(powers)}: a restored dump "
            "runs with these rights and could run programs or touch files on the database host "
            "(COPY ... TO PROGRAM) or change other roles; use a role that only owns its database"
        ]

    @contextlib.contextmanager
    def backup(self, compression_level: int | None) -> Iterator[Iterator[bytes]]:
        self._check_pg_dump()
        level = self.compression.default if compression_level is None else str(compression_level)
        argv = self._tools.argv(
            "pg_dump", "--format=custom", "--no-password", self._lock_wait(), f"--compress={level}"
        )
        with child(argv, self._env(), stdout=subprocess.PIPE) as dump:
            yield self._dump_chunks(dump)

    def snapshot(self, dest: Path) -> None:
        self._check_pg_dump()
        with atomic_path(dest) as tmp:
            argv = self._tools.argv(
                "pg_dump",
                "--format=custom",
                "--no-password",
                self._lock_wait(),
                f"--compress={self.compression.pre_restore}",
                f"--file={tmp}",
            )
            with child(argv, self._env()) as dump:
                self._raise_unless_dumped(dump)

    def inspect(self, path: Path, options: RestoreOptions) -> list[Notice]:
        header = self._read_header(path)
        with self._connect() as db:
            blockers = restore_blockers(db)
        if blockers:
            raise InsufficientPrivilege("; ".join(blockers))
        if header.dump_format == pb.DUMP_FORMAT_PG_PLAIN:
            with open(path, "rb") as script:
                _check_script(read_chunks(script), archive=False)
        else:
            self._check_archive(path, header)
        return self._check_server_version(header, options)

    def restore(self, path: Path, options: RestoreOptions, notify: Notify) -> None:
        header = self._read_header(path)
        if options.terminate_blocking_sessions:
            self._terminate_other_sessions(notify)
        preamble = _PREAMBLE.format(lock_timeout_ms=int(self._lock_timeout * 1000))
        argv = self._tools.argv("psql", "-X", "--no-password", "-v", "ON_ERROR_STOP=1")
        archive = header.dump_format != pb.DUMP_FORMAT_PG_PLAIN
        flags = ownership_flags(self._tools, path, self._connect, notify) if archive else []
        live = self.live_schema_version()
        probe = SchemaProbe(self._schema_queries)
        schema_notices: list[Notice] = []

        def approve(printed: str) -> None:
            """Decide before the COMMIT; SchemaNewer leaves it unwritten (rolled back)."""
            upload = probe.read(printed)
            schema_notices.extend(
                schema_version.judge(upload, live, options.allow_schema_downgrade)
            )

        with child(argv, self._env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as psql:
            session = Replay(psql)
            with _deadline(self._restore_timeout, lambda: self._end(psql, session)) as expired:
                committed = self._replay(
                    psql,
                    session,
                    path,
                    preamble,
                    flags,
                    archive=archive,
                    probe=probe,
                    approve=approve,
                )
                code = psql.wait()
            escaped = session.escaped()
            if escaped:
                raise TransactionEscaped(
                    f"the upload ended safehold's transaction ({escaped.decode()})"
                )
            if expired.is_set():
                raise RestoreFailed(
                    f"the replace ran longer than {self._restore_timeout:g}s (--restore-timeout) "
                    "and was ended; everything was rolled back"
                )
            if code != 0 or not committed:
                raise _restore_error(psql.stderr_lines())
            for line in psql.stderr_lines():
                if line and not any(h in line for h in _HARMLESS_OUTPUT):
                    notify(Notice("ENGINE_OUTPUT", f"psql: {line}"))
            for notice in schema_notices:
                notify(notice)

    def _replay(
        self,
        psql: Child,
        session: Replay,
        path: Path,
        preamble: str,
        flags: list[str],
        *,
        archive: bool,
        probe: SchemaProbe,
        approve: Callable[[str], None],
    ) -> bool:
        """Run the whole replay; True when safehold wrote its COMMIT: after psql
        reported the upload's schema version from inside the transaction, and
        approve, given it, did not raise."""
        try:
            session.open(preamble)
            if archive:
                self._replay_archive(session, path, flags)
            else:
                with open(path, "rb") as script:
                    session.replay(read_chunks(script), archive=False)
            printed = session.finish(probe.sql(), probe.value())
            if printed is None:
                return False  # psql stopped at an error; its exit code and stderr say which
            approve(printed)
            return session.commit()
        except BrokenPipeError:
            return False  # psql stopped at an error; its exit code and stderr say which
        except (UnsafeScript, TransactionEscaped, RestoreFailed, SchemaNewer) as exc:
            self._end(psql, session)
            psql.wait()
            if session.escaped() or isinstance(exc, TransactionEscaped):
                raise TransactionEscaped(str(exc)) from None
            if isinstance(exc, UnsafeScript):
                raise RestoreFailed(f"the dump was refused part-way: {exc}") from None
            raise

    def _end(self, psql: Child, session: Replay) -> None:
        """Stop a replay before its end. psql is killed before its input closes (at the
        end of its input psql runs what it holds), and its server process is ended
        too: a statement still running there would otherwise go on, and hold its
        locks, long after psql is gone. Nothing was committed, so all rolls back."""
        psql.process.kill()
        pid = session.backend_pid
        if pid is None:
            return
        try:
            with self._connect() as db:
                db.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (pid,))
        except (psycopg.Error, DatabaseUnavailable):
            log.warning("could not end the restore's server process %d; it ends on its own", pid)

    def _replay_archive(self, session: Replay, path: Path, flags: list[str]) -> None:
        """Feed pg_restore's script to psql through the guard; pg_restore must exit
        cleanly before safehold commits."""
        argv = self._tools.argv("pg_restore", "--file=-", "--single-transaction", *flags, str(path))
        with child(argv, offline_env(), stdout=subprocess.PIPE) as convert:
            session.replay(_pipe_chunks(convert), archive=True)
            _raise_unless_ok(convert, "pg_restore", RestoreFailed)

    def _dump_chunks(self, dump: Child) -> Iterator[bytes]:
        yield from read_chunks(dump.stdout)
        self._raise_unless_dumped(dump)

    def _lock_wait(self) -> str:
        """pg_dump's bound on waiting for each table's lock: without it, a
        session holding ACCESS EXCLUSIVE would keep a backup (and the restore
        whose pre-restore backup it is) waiting for ever."""
        return f"--lock-wait-timeout={max(1, int(self._lock_timeout * 1000))}"

    def _raise_unless_dumped(self, dump: Child) -> None:
        """pg_dump's failure; a lock it could not get is DATABASE_BUSY, naming
        the sessions that hold it when PostgreSQL shows them."""
        failed = dump.wait() != 0
        lines = dump.stderr_lines() if failed else []
        lock = next((m for line in lines if (m := _LOCK_TABLE.search(line))), None)
        if lock is not None:
            raise DatabaseBusy(
                f"pg_dump waited {self._lock_timeout:g}s (--lock-timeout) for a lock on "
                f"{lock.group(1)}: {self._lock_holders(lock.group(1))}; retry when it is released"
            )
        _raise_unless_ok(dump, "pg_dump", BackupFailed)

    def _lock_holders(self, relation: str) -> str:
        """Who holds ACCESS EXCLUSIVE on relation, asked on a connection of its own."""
        try:
            with self._connect() as db:
                rows = db.execute(
                    "SELECT a.pid, a.usename, a.application_name, a.state, a.xact_start "
                    "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid) "
                    "WHERE l.granted AND l.locktype = 'relation' "
                    "AND l.mode = 'AccessExclusiveLock' "
                    "AND l.relation = pg_catalog.to_regclass(%s)",
                    (relation,),
                ).fetchall()
        except (psycopg.Error, DatabaseUnavailable):
            rows = []
        if not rows:
            return "the session holding it is no longer visible"
        return "held by " + ", ".join(
            f"session {pid} (user {user or '?'}, application {app or '-'}, "
            f"{state or 'state hidden'}"
            + (f", transaction since {started:%H:%M:%S %Z}" if started else "")
            + ")"
            for pid, user, app, state, started in rows
        )

    def _read_header(self, path: Path) -> DumpHeader:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        fmt = sniff(head)
        if fmt == pb.DUMP_FORMAT_SQLITE_FILE:
            raise EngineMismatch(
                "the upload is a SQLite database, but this server's database is PostgreSQL"
            )
        if fmt == pb.DUMP_FORMAT_UNSPECIFIED:
            raise NotABackup(
                "the upload is not a pg_dump archive (custom or tar) or a plain SQL dump"
            )
        try:
            header = read_header(head)
            for version in (header.server_version, header.pg_dump_version):
                if version is not None:
                    major_of(version)
        except ValueError as exc:
            raise NotABackup(f"the upload's pg_dump header is broken: {exc}") from None
        return header

    def _check_archive(self, path: Path, header: DumpHeader) -> None:
        """pg_restore must read the whole table of contents, and the SQL it would
        run before and after the data must pass the guard (the data's own COPY
        statements are checked as they stream)."""
        argv = self._tools.argv("pg_restore", "--list", str(path))
        with child(argv, offline_env()) as listing:
            if listing.wait() != 0:
                errors = " ".join(listing.stderr_lines()[-3:])
                if "unsupported version" in errors:
                    raise VersionMismatch(
                        f"the local pg_restore {self._tools.versions['pg_restore']} cannot read "
                        f"this archive (archive format {header.archive_version}, made by pg_dump "
                        f"{header.pg_dump_version} from PostgreSQL {header.server_version}); "
                        "restore it with a server whose pg_restore is at least that new"
                    )
                raise NotABackup(f"pg_restore cannot read the archive: {errors}")
        argv = self._tools.argv(
            "pg_restore",
            "--file=-",
            "--single-transaction",
            "--section=pre-data",
            "--section=post-data",
            str(path),
        )
        with child(argv, offline_env(), stdout=subprocess.PIPE) as script:
            _check_script(_pipe_chunks(script), archive=True)
            if script.wait() != 0:
                raise NotABackup(
                    f"pg_restore cannot read the archive: {' '.join(script.stderr_lines()[-3:])}"
                )

    def _check_server_version(self, header: DumpHeader, options: RestoreOptions) -> list[Notice]:
        local = self.info().version
        if header.server_version is None:
            return [
                Notice(
                    "VERSION_UNKNOWN",
                    f"the backup does not say which PostgreSQL it came from; this "
                    f"server is PostgreSQL {local}",
                )
            ]
        if major_of(header.server_version) == major_of(local):
            return []
        message = (
            f"the backup comes from PostgreSQL {header.server_version}; this server is "
            f"PostgreSQL {local}"
        )
        if not options.allow_version_mismatch:
            raise VersionMismatch(f"{message}: set allow_version_mismatch to restore anyway")
        return [Notice("VERSION_MISMATCH", message)]

    def _check_pg_dump(self) -> None:
        """A pg_dump older than the server refuses to dump it; say so before streaming."""
        server = self.info().version
        dump = self._tools.versions["pg_dump"]
        if major_of(dump) < major_of(server):
            raise VersionMismatch(
                f"pg_dump {dump} is older than the PostgreSQL server {server}: install "
                f"pg_dump {server.split('.')[0]} or newer next to safehold"
            )

    def _terminate_other_sessions(self, notify: Notify) -> None:
        """End the other sessions on the database that this role may end (its own
        roles'; a superuser's it may not), before anything is written."""
        try:
            with self._connect() as db:
                row = db.execute(
                    "SELECT count(*) FILTER (WHERE mine AND pg_catalog.pg_terminate_backend(pid)),"
                    " count(*) FILTER (WHERE NOT mine) FROM (SELECT pid, "
                    "pg_catalog.pg_has_role(current_user, usesysid, 'MEMBER') AS mine "
                    "FROM pg_catalog.pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_catalog.pg_backend_pid() AND usesysid IS NOT NULL) s"
                ).fetchone()
        except psycopg.Error as exc:
            raise DatabaseBusy(f"cannot end the other sessions on the database: {exc}") from None
        ended, others = (int(row[0]), int(row[1])) if row else (0, 0)
        left = f"; {others} session(s) of other roles were left alone" if others else ""
        notify(
            Notice(
                "SESSIONS_TERMINATED",
                f"ended {ended} other session(s) on the database, as asked{left}",
            )
        )

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        t = self._target
        try:
            return psycopg.connect(
                host=t.host,
                port=t.port,
                user=t.user,
                dbname=t.dbname,
                password=self._password,
                connect_timeout=10,
                application_name="safehold",
                autocommit=True,
            )
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}".strip()) from None

    def _env(self) -> dict[str, str]:
        return connection_env(self._target, self._password)


@contextlib.contextmanager
def _deadline(seconds: float, end: Callable[[], None]) -> Iterator[threading.Event]:
    """Call end when the block runs past seconds (0: never); the event says whether
    it did. The dump is the uploader's to write, and a dump that sleeps would
    otherwise hold the database's locks for as long as it likes."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        end()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    if seconds:
        timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def _pipe_chunks(process: Child) -> Iterator[bytes]:
    """What a child has written so far, as soon as it is there: reading whole
    chunks would make the child and psql take turns instead of running side by side."""
    while chunk := process.stdout.read1(CHUNK_BYTES):  # type: ignore[attr-defined]
        yield chunk


def _check_script(pieces: Iterator[bytes], *, archive: bool) -> None:
    """Run a whole script through the guard without sending it anywhere."""
    guard = ScriptGuard(archive=archive)
    try:
        for piece in pieces:
            guard.feed(piece)
        guard.finish()
    except UnsafeScript as exc:
        raise NotABackup(str(exc)) from None


def _raise_unless_ok(
    process: Child, name: str, error: type[BackupFailed] | type[RestoreFailed]
) -> None:
    code = process.wait()
    if code != 0:
        detail = "; ".join(line for line in process.stderr_lines()[-5:] if line)
        raise error(f"{name} failed (exit code {code}): {detail or 'no message'}")


def _restore_error(stderr: list[str]) -> RestoreFailed | DatabaseBusy:
    """The first error psql met: the one that stopped the restore."""
    errors = [line for line in stderr if "ERROR:" in line or "FATAL:" in line]
    first = errors[0] if errors else "; ".join(stderr[-3:]) or "psql failed"
    if "lock timeout" in first:
        return DatabaseBusy(
            f"other sessions held locks on the database past the lock timeout ({first}); "
            "retry when they finish, or ask to terminate them"
        )
    return RestoreFailed(f"the dump failed to apply, everything was rolled back: {first}")

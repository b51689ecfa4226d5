"""PostgreSQL: pg_dump streamed straight into chunks; restores in one transaction.

Backup runs `pg_dump -Fc` and hands its stdout to the stream as it comes: no
temp file, and gRPC's flow control is the backpressure. Restore runs one psql
session that drops the database's own schemas and replays the dump between a
BEGIN and a COMMIT that safehold writes itself, the COMMIT only once the whole
script has gone through: a cut-off input or any error ends psql without it,
and PostgreSQL rolls everything back. No CREATEDB right, no dropdb.

Connection values reach libpq as environment variables, which it takes
literally: a database called `host=/x dbname=y` or `-f/etc/passwd` is just a
name. The password is in the child's environment, never in argv or a log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psycopg

from safehold.files import atomic_path, private_temp_file
from safehold.formats import SNIFF_BYTES, sniff
from safehold.server.config import PostgresTarget
from safehold.server.engines import (
    CHUNK_BYTES,
    EngineInfo,
    Notice,
    Notify,
    RestoreOptions,
    read_chunks,
)
from safehold.server.engines.pg_archive import DumpHeader, major_of, read_header
from safehold.server.engines.pg_privileges import restore_blockers
from safehold.server.engines.processes import Child, child
from safehold.server.errors import (
    BackupFailed,
    DatabaseBusy,
    DatabaseUnavailable,
    EngineMismatch,
    InsufficientPrivilege,
    NotABackup,
    RestoreFailed,
    VersionMismatch,
)
from safehold.v1 import backup_service_pb2 as pb

log = logging.getLogger(__name__)

_TOOLS = ("pg_dump", "pg_restore", "psql")
_VERSION = re.compile(r"\) (\d+(?:\.\d+)*)")
_PG_RESTORE_COMMIT = b"\nCOMMIT;\n"
_HOLD_BACK_BYTES = 4096
"""pg_restore's COMMIT is followed only by a few comment lines: it is in this tail."""
_GRANTEE = re.compile(
    r"^(?:GRANT|REVOKE) .* (?:TO|FROM) (\"(?:[^\"]|\"\")+\"|[^\s;,]+)", re.MULTILINE
)
_TRANSACTION_CONTROL = re.compile(
    rb"^(BEGIN|COMMIT|END|ROLLBACK|ABORT|START\s+TRANSACTION|SAVEPOINT|RELEASE|PREPARE"
    rb"\s+TRANSACTION)\b",
    re.IGNORECASE,
)
_COPY_FROM_STDIN = re.compile(rb"^COPY .* FROM stdin;\s*$")
_DOLLAR_QUOTE = re.compile(rb"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")
_HARMLESS_OUTPUT = ("there is already a transaction in progress",)

# Runs inside the restore's transaction, before the dump: everything the
# database's owner owns goes, so that objects missing from the backup are gone.
_PREAMBLE = """\
BEGIN;
SET LOCAL lock_timeout = '{lock_timeout_ms}ms';
SET LOCAL client_min_messages = warning;
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

    def __init__(self, target: PostgresTarget, password: str, lock_timeout: float) -> None:
        self._target = target
        self._password = password
        self._lock_timeout = lock_timeout
        self._tools = {name: shutil.which(name) for name in _TOOLS}
        missing = [name for name, path in self._tools.items() if path is None]
        if missing:
            raise OSError(f"PostgreSQL client tools not found on PATH: {', '.join(missing)}")
        self._tool_versions = {name: self._tool_version(name) for name in _TOOLS}

    def info(self) -> EngineInfo:
        with self._connect() as db:
            row = db.execute(
                "SELECT current_setting('server_version'), pg_database_size(current_database())"
            ).fetchone()
            blockers = restore_blockers(db)
        assert row is not None
        return EngineInfo(
            version=str(row[0]).split()[0],
            database_name=self._target.dbname,
            size_bytes=int(row[1]),
            tool_versions=dict(self._tool_versions),
            restore_blockers=blockers,
        )

    def check(self) -> None:
        with self._connect() as db:
            db.execute("SELECT 1")

    @contextlib.contextmanager
    def backup(self, compression_level: int | None) -> Iterator[Iterator[bytes]]:
        self._check_pg_dump()
        argv = [self._tool("pg_dump"), "--format=custom", "--no-password"]
        if compression_level is not None:
            argv.append(f"--compress={compression_level}")
        with child(argv, self._env(), stdout=subprocess.PIPE) as dump:
            yield self._dump_chunks(dump)

    def snapshot(self, dest: Path) -> None:
        self._check_pg_dump()
        with atomic_path(dest) as tmp:
            argv = [self._tool("pg_dump"), "--format=custom", "--no-password", f"--file={tmp}"]
            with child(argv, self._env()) as dump:
                _raise_unless_ok(dump, "pg_dump", BackupFailed)

    def inspect(self, path: Path, options: RestoreOptions) -> list[Notice]:
        header = self._read_header(path)
        with self._connect() as db:
            blockers = restore_blockers(db)
        if blockers:
            raise InsufficientPrivilege("; ".join(blockers))
        if header.dump_format == pb.DUMP_FORMAT_PG_PLAIN:
            _check_plain_script(path)
        else:
            self._check_readable(path, header)
        return self._check_server_version(header, options)

    def restore(self, path: Path, options: RestoreOptions, notify: Notify) -> None:
        header = self._read_header(path)
        if options.terminate_blocking_sessions:
            self._terminate_other_sessions(notify)
        preamble = _PREAMBLE.format(lock_timeout_ms=int(self._lock_timeout * 1000))
        argv = [self._tool("psql"), "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1"]
        with child(argv, self._env(), stdin=subprocess.PIPE) as psql:
            try:
                psql.stdin.write(preamble.encode())
                if header.dump_format == pb.DUMP_FORMAT_PG_PLAIN:
                    with open(path, "rb") as script:
                        shutil.copyfileobj(script, psql.stdin, 1024 * 1024)
                else:
                    self._replay_archive(path, psql.stdin, notify)
                psql.stdin.write(b"\nCOMMIT;\n")
                psql.stdin.close()
            except BrokenPipeError:
                pass  # psql stopped at an error; its exit code and stderr say which
            code = psql.wait()
            for line in psql.stderr_lines():
                if line and not any(h in line for h in _HARMLESS_OUTPUT) and code == 0:
                    notify(Notice("ENGINE_OUTPUT", f"psql: {line}"))
            if code != 0:
                raise _restore_error(psql.stderr_lines())

    def _replay_archive(self, path: Path, sink: IO[bytes], notify: Notify) -> None:
        """Feed pg_restore's script to psql, holding back its final COMMIT:
        safehold commits only once pg_restore has exited cleanly."""
        flags = self._ownership_flags(path, notify)
        argv = [self._tool("pg_restore"), "--file=-", "--single-transaction", *flags, str(path)]
        with child(argv, self._env(), stdout=subprocess.PIPE) as convert:
            held = b""
            source = convert.stdout.fileno()
            # os.read returns what the pipe holds, so pg_restore and psql both keep
            # running instead of taking turns around a full-chunk read.
            while chunk := os.read(source, CHUNK_BYTES):
                data = held + chunk
                sink.write(data[:-_HOLD_BACK_BYTES])
                held = data[-_HOLD_BACK_BYTES:]
            _raise_unless_ok(convert, "pg_restore", RestoreFailed)
        commit = held.rfind(_PG_RESTORE_COMMIT)
        if commit < 0:
            raise RestoreFailed("pg_restore's script ended without its COMMIT: it is incomplete")
        sink.write(held[:commit] + held[commit + len(_PG_RESTORE_COMMIT) :])

    def _ownership_flags(self, path: Path, notify: Notify) -> list[str]:
        """Restore owners and privileges when every role they name is usable
        here; otherwise leave them out, and say so, rather than fail."""
        listing = self._run(["pg_restore", "--list", str(path)])
        owners = {
            line.split()[-1]
            for line in listing.splitlines()
            if line and not line.startswith(";") and len(line.split()) > 1
        }
        owners.discard("-")
        acl_entries = [line for line in listing.splitlines() if " ACL " in line]
        grantees: set[str] = set()
        if acl_entries:
            acl_list = private_temp_file(path.parent, "safehold-snapshot-acl-")
            try:
                acl_list.write_text("\n".join(acl_entries) + "\n")
                script = self._run(["pg_restore", "--file=-", f"--use-list={acl_list}", str(path)])
            finally:
                acl_list.unlink(missing_ok=True)
            grantees = {_unquote(m) for m in _GRANTEE.findall(script)} - {"PUBLIC"}
        with self._connect() as db:
            unusable = sorted(role for role in owners if not _role_usable(db, role))
            missing = sorted(
                role
                for role in grantees
                if db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                is None
            )
            user = str(db.execute("SELECT current_user").fetchone()[0])  # type: ignore[index]
        flags = []
        if unusable:
            flags.append("--no-owner")
            notify(
                Notice(
                    "OWNERSHIP_SKIPPED",
                    (
                        f"restored without the backup's owners ({', '.join(unusable)} do not exist "
                        f"here or are not roles of {user}): every object is owned by {user}"
                    ),
                )
            )
        if missing:
            flags.append("--no-privileges")
            notify(
                Notice(
                    "PRIVILEGES_SKIPPED",
                    (
                        f"restored without the backup's privileges: the roles {', '.join(missing)} "
                        "do not exist here"
                    ),
                )
            )
        return flags

    def _dump_chunks(self, dump: Child) -> Iterator[bytes]:
        yield from read_chunks(dump.stdout)
        _raise_unless_ok(dump, "pg_dump", BackupFailed)

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
            return read_header(head)
        except ValueError as exc:
            raise NotABackup(f"the upload's pg_dump header is broken: {exc}") from None

    def _check_readable(self, path: Path, header: DumpHeader) -> None:
        """pg_restore must be able to read the whole table of contents."""
        argv = [self._tool("pg_restore"), "--list", str(path)]
        with child(argv, self._env()) as listing:
            if listing.wait() == 0:
                return
            errors = " ".join(listing.stderr_lines()[-3:])
        if "unsupported version" in errors:
            raise VersionMismatch(
                f"the local pg_restore {self._tool_versions['pg_restore']} cannot read this "
                f"archive (archive format {header.archive_version}, made by pg_dump "
                f"{header.pg_dump_version} from PostgreSQL {header.server_version}); "
                "restore it with a server whose pg_restore is at least that new"
            )
        raise NotABackup(f"pg_restore cannot read the archive: {errors}")

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
        dump = self._tool_versions["pg_dump"]
        if major_of(dump) < major_of(server):
            raise VersionMismatch(
                f"pg_dump {dump} is older than the PostgreSQL server {server}: install "
                f"pg_dump {server.split('.')[0]} or newer next to safehold"
            )

    def _terminate_other_sessions(self, notify: Notify) -> None:
        with self._connect() as db:
            ended = db.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        count = int(ended[0]) if ended else 0
        notify(
            Notice(
                "SESSIONS_TERMINATED", f"ended {count} other session(s) on the database, as asked"
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
        """The child's environment: ours, less any PG* setting that could point it
        elsewhere, plus the target's values, taken literally by libpq."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        t = self._target
        env.update(
            PGHOST=t.host,
            PGPORT=str(t.port),
            PGUSER=t.user,
            PGDATABASE=t.dbname,
            PGPASSWORD=self._password,
            PGAPPNAME="safehold",
            PGCONNECT_TIMEOUT="10",
        )
        return env

    def _tool(self, name: str) -> str:
        path = self._tools[name]
        assert path is not None
        return path

    def _tool_version(self, name: str) -> str:
        text = self._run([name, "--version"])
        match = _VERSION.search(text)
        if not match:
            raise OSError(f"cannot tell the version of {name}: {text!r}")
        return match.group(1)

    def _run(self, argv: list[str]) -> str:
        """Run a short tool call and return its stdout; raise on failure."""
        result = subprocess.run(
            [self._tool(argv[0]), *argv[1:]],
            env=self._env(),
            capture_output=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RestoreFailed(
                f"{argv[0]} failed: {result.stderr.decode('utf-8', 'replace').strip()}"
            )
        return result.stdout.decode("utf-8", "replace")


def _role_usable(db: psycopg.Connection[tuple[Any, ...]], role: str) -> bool:
    row = db.execute(
        "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s",
        (role,),
    ).fetchone()
    return bool(row and row[0])


def _unquote(role: str) -> str:
    return role[1:-1].replace('""', '"') if role.startswith('"') else role


def _check_plain_script(path: Path) -> None:
    """A plain script must not commit on its own: safehold's one transaction
    around it is what makes the restore all-or-nothing. COPY data and
    dollar-quoted bodies (where BEGIN and END are PL/pgSQL) are skipped."""
    in_copy = False
    dollar_tag: bytes | None = None
    with open(path, "rb") as script:
        for number, line in enumerate(script, 1):
            if in_copy:
                in_copy = line.rstrip(b"\r\n") != b"\\."
                continue
            if dollar_tag is None:
                if _COPY_FROM_STDIN.match(line):
                    in_copy = True
                    continue
                if _TRANSACTION_CONTROL.match(line):
                    raise NotABackup(
                        f"the SQL script controls its own transactions (line {number}: "
                        f"{line.strip()[:40].decode('utf-8', 'replace')}), so it cannot be "
                        "restored all-or-nothing; use a pg_dump custom or tar archive"
                    )
            for tag in _DOLLAR_QUOTE.findall(line):
                if dollar_tag is None:
                    dollar_tag = tag
                elif tag == dollar_tag:
                    dollar_tag = None


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

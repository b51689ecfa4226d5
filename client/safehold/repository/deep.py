"""`verify --deep`: have the engine's own reader go through a backup, touching no database.

SQLite: the file is copied to a private temp directory and opened read-only and
immutable for `PRAGMA integrity_check`. pg_dump custom and tar archives go through
`pg_restore --list` (the table of contents) and `pg_restore --file=/dev/null` (every
data block, decompressed, turned into SQL that goes nowhere). A plain SQL script has
no reader but psql, which would need a database: for it the full read that checks its
SHA-256 is the check.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from safehold.client.errors import VerificationFailed
from safehold.repository.manifest import Manifest
from safehold.streams import COPY_CHUNK

Opener = Callable[[], AbstractContextManager[BinaryIO]]
_PG_ARCHIVES = {"DUMP_FORMAT_PG_CUSTOM", "DUMP_FORMAT_PG_TAR"}


def check(manifest: Manifest, opener: Opener) -> str:
    """Raise VerificationFailed unless the engine reads the backup whole; what was run."""
    if manifest.dump_format == "DUMP_FORMAT_SQLITE_FILE":
        return _sqlite(manifest, opener)
    if manifest.dump_format in _PG_ARCHIVES:
        _pg_restore(manifest, opener, ["--list"])
        _pg_restore(manifest, opener, ["--file=/dev/null"])
        return "pg_restore --list and a full pg_restore read"
    with opener() as f:
        while f.read(COPY_CHUNK):
            pass
    return "a full read (a plain SQL script has no reader but psql)"


def _sqlite(manifest: Manifest, opener: Opener) -> str:
    with tempfile.TemporaryDirectory(prefix="safehold-verify-") as tmp:
        copy = Path(tmp) / "backup.sqlite"
        with opener() as f, open(copy, "wb") as out:
            shutil.copyfileobj(f, out, COPY_CHUNK)
        uri = f"file:{copy}?mode=ro&immutable=1"
        try:
            with sqlite3.connect(uri, uri=True) as db:
                rows = db.execute("PRAGMA integrity_check").fetchall()
            db.close()
        except sqlite3.DatabaseError as err:
            raise VerificationFailed(f"{manifest.name}: SQLite cannot read it: {err}") from None
    if rows != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in rows[:5])
        raise VerificationFailed(f"{manifest.name}: SQLite integrity_check: {problems}")
    return "SQLite PRAGMA integrity_check"


def _pg_restore(manifest: Manifest, opener: Opener, args: list[str]) -> None:
    tool = shutil.which("pg_restore")
    if tool is None:
        raise VerificationFailed(
            f"{manifest.name}: --deep needs pg_restore on PATH for a PostgreSQL archive"
        )
    with tempfile.TemporaryFile() as stderr, opener() as f:
        child = subprocess.Popen(
            [tool, *args], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr
        )
        assert child.stdin is not None
        try:
            while chunk := f.read(COPY_CHUNK):
                child.stdin.write(chunk)
        except BrokenPipeError:
            pass  # pg_restore stopped early; its exit code says why
        finally:
            child.stdin.close()
            code = child.wait()
        stderr.seek(0)
        message = stderr.read().decode(errors="replace").strip()
    if code != 0:
        raise VerificationFailed(f"{manifest.name}: pg_restore {' '.join(args)}: {message}")

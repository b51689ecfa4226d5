"""One psql session that replays a script inside safehold's own transaction.

Three locks keep an upload from doing more than replacing the database:

1. psql runs restricted (`\\restrict KEY`, the PostgreSQL project's answer to
   CVE-2025-8714) with a fresh random key the upload cannot know: no
   meta-command in it can run, whatever the lexer in front thinks.
2. ScriptGuard (script_guard.py) lets through only statements that stay in the
   transaction and refuses the rest before psql sees them.
3. psql prints the command tag of every statement it runs (no `-q`), and the
   upload cannot silence it. A watcher reads them: a COMMIT, ROLLBACK or
   PREPARE TRANSACTION between safehold's start and end markers means the
   transaction was left, for certain; and safehold writes its own COMMIT only
   after psql has reported, from inside the same transaction id that the
   start marker printed, that everything before it ran.

Before the COMMIT, the end marker can also print a value computed inside the
transaction (the upload's schema version, schema_probe.py), hex-encoded on the
marker's own line, so that the engine can still decide not to commit.

So a restore either commits the whole script in one transaction, or fails
knowing whether the database was touched: `TransactionEscaped` when it was
(the caller puts the pre-restore backup back), a SafeholdError when it was not.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterable
from typing import IO

from safehold.server.engines.postgres.script_guard import ScriptGuard, UnsafeScript
from safehold.server.engines.processes import Child

_LINE_LIMIT = 16384
"""A tag or marker line is short (the end marker's value at most some 8 KiB of hex);
longer output lines (query results) are cut."""
_ESCAPE_TAGS = frozenset({b"COMMIT", b"ROLLBACK", b"PREPARE TRANSACTION"})
_XID = re.compile(rb"(\d+)")
_END = re.compile(rb":(\d+):([0-9a-f]*)")


class TransactionEscaped(Exception):
    """The upload ended safehold's transaction: the database may have changed."""


class _Watcher(threading.Thread):
    """Reads psql's stdout to its end: the start and end markers' transaction ids,
    and any transaction-ending command tag printed between them."""

    def __init__(self, stdout: IO[bytes], start_token: bytes, end_token: bytes) -> None:
        super().__init__(daemon=True, name="psql-stdout")
        self._stdout = stdout
        self._start_token = start_token
        self._end_token = end_token
        self.start_xid: bytes | None = None
        self.backend_pid: int | None = None
        self.end_xid: bytes | None = None
        self.end_value = b""
        self.escape: bytes | None = None
        self.end_seen = threading.Event()

    def run(self) -> None:
        try:
            line = b""
            while chunk := self._stdout.read1(1024 * 1024):  # type: ignore[attr-defined]
                lines = (line + chunk).split(b"\n")
                line = lines.pop()[:_LINE_LIMIT]
                for text in lines:
                    self._see(text[:_LINE_LIMIT].strip())
            self._see(line.strip())
        finally:
            self.end_seen.set()

    def _see(self, text: bytes) -> None:
        if self.end_xid is not None:
            return
        if self.start_xid is None:
            if text.startswith(self._start_token):
                self.start_xid = _xid(text)
                pid = text.rsplit(b":", 1)[-1]
                self.backend_pid = int(pid) if pid.isdigit() else None
            return
        if text.startswith(self._end_token):
            found = _END.fullmatch(text[len(self._end_token) :])
            self.end_xid = found.group(1) if found else b"?"
            self.end_value = found.group(2) if found else b""
            self.end_seen.set()
        elif text in _ESCAPE_TAGS and self.escape is None:
            self.escape = text


def _xid(text: bytes) -> bytes:
    """The transaction id of a marker line `token:xid` or `token:xid:pid`."""
    found = _XID.search(text.split(b":")[1] if text.count(b":") else b"")
    return found.group(1) if found else b"?"


class Replay:
    """Drives a running psql (stdin and stdout piped) through one restore."""

    def __init__(self, psql: Child) -> None:
        self._psql = psql
        self._key = secrets.token_hex(16)
        self._start = f"safehold-start-{secrets.token_hex(16)}"
        self._end = f"safehold-end-{secrets.token_hex(16)}"
        self._watcher = _Watcher(psql.stdout, self._start.encode(), self._end.encode())
        self._watcher.start()
        self._checked = False

    def open(self, preamble: str) -> None:
        """Restrict psql, open the transaction and print its id."""
        self._write(
            f"\\restrict {self._key}\nBEGIN;\n"
            f"SELECT '{self._start}:' || pg_catalog.txid_current() || ':' "
            f"|| pg_catalog.pg_backend_pid();\n{preamble}\n"
        )

    def replay(self, pieces: Iterable[bytes], *, archive: bool) -> None:
        """Send the script through the guard. Raises UnsafeScript, after which the
        caller must kill psql before it closes its input: psql runs what is left
        in its buffer at the end of its input."""
        guard = ScriptGuard(archive=archive)
        for piece in pieces:
            self._psql.stdin.write(guard.feed(piece))
        self._psql.stdin.write(guard.finish())

    def finish(self, before: str = "", value: str = "''") -> str | None:
        """Run the SQL before, then print the end marker with the transaction id
        and the text of the SQL expression value; check that everything ran
        inside the transaction that open() started, else raise TransactionEscaped.
        The value; None when psql stopped at an error before it got this far.
        The transaction stays open: commit() ends it."""
        self._write(
            f"\n{before}\nSELECT pg_catalog.concat('{self._end}', ':', pg_catalog.txid_current(), "
            f"':', pg_catalog.encode(pg_catalog.convert_to({value}, 'UTF8'), 'hex'));\n"
        )
        self._watcher.end_seen.wait()
        watcher = self._watcher
        if watcher.escape is not None:
            raise TransactionEscaped(
                f"the upload ended safehold's transaction ({watcher.escape.decode()})"
            )
        if watcher.end_xid is None:
            return None  # psql stopped at an error before the end marker: its exit code says
        if watcher.start_xid is None or watcher.start_xid != watcher.end_xid:
            raise TransactionEscaped("the upload left safehold's transaction")
        self._checked = True
        try:
            return bytes.fromhex(watcher.end_value.decode()).decode(errors="replace")
        except ValueError:
            return ""  # cut at the line limit: the value is lost, the check above stands

    def commit(self) -> bool:
        """Commit if, and only if, finish() (run now, if it was not) found that
        everything ran inside the transaction that open() started; otherwise leave
        it uncommitted and say what happened. False when psql stopped at an error
        before it got this far."""
        if not self._checked and self.finish() is None:
            return False
        self._write("COMMIT;\n")
        self._psql.stdin.close()
        return True

    @property
    def backend_pid(self) -> int | None:
        """The server process of psql's session, once the start marker has shown it."""
        return self._watcher.backend_pid

    def escaped(self) -> bytes | None:
        """After psql has exited: a transaction end the upload caused, if any."""
        self._watcher.join()
        return self._watcher.escape

    def _write(self, text: str) -> None:
        self._psql.stdin.write(text.encode())
        self._psql.stdin.flush()


__all__ = ["Replay", "TransactionEscaped", "UnsafeScript"]

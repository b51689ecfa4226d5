"""A call's last message is sent only once the call has let go of everything.

Without that, a caller who has its answer could find the server still holding
the restore lock (the next restore got RESTORE_IN_PROGRESS) and a SIGTERM right
after a call waited its whole grace period for a call that had already answered.
"""

from __future__ import annotations

from pathlib import Path

from helpers import Server

from safehold.client import Client


def test_a_call_has_let_go_of_everything_when_its_answer_arrives(
    sqlite_server: Server, tmp_path: Path
) -> None:
    with Client(sqlite_server.target, sqlite_server.password, attempts=1) as client:
        for i in range(40):
            backup = client.backup(tmp_path / f"b{i}.sqlite")
            client.restore(backup.path)  # at once: never RESTORE_IN_PROGRESS
            client.restore(backup.path)
    assert sqlite_server.stop() == 0
    assert "running call(s)" not in sqlite_server.log()  # nothing left to wait for

"""Scheduled backups as an operator runs them: `safehold serve --schedule ... --repository ...`
against a directory and the S3-protocol server, with faults, a webhook receiver on
loopback, the metrics port, and the two repository RPCs from the Python client."""

from __future__ import annotations

import http.server
import json
import re
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pyrage
import pytest
from conftest import PASSWORD
from helpers import Server, sqlite_content, start_server
from test_repository import Repo, cli, repo, s3  # noqa: F401 (fixtures reused)

STORED = re.compile(r"scheduled backup of \S+ stored: .*?(\d+) backups in the repository")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll condition until it holds, at most timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def serve(tmp: Path, db: Path, repository: Repo, *args: str) -> Server:
    return start_server(
        tmp,
        f"sqlite:///{db}",
        PASSWORD,
        "--repository",
        repository.url,
        "--metrics-listen",
        "127.0.0.1:0",
        *args,
        env=repository.env,
    )


def metric(server: Server, name: str) -> float:
    port = re.search(r"metrics on \S+ \(port (\d+)\)", server.log())
    assert port, server.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


def runs(server: Server) -> list[int]:
    """The repository's backup count after each scheduled run, from the log."""
    return [int(n) for n in STORED.findall(server.log())]


class Webhook:
    """An HTTP receiver on 127.0.0.1 that records every JSON document POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token"

    def events(self) -> list[object]:
        return [d["event"] for d in self.received]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


def test_runs_on_an_interval_with_retention_after_each_and_every_backup_restorable(
    repo: Repo,  # noqa: F811 (the fixture)
    tmp_path: Path,
    sqlite_db: Path,
) -> None:
    identity = pyrage.x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(str(identity) + "\n")
    args = ["--schedule", "2s", "--keep-last", "2"]
    if repo.s3:  # age-encrypted in S3, plain in the directory
        args += ["--recipient", str(identity.to_public())]
    expected = sqlite_content(sqlite_db)
    server = serve(tmp_path, sqlite_db, repo, *args)
    try:
        wait_for(lambda: len(runs(server)) >= 4, "four scheduled runs")
        assert metric(server, "safehold_repository_backups") == 2
        assert metric(server, "safehold_scheduled_backup_last_size_bytes") > 0
    finally:
        assert server.stop() == 0
    counts = runs(server)
    # Retention ran after each run: never more than --keep-last 2 in the repository.
    assert counts[:2] == [1, 2] and all(n == 2 for n in counts[2:]), counts
    # No overlap: each run's backup started only after the previous one was stored.
    events = re.findall(r"backup of \S+ started|scheduled backup of \S+ stored", server.log())
    pair = ["backup of app started", "scheduled backup of app stored"]
    assert events[: 2 * len(counts)] == pair * len(counts)
    kept = repo.open().backups()
    assert len(kept) == 2 and all(m.encrypted == bool(repo.s3) for m in kept)
    restorer = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        for manifest in kept:
            with sqlite3.connect(sqlite_db) as conn:
                conn.execute("DELETE FROM progress")
            assert sqlite_content(sqlite_db) != expected
            result = cli(
                repo, restorer, "restore", f"{repo.url}/{manifest.name}", "--yes", "-i", str(key)
            )
            assert result.returncode == 0, result.stderr
            assert sqlite_content(sqlite_db) == expected
    finally:
        restorer.stop()

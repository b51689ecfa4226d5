"""Structured logs with a request id per call, and Prometheus metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from conftest import PASSWORD
from helpers import Server, frames, raw_restore, start_server

from safehold.client import Client
from safehold.v1 import backup_service_pb2_grpc as pb_grpc


def test_json_logs_carry_the_request_id_and_metrics_count_calls(
    tmp_path: Path, metered: tuple[Server, str]
) -> None:
    server, url = metered
    with Client(server.target, PASSWORD) as client:
        backup = client.backup(tmp_path / "b.sqlite")
    with server.channel() as channel:
        call = pb_grpc.BackupServiceStub(channel).Restore(
            iter(frames(backup.path.read_bytes())),
            metadata=(*server.metadata(), ("x-request-id", "restore-from-test-42")),
        )
        responses = list(call)
        assert responses[-1].WhichOneof("frame") == "result"
        assert ("x-request-id", "restore-from-test-42") in call.initial_metadata()
    _, err = raw_restore(server, frames(b"not a backup"))
    assert err is not None

    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    restore_lines = [e["message"] for e in lines if e["request_id"] == "restore-from-test-42"]
    assert any("restore phase RESTORING" in m for m in restore_lines)
    assert any("restore finished" in m for m in restore_lines)
    backup_ids = {e["request_id"] for e in lines if "backup of" in e["message"]}
    assert len(backup_ids) == 1 and "-" not in backup_ids
    finished = next(e for e in lines if "backup of" in e["message"] and "finished" in e["message"])
    assert (finished["bytes"], finished["sha256"]) == (backup.size_bytes, backup.sha256)

    scrape = urllib.request.urlopen(url, timeout=10).read()
    metrics = scrape.decode()
    assert 'safehold_operations_finished_total{operation="backup"} 1.0' in metrics
    assert 'safehold_operations_finished_total{operation="restore"} 1.0' in metrics
    assert (
        'safehold_operations_failed_total{operation="restore",reason="NOT_A_BACKUP"} 1.0' in metrics
    )
    assert f'safehold_bytes_total{{operation="backup"}} {float(backup.size_bytes)}' in metrics


def test_text_logs_carry_the_request_id_and_metrics_are_off_by_default(
    tmp_path: Path, sqlite_db: Path
) -> None:
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        with Client(server.target, PASSWORD) as client:
            client.server_info()
            client.backup(tmp_path / "b.sqlite")
        assert "metrics on" not in server.log()
        assert re.search(
            r"INFO \[[0-9a-f]{16}\] safehold.server.servicer: backup of app started", server.log()
        )
    finally:
        server.stop()

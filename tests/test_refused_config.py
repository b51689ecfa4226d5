"""Configuration that cannot work is refused at start, with one clear line,
through `safehold serve` as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PASSWORD, PgDatabase
from helpers import SAFEHOLD, run_cli, start_server

from safehold.client import Client


def refused(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `safehold serve` expecting a refusal; its one error line."""
    environ = {
        **os.environ,
        "SAFEHOLD_DATA_DIR": str(tmp_path / "data"),
        "SAFEHOLD_LISTEN": "127.0.0.1:0",
        **(env or {}),
    }
    result = run_cli("serve", *args, env=environ, timeout=30)
    lines = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_password_in_database_url_flag_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, "--database-url", "postgresql://app:hunter2@127.0.0.1:5432/app")
    assert "cannot start: --database-url carries a password" in line
    assert "SAFEHOLD_DATABASE_URL" in line
    assert "hunter2" not in line


def test_password_in_database_url_variable_is_allowed(tmp_path: Path, pg_db: PgDatabase) -> None:
    url = pg_db.url.replace("@", f":{pg_db.password.replace('%', '%25')}@", 1)
    url = url.replace(" ", "%20").replace('"', "%22")
    server = start_server(tmp_path, url, PASSWORD, env={"SAFEHOLD_PASSWORD": ""})
    try:
        with Client(server.target, PASSWORD) as client:
            assert client.server_info().engine == "PostgreSQL"
    finally:
        server.stop()


def test_empty_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "password"
    empty.write_text("\n")
    line = refused(tmp_path, "--password-file", str(empty))
    assert line.endswith(
        f"cannot start: password file {empty} is empty: callers could not authenticate"
    )


def test_password_gRPC_metadata_cannot_carry_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, env={"SAFEHOLD_PASSWORD": "pässwörd"})
    assert "gRPC metadata cannot carry" in line and "choose an ASCII password" in line
    assert "pässwörd" not in line


def test_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("not read: the key is refused first\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    line = refused(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    assert line.endswith(
        f"cannot start: TLS key {key} is readable by every user (mode 644): run chmod 600 {key}"
    )


def test_all_interfaces_without_tls_is_warned_about(tmp_path: Path) -> None:
    """0.0.0.0 in a network namespace of its own, whose only interface is loopback."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace of its own needs root (CI runs as root)")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--net", "--", SAFEHOLD, "serve", "--listen", "0.0.0.0:0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SAFEHOLD_DATA_DIR": str(tmp_path / "data")},
        )
    try:
        deadline = time.monotonic() + 20
        while "listening on 0.0.0.0:0" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "WARNING" in log.read_text()
        assert "listening on all interfaces without TLS" in log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_plaintext_health_port_off_loopback_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, "--health-listen", "192.0.2.1:50052")
    assert line.endswith(
        "cannot start: --health-listen 192.0.2.1:50052 must be a loopback address such as "
        "127.0.0.1:50052: it is served without TLS"
    )

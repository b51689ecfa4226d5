"""Another language calls safehold from the .proto alone: Node.js with @grpc/grpc-js."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from conftest import PASSWORD
from helpers import Server, sqlite_content, start_server

from safehold.repository import open_repository

ROOT = Path(__file__).resolve().parent.parent


def test_node_client_takes_a_verified_backup(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed: scripts/install-system-deps installs it"
    dest = tmp_path / "from-node.sqlite"
    result = subprocess.run(
        [node, str(ROOT / "examples" / "node" / "backup.mjs"), str(dest)],
        env=sqlite_server.client_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "ENGINE_SQLITE"
    assert report["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert sqlite_content(dest) == sqlite_content(sqlite_db)


def test_node_client_reports_a_wrong_password(sqlite_server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "never.sqlite"
    result = subprocess.run(
        ["node", str(ROOT / "examples" / "node" / "backup.mjs"), str(dest)],
        env={**sqlite_server.client_env(), "SAFEHOLD_PASSWORD": "wrong"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr
    assert not dest.exists() and not Path(f"{dest}.partial").exists()


def node_repository(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(ROOT / "examples" / "node" / "repository.mjs"), *args],
        env=server.client_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_node_client_drives_the_servers_repository(tmp_path: Path, sqlite_db: Path) -> None:
    repository = tmp_path / "repo"
    server = start_server(
        tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--repository", str(repository)
    )
    try:
        made = [node_repository(server, "backup-now") for _ in range(3)]
        assert all(r.returncode == 0 for r in made), [r.stderr for r in made]
        entries = [json.loads(r.stdout)["backup"] for r in made]
        assert [json.loads(r.stdout)["backups_in_repository"] for r in made] == [1, 2, 3]
        listed = node_repository(server, "list", "2")
        assert listed.returncode == 0, listed.stderr
        report = json.loads(listed.stdout)
    finally:
        server.stop()
    assert report["pages"] == 2
    stored = open_repository(str(repository)).backups()
    assert [b["name"] for b in report["backups"]] == [m.name for m in stored]
    assert [b["name"] for b in report["backups"]] == [e["name"] for e in reversed(entries)]
    for backup, manifest in zip(report["backups"], stored, strict=True):
        assert backup["sha256"] == manifest.sha256
        assert backup["size_bytes"] == (repository / manifest.name).stat().st_size
        assert backup["engine"] == "ENGINE_SQLITE"


def test_node_client_sees_a_server_without_repository(sqlite_server: Server) -> None:
    result = node_repository(sqlite_server, "list")
    assert result.returncode == 1
    assert "FAILED_PRECONDITION" in result.stderr and "--repository" in result.stderr

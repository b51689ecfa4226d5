"""Another language calls safehold from the .proto alone: Node.js with @grpc/grpc-js."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from helpers import Server, sqlite_content

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

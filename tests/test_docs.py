"""Every recipe in the docs, run as written.

A fenced block right after an `<!-- doc-test: NAME -->` comment is a test: this
module reads it from the Markdown, so a changed doc is a changed test. The
blocks run in bash (`-e`, as an operator pastes them) in a fresh directory, with
the environment the doc says the operator has: PGHOST/PGPORT and a passfile for
the PostgreSQL tools, SAFEHOLD_TARGET and the password for safehold, the venv's
`safehold` on PATH. The PostgreSQL roles are ordinary: `app` owns its database
and has neither CREATEDB nor superuser.
"""

from __future__ import annotations

import hashlib
import os
import pty
import re
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import make_sqlite_db
from helpers import Server, sqlite_content, start_server
from pg import Cluster, cluster
from test_tls import make_pki

ROOT = Path(__file__).resolve().parent.parent
APP_PASSWORD = "app's password"
ADMIN_PASSWORD = "admin password"
_BLOCK = re.compile(r"<!-- doc-test: ([\w-]+) -->\n```\w*\n(.*?)\n```", re.DOTALL)


def doc_block(doc: str, name: str) -> str:
    """The fenced block marked `<!-- doc-test: name -->` in doc (relative to the repo)."""
    blocks: dict[str, str] = dict(_BLOCK.findall((ROOT / doc).read_text()))
    assert name in blocks, f"{doc} has no block marked doc-test: {name}"
    return blocks[name]


def test_every_marked_block_is_run_by_a_test() -> None:
    """A block marked in a doc but named by no test here would ship untested."""
    source = Path(__file__).read_text()
    for doc in ("README.md", "docs/operations.md", "docs/disaster-recovery.md"):
        for name, _ in _BLOCK.findall((ROOT / doc).read_text()):
            assert f'"{name}"' in source, f"{doc}: block {name} is run by no test"


@dataclass
class Shell:
    """Where and with what environment the blocks run."""

    cwd: Path
    env: dict[str, str]

    def run(self, block: str, *, typed: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run block in bash -e; with typed, stdin is a terminal those keys were typed on."""
        main = replica = None
        if typed is not None:
            main, replica = pty.openpty()
            os.write(main, typed)
        try:
            return subprocess.run(
                ["bash", "-e", "-c", block],
                cwd=self.cwd,
                env=self.env,
                stdin=replica if replica is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            for fd in (main, replica):
                if fd is not None:
                    os.close(fd)


def _path() -> str:
    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"


@pytest.fixture(scope="module")
def doc_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster of its own, so that the docs' role and database names (app) are free."""
    with cluster() as running:
        with running.connect() as db:
            db.execute(f"ALTER ROLE postgres PASSWORD '{ADMIN_PASSWORD}'")
        running.superuser_password = ADMIN_PASSWORD
        yield running


def _new_app_database(pg: Cluster, name: str = "app") -> None:
    """Role app (ordinary) owning database name; drops what an earlier test left."""
    with pg.connect() as db:
        db.execute(f"DROP DATABASE IF EXISTS {name}")
        if db.execute("SELECT 1 FROM pg_roles WHERE rolname = 'app'").fetchone() is None:
            pg.create_role("app", APP_PASSWORD)
    pg.create_database(name, "app")


def _app(pg: Cluster, dbname: str = "app") -> psycopg.Connection[tuple[object, ...]]:
    return pg.connect(dbname, "app", APP_PASSWORD)


def _shell(tmp_path: Path, pg: Cluster | None = None, server: Server | None = None) -> Shell:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {"PATH": _path(), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    if pg:
        passfile = tmp_path / "pgpass"
        passfile.write_text(
            f"127.0.0.1:{pg.port}:*:app:{APP_PASSWORD}\n"
            f"127.0.0.1:{pg.port}:*:postgres:{ADMIN_PASSWORD}\n"
        )
        passfile.chmod(0o600)
        env.update(PGHOST="127.0.0.1", PGPORT=str(pg.port), PGPASSFILE=str(passfile))
    if server:
        env.update(SAFEHOLD_TARGET=server.target, SAFEHOLD_PASSWORD=server.password)
    return Shell(work, env)


def _pg_server(tmp_path: Path, pg: Cluster) -> Server:
    return start_server(tmp_path, f"postgresql://app@127.0.0.1:{pg.port}/app", APP_PASSWORD)


def _games(pg: Cluster, dbname: str = "app") -> list[tuple[object, ...]]:
    with _app(pg, dbname) as db:
        return db.execute("SELECT id, title FROM games ORDER BY id").fetchall()


def _seed(pg: Cluster) -> None:
    _new_app_database(pg)
    with _app(pg) as db:
        db.execute(
            "CREATE TABLE games (id int PRIMARY KEY, title text);"
            "INSERT INTO games VALUES (1, 'Celeste'), (2, 'Hades');"
        )


def _safehold_backup(shell: Shell, name: str) -> Path:
    result = shell.run(shlex.join(["safehold", "backup", "-o", name]))
    assert result.returncode == 0, result.stderr
    return shell.cwd / name


def test_restore_through_safehold(doc_cluster: Cluster, tmp_path: Path) -> None:
    _seed(doc_cluster)
    server = _pg_server(tmp_path, doc_cluster)
    try:
        shell = _shell(tmp_path, doc_cluster, server)
        result = shell.run(
            doc_block("docs/disaster-recovery.md", "restore-through-safehold"), typed=b"y\n"
        )
        assert result.returncode == 0, result.stderr
        assert f"location:      postgresql app@127.0.0.1:{doc_cluster.port}/app" in result.stdout
        assert "restored" in result.stdout and "pre-restore" in result.stdout
        assert (shell.cwd / "backups" / "app.dump.manifest.json").exists()
    finally:
        server.stop()
    assert _games(doc_cluster) == [(1, "Celeste"), (2, "Hades")]


def test_check_digest(doc_cluster: Cluster, tmp_path: Path) -> None:
    _seed(doc_cluster)
    server = _pg_server(tmp_path, doc_cluster)
    try:
        shell = _shell(tmp_path, doc_cluster, server)
        dump = _safehold_backup(shell, "app.dump")
    finally:
        server.stop()
    result = shell.run(doc_block("docs/disaster-recovery.md", "check-digest"))
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()
    assert result.stdout.count(digest) == 2, result.stdout


def test_new_database_on_a_new_server(doc_cluster: Cluster, tmp_path: Path) -> None:
    """The backup grants to a role the new server does not have; app may not CREATEDB."""
    _seed(doc_cluster)
    with doc_cluster.connect("app") as db:
        db.execute("DROP ROLE IF EXISTS reporting; CREATE ROLE reporting")
        db.execute("GRANT SELECT ON games TO reporting")
    server = _pg_server(tmp_path, doc_cluster)
    try:
        _safehold_backup(_shell(tmp_path, doc_cluster, server), "app.dump")
    finally:
        server.stop()
    with cluster() as new_server:
        with new_server.connect() as db:
            db.execute(f"ALTER ROLE postgres PASSWORD '{ADMIN_PASSWORD}'")
        new_server.superuser_password = ADMIN_PASSWORD
        new_server.create_role("app", APP_PASSWORD)
        result = _shell(tmp_path, new_server).run(
            doc_block("docs/disaster-recovery.md", "new-database")
        )
        assert result.returncode == 0, result.stderr
        assert _games(new_server, "app_restored") == [(1, "Celeste"), (2, "Hades")]
        with new_server.connect("app_restored") as db:
            owner = db.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'games'")
            assert owner.fetchone() == ("app",)


def test_replace_a_live_database_by_hand_as_its_owner(doc_cluster: Cluster, tmp_path: Path) -> None:
    _seed(doc_cluster)
    server = _pg_server(tmp_path, doc_cluster)
    try:
        shell = _shell(tmp_path, doc_cluster, server)
        _safehold_backup(shell, "app.dump")
    finally:
        server.stop()
    with _app(doc_cluster) as db:
        db.execute("DELETE FROM games WHERE id = 1; CREATE TABLE leftover (x int)")
    result = shell.run(doc_block("docs/disaster-recovery.md", "replace-live"))
    assert result.returncode == 0, result.stderr
    assert _games(doc_cluster) == [(1, "Celeste"), (2, "Hades")]
    with _app(doc_cluster) as db:
        assert db.execute("SELECT to_regclass('public.leftover')").fetchone() == (None,)
        owner = db.execute(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"
        )
        assert owner.fetchone() == ("pg_database_owner",)


def test_sqlite_by_hand(tmp_path: Path) -> None:
    shell = _shell(tmp_path)
    backup = make_sqlite_db(shell.cwd / "app.sqlite")
    live = make_sqlite_db(shell.cwd / "live.sqlite")
    with sqlite3.connect(live) as db:
        db.execute("DELETE FROM games")
    result = shell.run(doc_block("docs/disaster-recovery.md", "sqlite-by-hand"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "ok"
    assert sqlite_content(live) == sqlite_content(backup)


def test_cron_line(tmp_path: Path, sqlite_server: Server) -> None:
    line = doc_block("docs/operations.md", "cron")
    fields = line.split(None, 5)
    assert len(fields) == 6 and all(re.fullmatch(r"[\d*,/-]+", f) for f in fields[:5]), line
    command = fields[5]
    # What cron gives a job: HOME, a PATH, /bin/sh, no terminal; and where the server is.
    env = {"HOME": str(tmp_path), "PATH": _path(), "SHELL": "/bin/sh"}
    env["SAFEHOLD_TARGET"] = sqlite_server.target
    (tmp_path / "backups").mkdir()

    def cron() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-c", command],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    missing = cron()
    assert missing.returncode == 1 and "password file" in missing.stderr
    secret = tmp_path / ".config" / "safehold" / "password"
    secret.parent.mkdir(parents=True)
    secret.write_text(sqlite_server.password + "\n")
    secret.chmod(0o600)
    result = cron()
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "backups").glob("*.sqlite"))) == 1


@pytest.mark.parametrize("name", ["tls", "mtls"])
def test_tls_commands(name: str, tmp_path: Path, sqlite_db: Path) -> None:
    shell = _shell(tmp_path)
    make_pki(shell.cwd)
    serve, *clients = doc_block("docs/operations.md", name).splitlines()
    argv = shlex.split(serve)
    assert argv[:2] == ["safehold", "serve"]
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", "pw", *argv[2:], cwd=shell.cwd)
    try:
        shell.env.update(SAFEHOLD_TARGET=server.target, SAFEHOLD_PASSWORD="pw")
        for line in clients:
            result = shell.run(line)
            assert result.returncode == 0, (line, result.stderr)
        plaintext = shell.run("safehold info --connect-timeout 2")
        assert plaintext.returncode == 1 and "speaks TLS" in plaintext.stderr
    finally:
        server.stop()


def test_gamevault_env_file(doc_cluster: Cluster, tmp_path: Path) -> None:
    """README's gamevault.env, with db:5432 (compose's service) pointed at the test cluster."""
    values = dict(
        line.split("=", 1) for line in doc_block("README.md", "gamevault-env").splitlines()
    )
    assert "DB_SYSTEM" not in values  # GameVault's default, and the case that went wrong
    with doc_cluster.connect() as db:
        db.execute(f"DROP DATABASE IF EXISTS {values['DB_DATABASE']}")
        db.execute(f"DROP ROLE IF EXISTS {values['DB_USERNAME']}")
    doc_cluster.create_role(values["DB_USERNAME"], values["DB_PASSWORD"])
    doc_cluster.create_database(values["DB_DATABASE"], values["DB_USERNAME"])
    env = {**values, "DB_HOST": "127.0.0.1", "DB_PORT": str(doc_cluster.port)}
    server = start_server(tmp_path, "", values["DB_PASSWORD"], env={**env, "SAFEHOLD_PASSWORD": ""})
    try:
        location = (
            f"postgresql {values['DB_USERNAME']}@127.0.0.1:{doc_cluster.port}/"
            f"{values['DB_DATABASE']}"
        )
        assert f"database {location}" in server.log()
        shell = _shell(tmp_path, server=server)
        info = shell.run("safehold info")
        assert info.returncode == 0 and f"location:      {location}" in info.stdout
        assert _safehold_backup(shell, "gv.dump").read_bytes().startswith(b"PGDMP")
        assert not (server.data_dir / "safehold.sqlite").exists()
    finally:
        server.stop()


def test_quickstart_on_the_embedded_default(tmp_path: Path) -> None:
    """README's first steps: `safehold serve` with nothing configured, in a fresh HOME."""
    home = {"HOME": str(tmp_path), "XDG_DATA_HOME": "", "SAFEHOLD_DATA_DIR": ""}
    server = start_server(tmp_path, "", "", env={**home, "SAFEHOLD_PASSWORD": ""})
    server.password = (tmp_path / ".local/share/safehold/password").read_text().strip()
    try:
        shell = _shell(tmp_path)
        (shell.cwd / ".venv").symlink_to(Path(sys.executable).parent.parent)
        shell.env.update(SAFEHOLD_TARGET=server.target)
        result = shell.run(doc_block("README.md", "quickstart"), typed=b"y\n")
        assert result.returncode == 0, result.stderr
        embedded = tmp_path / ".local/share/safehold/safehold.sqlite"
        assert f"location:      sqlite {embedded}" in result.stdout
        assert "restored" in result.stdout
    finally:
        server.stop()


def test_client_library_snippet(tmp_path: Path, sqlite_server: Server) -> None:
    shell = _shell(tmp_path, server=sqlite_server)
    secret = tmp_path / "password"
    secret.write_text(sqlite_server.password)
    del shell.env["SAFEHOLD_PASSWORD"]
    shell.env["SAFEHOLD_PASSWORD_FILE"] = str(secret)
    (shell.cwd / "backups").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", doc_block("README.md", "library")],
        cwd=shell.cwd,
        env=shell.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "PRE_RESTORE_BACKUP" in result.stdout and "Progress(phase='BACKUP'" in result.stdout
    assert len(list((shell.cwd / "backups").glob("*.sqlite"))) == 1

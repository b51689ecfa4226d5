"""A throwaway PostgreSQL cluster: initdb as an unprivileged OS user,
scram-sha-256 password auth, a private socket dir and a free loopback port."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql


def bin_dir() -> Path:
    """Where initdb and postgres are: PATH, or the newest Debian-style install."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries: run scripts/install-system-deps")
    return Path(candidates[-1]).parent


def _os_user() -> pwd.struct_passwd | None:
    """initdb refuses root: run the cluster as `postgres` (or nobody) when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    port: int
    superuser_password: str
    process: subprocess.Popen[bytes]

    def connect(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            dbname=dbname,
            password=password or self.superuser_password,
            autocommit=True,
        )

    def create_role(self, name: str, password: str) -> None:
        with self.connect() as db:
            db.execute(
                sql.SQL(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}"
                ).format(sql.Identifier(name), sql.Literal(password))
            )

    def create_database(self, name: str, owner: str) -> None:
        with self.connect() as db:
            db.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(owner)
                )
            )

    def env(self) -> dict[str, str]:
        """Environment for running pg tools against the cluster as the superuser."""
        return {
            **os.environ,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGPASSWORD": self.superuser_password,
        }

    def dump(self, dbname: str, dest: Path, *flags: str, env: dict[str, str] | None = None) -> Path:
        """Run pg_dump outside safehold, as an operator or GameVault would."""
        subprocess.run(
            ["pg_dump", *flags, "-f", str(dest), dbname], env=env or self.env(), check=True
        )
        return dest

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def cluster(bindir: Path | None = None) -> Iterator[Cluster]:
    """A running cluster of bindir's PostgreSQL (default: bin_dir())."""
    user = _os_user()
    root = Path(tempfile.mkdtemp(prefix="safehold-pg-"))
    password = secrets.token_urlsafe(24)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if user:
        for path in (root, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
    as_user: dict[str, Any] = (
        {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    )
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
    bindir = bindir or bin_dir()
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
        **as_user,
    )
    pwfile.unlink()
    port = free_port()
    log = open(root / "postgres.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(root / "data"),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=100",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
        **as_user,
    )
    running = Cluster(root, port, password, process)
    deadline = time.monotonic() + 30
    while True:
        try:
            running.connect().close()
            break
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "postgres.log").read_text()) from None
            time.sleep(0.1)
    try:
        yield running
    finally:
        running.stop()
        log.close()

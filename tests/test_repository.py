"""Repositories as a user runs them: the same suite against a directory and against a
real S3-protocol server on loopback (moto), through the `safehold` command."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pyrage
import pytest
from conftest import new_pg_database
from fake_server import Script, fake_server
from helpers import Server, run_cli, sqlite_content
from pg import Cluster
from s3server import S3Server, s3_server

from safehold.repository import Artefact, Policy, Repository, crypto, open_repository
from safehold.v1 import backup_service_pb2 as pb

_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(str(tmp_path_factory.mktemp("moto") / "moto.log")) as server:
        yield server


@dataclass
class Repo:
    """A repository under test, and ways to look at it behind the product's back."""

    url: str
    env: dict[str, str]
    s3: S3Server | None = None
    bucket: str = ""

    def open(self) -> Repository:
        return open_repository(self.url)

    def visible(self) -> list[str]:
        """Every object and pending upload there is, hidden or not, without the prefix."""
        if self.s3:
            keys = self.s3.keys(self.bucket) + self.s3.multipart_uploads(self.bucket)
            return sorted(key.removeprefix("nightly/") for key in keys)
        return sorted(p.name for p in Path(self.url).iterdir())

    def corrupt(self, name: str, offset: int) -> None:
        """Flip one byte of a stored object."""
        if self.s3:
            key = f"nightly/{name}"
            client = self.s3.client()
            data = bytearray(client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            data[offset] ^= 0x01
            client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
            return
        path = Path(self.url) / name
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.fixture(params=["directory", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repo:
    if request.param == "directory":
        path = tmp_path / "repo"
        path.mkdir()
        return Repo(str(path), {})
    s3: S3Server = request.getfixturevalue("s3")
    bucket = f"backups-{next(_buckets)}"
    s3.client().create_bucket(Bucket=bucket)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return Repo(f"s3://{bucket}/nightly", s3.env, s3, bucket)


def cli(repo: Repo, server: Server | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**(server.client_env() if server else os.environ), **repo.env}
    return run_cli(*args, env=env)


def next_second() -> None:
    """Wait (at most a second) for the clock's next second: the server names a backup
    by the second it was taken, and `backup -o DIR/` writes that name as it is."""
    start = int(time.time())
    deadline = time.monotonic() + 2
    while int(time.time()) == start and time.monotonic() < deadline:
        time.sleep(0.01)


def listed(repo: Repo) -> list[dict[str, object]]:
    result = cli(repo, None, "list", repo.url, "--json")
    assert result.returncode == 0, result.stderr
    backups: list[dict[str, object]] = json.loads(result.stdout)
    return backups


def add_row(db: Path, title: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO games (title) VALUES (?)", (title,))


def test_backup_list_restore_latest_and_by_name(
    repo: Repo, sqlite_server: Server, sqlite_db: Path
) -> None:
    first_content = sqlite_content(sqlite_db)
    assert cli(repo, sqlite_server, "backup", "-o", repo.url).returncode == 0
    add_row(sqlite_db, "second")
    next_second()
    second_content = sqlite_content(sqlite_db)
    backup = cli(repo, sqlite_server, "backup", "-o", repo.url)
    assert backup.returncode == 0, backup.stderr
    assert f"saved to {repo.url}/" in backup.stdout

    backups = listed(repo)
    assert len(backups) == 2
    newest, oldest = backups
    assert str(newest["created_at"]) > str(oldest["created_at"])
    assert newest["database_name"] == "app" and newest["encryption"] == "none"

    add_row(sqlite_db, "after the backups")
    latest = cli(repo, sqlite_server, "restore", repo.url, "--latest", "--yes")
    assert latest.returncode == 0, latest.stderr
    assert sqlite_content(sqlite_db) == second_content

    by_name = cli(repo, sqlite_server, "restore", f"{repo.url}/{oldest['name']}", "--yes")
    assert by_name.returncode == 0, by_name.stderr
    assert sqlite_content(sqlite_db) == first_content


def write_at(
    repository: Repository,
    data: bytes,
    stamp: str,
    dump_format: str = "DUMP_FORMAT_SQLITE_FILE",
    recipient: str | None = None,
) -> str:
    """A backup of data in repository, as if taken at stamp (UTC)."""
    created = datetime.fromisoformat(stamp).replace(tzinfo=UTC)
    artefact = Artefact(
        engine="SQLite" if dump_format == "DUMP_FORMAT_SQLITE_FILE" else "PostgreSQL",
        engine_version="3",
        dump_format=dump_format,
        database_name="app",
        created_at=created,
        safehold_version="test",
        suggested_name=f"app-{created:%Y%m%dT%H%M%SZ}.sqlite",
    )
    recipients = [crypto.parse_recipient(recipient)] if recipient else []
    return repository.write(artefact, BytesIO(data), recipients).name


def test_prune_keeps_what_the_policy_says_and_removes_incomplete(
    repo: Repo, sqlite_db: Path
) -> None:
    repository = repo.open()
    data = sqlite_db.read_bytes()
    stamps = ["2026-01-01T10:00", "2026-01-01T11:00", "2026-01-02T09:00", "2026-02-03T09:00"]
    names = [write_at(repository, data, s) for s in stamps]
    with repository.store.create("app-interrupted.sqlite") as out:
        out.write(b"half a backup")
    assert "app-interrupted.sqlite" not in [b["name"] for b in listed(repo)]

    dry = cli(repo, None, "prune", repo.url, "--keep-daily", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"keep   2026-02-03 09:00:00Z  {names[3]}  (daily backup)" in dry.stdout
    assert f"remove 2026-01-01 11:00:00Z  {names[1]}" in dry.stdout
    # just written, so perhaps a backup still in progress
    assert "keep   app-interrupted.sqlite  (no manifest yet" in dry.stdout
    assert len(listed(repo)) == 4 and "app-interrupted.sqlite" in repo.visible()

    pruned = cli(repo, None, "prune", repo.url, "--keep-daily", "2", "--keep-monthly", "2")
    assert pruned.returncode == 0, pruned.stderr
    kept = {str(b["name"]) for b in listed(repo)}
    # daily: 02-03 and 01-02; monthly: 02-03 and January's newest, 01-02
    assert kept == {names[3], names[2]}
    objects = [*kept, *(f"{n}.manifest.json" for n in kept)]
    assert repo.visible() == sorted([*objects, "app-interrupted.sqlite"])

    # Two hours on, it is an interrupted backup: removed, whatever the policy keeps.
    later = datetime.now(UTC) + timedelta(hours=2)
    plan = repository.plan_prune(Policy(last=-1), now=later)
    assert plan.incomplete == ["app-interrupted.sqlite"] and plan.remove == []
    repository.prune(plan)
    assert repo.visible() == sorted(objects)


def test_verify_finds_a_changed_byte_and_restore_refuses_it(
    repo: Repo, sqlite_server: Server, sqlite_db: Path
) -> None:
    assert cli(repo, sqlite_server, "backup", "-o", repo.url).returncode == 0
    name = str(listed(repo)[0]["name"])
    ok = cli(repo, None, "verify", repo.url, "--all", "--deep")
    assert ok.returncode == 0, ok.stderr
    assert "integrity_check passed" in ok.stdout

    repo.corrupt(name, 200_000)
    damaged = cli(repo, None, "verify", f"{repo.url}/{name}")
    assert damaged.returncode == 1
    assert f"DAMAGED {name}" in damaged.stderr

    add_row(sqlite_db, "must survive")
    before = sqlite_content(sqlite_db)
    restore = cli(repo, sqlite_server, "restore", f"{repo.url}/{name}", "--yes")
    assert restore.returncode == 1
    assert "damaged" in restore.stderr and "VERIFICATION_FAILED" in restore.stderr
    assert sqlite_content(sqlite_db) == before
    assert "restore finished" not in sqlite_server.log()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
@pytest.mark.parametrize("fault", ["wrong_trailer", "break_off"])
def test_a_failed_backup_leaves_nothing_visible(
    repo: Repo, tmp_path: Path, fault: str, encrypted: bool
) -> None:
    # 20 MiB: more than two multipart parts, so an S3 upload was under way. It starts as
    # the SQLite file the manifest announces, so only the stream's end can refuse it.
    data = b"SQLite format 3\x00" + os.urandom(20 * 1024 * 1024)
    script = Script(data=data, **{fault: True})  # type: ignore[arg-type]
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    with fake_server(script) as fake:
        env = {**repo.env, "SAFEHOLD_TARGET": fake.target, "SAFEHOLD_PASSWORD": "x"}
        args = ["backup", "-o", repo.url] + (["--recipient", recipient] if encrypted else [])
        result = run_cli(*args, env={**os.environ, **env})
    assert result.returncode == 1
    expected = "trailer does not match" if fault == "wrong_trailer" else "breaks off"
    assert expected in result.stderr
    assert repo.visible() == []


def make_age_key(tmp_path: Path, name: str = "key.txt") -> tuple[str, Path]:
    identity = pyrage.x25519.Identity.generate()
    path = tmp_path / name
    path.write_text(f"# a test key\n{identity}\n")
    path.chmod(0o600)
    return str(identity.to_public()), path


def make_ssh_key(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key)], check=True
    )
    return key.with_suffix(".pub"), key


@pytest.mark.parametrize("kind", ["age", "ssh"])
def test_encrypted_round_trip(
    repo: Repo, sqlite_server: Server, sqlite_db: Path, tmp_path: Path, kind: str
) -> None:
    if kind == "age":
        recipient, identity = make_age_key(tmp_path)
        encrypt = ["--recipient", recipient]
    else:
        public, identity = make_ssh_key(tmp_path)
        encrypt = ["--recipients-file", str(public)]
    original = sqlite_content(sqlite_db)
    backup = cli(repo, sqlite_server, "backup", "-o", repo.url, *encrypt)
    assert backup.returncode == 0, backup.stderr
    (entry,) = listed(repo)
    assert entry["encryption"] == "age" and str(entry["name"]).endswith(".age")
    with repo.open().store.open(str(entry["name"])) as stored:
        assert stored.read(22) == b"age-encryption.org/v1\n"

    verify = cli(repo, None, "verify", repo.url, "--all", "--deep", "-i", str(identity))
    assert verify.returncode == 0, verify.stderr
    add_row(sqlite_db, "gone after restore")
    restore = cli(
        repo, sqlite_server, "restore", repo.url, "--latest", "--yes", "-i", str(identity)
    )
    assert restore.returncode == 0, restore.stderr
    assert sqlite_content(sqlite_db) == original


def test_wrong_identity_fails_before_any_byte_reaches_the_server(
    repo: Repo, sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    recipient, _ = make_age_key(tmp_path, "right.txt")
    _, wrong = make_age_key(tmp_path, "wrong.txt")
    assert cli(repo, sqlite_server, "backup", "-o", repo.url, "-r", recipient).returncode == 0
    add_row(sqlite_db, "must survive")
    before = sqlite_content(sqlite_db)

    restore = cli(repo, sqlite_server, "restore", repo.url, "--latest", "--yes", "-i", str(wrong))

    assert restore.returncode == 1
    assert "cannot decrypt" in restore.stderr and "DECRYPTION_FAILED" in restore.stderr
    assert "restore started" not in sqlite_server.log()
    assert sqlite_content(sqlite_db) == before


def test_changed_byte_in_encrypted_backup_fails_verify_and_never_restores(
    repo: Repo, sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    recipient, identity = make_age_key(tmp_path)
    assert cli(repo, sqlite_server, "backup", "-o", repo.url, "-r", recipient).returncode == 0
    name = str(listed(repo)[0]["name"])
    repo.corrupt(name, 150_000)
    add_row(sqlite_db, "must survive")
    before = sqlite_content(sqlite_db)

    verify = cli(repo, None, "verify", f"{repo.url}/{name}")
    assert verify.returncode == 1 and f"DAMAGED {name}" in verify.stderr
    restore = cli(
        repo, sqlite_server, "restore", f"{repo.url}/{name}", "--yes", "-i", str(identity)
    )
    assert restore.returncode == 1
    assert sqlite_content(sqlite_db) == before
    assert "restore finished" not in sqlite_server.log()


def test_engine_check_works_on_encrypted_backups(
    repo: Repo, sqlite_server: Server, tmp_path: Path
) -> None:
    recipient, identity = make_age_key(tmp_path)
    assert cli(repo, sqlite_server, "backup", "-o", repo.url, "-r", recipient).returncode == 0
    with fake_server(Script(data=b"", engine=pb.ENGINE_POSTGRESQL)) as fake:
        env = {**os.environ, **repo.env, "SAFEHOLD_TARGET": fake.target, "SAFEHOLD_PASSWORD": "x"}
        args = ["restore", repo.url, "--latest", "--yes", "-i", str(identity)]
        result = run_cli(*args, env=env)
        assert fake.servicer.restores == 0
    assert result.returncode == 1
    assert "is a SQLite backup but the server's database is PostgreSQL" in result.stderr


def test_plaintext_that_differs_from_the_manifest_is_never_restored(
    repo: Repo, sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    """age authenticates what it decrypts; the manifest's SHA-256 of the plaintext is
    checked too, so that a backup that is not the one the manifest describes (the
    recipients' keys are public: anyone may encrypt to them) is refused at its end."""
    recipient, identity = make_age_key(tmp_path)
    assert cli(repo, sqlite_server, "backup", "-o", repo.url, "-r", recipient).returncode == 0
    repository = repo.open()
    manifest = repository.latest()
    forged = replace(manifest, sha256=hashlib.sha256(b"another backup").hexdigest())
    repository.store.delete(f"{manifest.name}.manifest.json")
    with repository.store.create(f"{manifest.name}.manifest.json") as out:
        out.write(forged.to_json())
    add_row(sqlite_db, "must survive")
    before = sqlite_content(sqlite_db)

    restore = cli(
        repo, sqlite_server, "restore", repo.url, "--latest", "--yes", "-i", str(identity)
    )

    assert restore.returncode == 1
    assert "decrypted backup" in restore.stderr and "VERIFICATION_FAILED" in restore.stderr
    assert sqlite_content(sqlite_db) == before
    assert "restore finished" not in sqlite_server.log()


def damaged_sqlite(good: bytes) -> bytes:
    """The file with its third page overwritten: the header still says SQLite."""
    page = 4096
    return good[: 2 * page] + bytes(range(256)) * (page // 256) + good[3 * page :]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_deep_verify_has_the_engine_read_the_backup(
    engine: str, tmp_path: Path, sqlite_db: Path, pg_cluster: Cluster
) -> None:
    """A backup that matches its manifest but that the engine cannot read passes the plain
    verify and fails --deep, which touches no database."""
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    repository = open_repository(str(repo_dir))
    if engine == "sqlite":
        good = sqlite_db.read_bytes()
        bad = damaged_sqlite(good)
        dump_format, expected = "DUMP_FORMAT_SQLITE_FILE", "integrity_check passed"
    else:
        db = new_pg_database(pg_cluster)
        db.execute("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        good = pg_cluster.dump(db.name, tmp_path / "app.dump", "-Fc").read_bytes()
        bad = good[: len(good) * 2 // 3]  # the table of contents is whole, the data is not
        dump_format, expected = "DUMP_FORMAT_PG_CUSTOM", "full pg_restore read passed"
    recipient, identity = make_age_key(tmp_path)
    for stamp, data in (("2026-01-01T10:00", good), ("2026-01-01T11:00", bad)):
        write_at(repository, data, stamp, dump_format, recipient)
    good_name, bad_name = (m.name for m in sorted(repository.backups(), key=lambda m: m.created_at))
    repo = Repo(str(repo_dir), {})

    plain = cli(repo, None, "verify", str(repo_dir), "--all")
    assert plain.returncode == 0, plain.stderr
    ok = cli(repo, None, "verify", str(repo_dir / good_name), "--deep", "-i", str(identity))
    assert ok.returncode == 0, ok.stderr
    assert expected in ok.stdout
    deep = cli(repo, None, "verify", str(repo_dir / bad_name), "--deep", "-i", str(identity))
    assert deep.returncode == 1
    assert f"DAMAGED {bad_name}" in deep.stderr


def test_unreachable_s3_is_one_clear_line_without_secrets(tmp_path: Path) -> None:
    """Connection errors are retried, then reported as STORAGE_FAILED; the secret key
    given in the environment appears nowhere."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket is closed
    secret = "a-secret-key-that-must-not-show"
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
    }
    result = run_cli("list", "s3://backups/app", env=env)
    assert result.returncode == 1
    assert "STORAGE_FAILED" in result.stderr and len(result.stderr.splitlines()) == 1
    assert secret not in result.stderr + result.stdout


def test_a_bad_recipient_is_refused_before_the_backup(
    repo: Repo, sqlite_server: Server, tmp_path: Path
) -> None:
    result = cli(repo, sqlite_server, "backup", "-o", repo.url, "--recipient", "age1notakey")
    assert result.returncode == 1 and "BAD_KEY" in result.stderr
    assert "backup of" not in sqlite_server.log()
    assert repo.visible() == []


def test_an_unreadable_manifest_is_named(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    (repo_dir / "app-1.sqlite").write_bytes(b"SQLite format 3\x00")
    (repo_dir / "app-1.sqlite.manifest.json").write_text('{"engine": "SQLite"}')
    result = run_cli("list", str(repo_dir), env=dict(os.environ))
    assert result.returncode == 1
    assert "app-1.sqlite.manifest.json is not a readable manifest" in result.stderr
    assert "BAD_MANIFEST" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_bad_identity_file_is_named_not_quoted(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    recipient, _ = make_age_key(tmp_path)
    write_at(
        open_repository(str(repo_dir)),
        b"SQLite format 3\x00",
        "2026-01-01T10:00",
        recipient=recipient,
    )
    broken = tmp_path / "broken.txt"
    secret = "AGE-SECRET-KEY-1NOTAVALIDKEYBUTSECRETSTILL"
    broken.write_text(secret + "\n")
    result = run_cli(
        "verify", str(repo_dir), "--all", "--deep", "-i", str(broken), env=dict(os.environ)
    )
    assert result.returncode == 1 and "BAD_KEY" in result.stderr
    assert str(broken) in result.stderr and secret not in result.stderr

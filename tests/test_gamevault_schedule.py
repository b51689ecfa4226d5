"""README's GameVault compose example with scheduled backups, run as written: the
safehold service's environment (GameVault's DB_* plus the SAFEHOLD_* and AWS_* lines)
given to `safehold serve`, a loopback S3 server standing in for MinIO, a real
PostgreSQL database. Only the MinIO endpoint and the metrics address change (loopback)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pyrage
import pytest
import yaml
from conftest import PgDatabase
from helpers import Server, start_server
from s3server import S3Server, s3_server
from test_schedule import Webhook, wait_for

from safehold.repository import Artefact, Policy, open_repository, plan

README = Path(__file__).resolve().parent.parent / "README.md"


def block(name: str) -> str:
    found = re.search(
        rf"<!-- {name}: .*? -->\n\n```yaml\n(.*?)```\n\n<!-- end {name} -->",
        README.read_text(),
        re.S,
    )
    assert found, f"the README lost its {name} block"
    return found.group(1)


@pytest.fixture(scope="module")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(str(tmp_path_factory.mktemp("moto") / "moto.log")) as server:
        yield server


def compose_environment(substitutions: dict[str, str]) -> dict[str, str]:
    """The safehold service's environment, with ${VAR} from substitutions (.env)."""
    service = yaml.safe_load(block("scheduled-compose"))["services"]["safehold"]
    return {
        key: re.sub(r"\$\{(\w+)\}", lambda m: substitutions[m.group(1)], str(value))
        for key, value in service["environment"].items()
    }


def test_nightly_encrypted_backups_in_minio_keep_7_daily_4_weekly_6_monthly(
    minio: S3Server, pg_db: PgDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = pyrage.x25519.Identity.generate()
    webhook = Webhook()
    dot_env = {
        "MINIO_ROOT_USER": minio.env["AWS_ACCESS_KEY_ID"],
        "MINIO_ROOT_PASSWORD": minio.env["AWS_SECRET_ACCESS_KEY"],
        "BACKUP_AGE_RECIPIENT": str(identity.to_public()),
        "BACKUP_WEBHOOK_URL": webhook.url,
    }
    env = compose_environment(dot_env)
    assert env["SAFEHOLD_SCHEDULE"] == "0 3 * * *"
    env |= {"AWS_ENDPOINT_URL": minio.endpoint, "SAFEHOLD_METRICS_LISTEN": "127.0.0.1:0"}
    gamevault_env = {
        "SAFEHOLD_PASSWORD": "",
        "DB_SYSTEM": "POSTGRESQL",
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(pg_db.cluster.port),
        "DB_USERNAME": pg_db.role,
        "DB_PASSWORD": pg_db.password,
        "DB_DATABASE": pg_db.name,
    }
    bucket = env["SAFEHOLD_REPOSITORY"].removeprefix("s3://").split("/")[0]
    minio.client().create_bucket(Bucket=bucket)  # what the minio-bucket service does
    pg_db.execute("CREATE TABLE games (id int PRIMARY KEY, title text)")

    # A year of earlier nights, the last one two days ago: the server catches up at start.
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    repository = open_repository(env["SAFEHOLD_REPOSITORY"])
    now = datetime.now(UTC).replace(hour=3, minute=0, second=0, microsecond=0)
    for days in [*range(2, 14), *range(14, 365, 5)]:
        taken = now - timedelta(days=days)
        repository.write(
            Artefact(
                engine="PostgreSQL",
                engine_version="15",
                dump_format="DUMP_FORMAT_PG_CUSTOM",
                database_name=pg_db.name,
                created_at=taken,
                safehold_version="earlier",
                suggested_name=f"{pg_db.name}-{taken:%Y%m%dT%H%M%SZ}.dump",
            ),
            BytesIO(b"PGDMP earlier"),
        )

    before = repository.backups()
    server = start_server(tmp_path, "", pg_db.password, env={**gamevault_env, **env})
    try:
        wait_for(lambda: "scheduled backup of" in server.log(), "the catch-up run", timeout=60)
        assert "stored" in server.log() and "FAILED" not in server.log()
        assert_alert_metric_exported(server)
    finally:
        server.stop()
        webhook.server.shutdown()

    backups = repository.backups()
    newest = backups[0]
    assert newest.safehold_version != "earlier" and newest.encrypted
    with repository.open_plaintext(newest, [identity]) as plain:
        assert plain.read(5) == b"PGDMP"
    # Exactly what the policy keeps of everything there was, the new backup included.
    decisions = plan([newest, *before], Policy(daily=7, weekly=4, monthly=6))
    assert [m.name for m in backups] == [d.manifest.name for d in decisions if d.keep]
    assert len(backups) < len(before)


def assert_alert_metric_exported(server: Server) -> None:
    """The README's alert rule names a metric the server serves."""
    rule = yaml.safe_load(block("alert-rule"))["groups"][0]["rules"][0]
    metric_name = re.search(r"safehold_\w+", rule["expr"])
    assert metric_name
    port = re.search(r"metrics on \S+ \(port (\d+)\)", server.log())
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=5) as r:
        text = r.read().decode()
    value = re.search(rf"^{metric_name.group(0)} (\S+)$", text, re.M)
    assert value and float(value.group(1)) > datetime.now(UTC).timestamp() - 3600

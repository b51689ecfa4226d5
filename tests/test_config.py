"""Configuration: flags over SAFEHOLD_* over GameVault's DB_*; secrets never as flags."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest
from helpers import run_cli

from safehold.server import config
from safehold.server.config import ConfigError, PostgresTarget, SqliteTarget


def load(argv: list[str], env: dict[str, str]) -> config.Config:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    config.add_arguments(parser)
    return config.load(parser.parse_args(argv), env)


def test_embedded_default_generates_a_private_password(tmp_path: Path) -> None:
    env = {"SAFEHOLD_DATA_DIR": str(tmp_path)}
    first = load([], env)
    assert first.target == SqliteTarget(tmp_path / "safehold.sqlite")
    assert stat.S_IMODE((tmp_path / "password").stat().st_mode) == 0o600
    assert load([], env).password == first.password
    assert first.password not in repr(first)


def test_flag_beats_env_beats_gamevault(tmp_path: Path) -> None:
    env = {
        "SAFEHOLD_DATA_DIR": str(tmp_path),
        "SAFEHOLD_DATABASE_URL": "sqlite:///from/env.sqlite",
        "DB_SYSTEM": "POSTGRESQL",
        "DB_PASSWORD": "gv",
    }
    assert load(["--database-url", "sqlite:///flag.sqlite"], env).target == SqliteTarget(
        Path("/flag.sqlite")
    )
    assert load([], env).target == SqliteTarget(Path("/from/env.sqlite"))


def test_gamevault_variables(tmp_path: Path) -> None:
    env = {
        "SAFEHOLD_DATA_DIR": str(tmp_path),
        "DB_SYSTEM": "POSTGRESQL",
        "DB_HOST": "db",
        "DB_PORT": "5433",
        "DB_USERNAME": "gamevault",
        "DB_PASSWORD": "s3cret",
        "DB_DATABASE": "gamevault",
    }
    cfg = load([], env)
    assert cfg.target == PostgresTarget("db", 5433, "gamevault", "gamevault")
    assert cfg.password == "s3cret"
    sqlite = load(
        [],
        {"SAFEHOLD_DATA_DIR": str(tmp_path), "DB_SYSTEM": "SQLITE", "VOLUMES_SQLITEDB": "/gv/db"},
    )
    assert sqlite.target == SqliteTarget(Path("/gv/db/database.sqlite"))


def test_database_name_is_literal() -> None:
    target, password = config.parse_database_url(
        "postgresql://app:p%40ss@127.0.0.1:5432/host%3D%2Fnonexistent%20dbname%3Dother"
    )
    assert target == PostgresTarget("127.0.0.1", 5432, "app", "host=/nonexistent dbname=other")
    assert password == "p@ss"


def test_password_file_and_no_password_flag(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    env = {
        "SAFEHOLD_DATA_DIR": str(tmp_path),
        "SAFEHOLD_DATABASE_URL": "postgresql://app@127.0.0.1/app",
    }
    assert load(["--password-file", str(secret)], env).password == "from-file"
    with pytest.raises(ConfigError, match="no database password"):
        load([], env)
    refused = run_cli("serve", "--password", "secret", env={**os.environ, **env})
    assert refused.returncode == 2 and "unrecognized arguments: --password" in refused.stderr


@pytest.mark.parametrize(
    "url", ["mysql://x/y", "sqlite://", "postgresql://127.0.0.1/db", "postgresql://u@h:notaport/db"]
)
def test_bad_urls_say_what_to_fix(url: str) -> None:
    with pytest.raises(ConfigError):
        config.parse_database_url(url)


def test_stall_timeout_and_its_upload_idle_alias(tmp_path: Path) -> None:
    env = {"SAFEHOLD_DATA_DIR": str(tmp_path)}
    assert load([], env).stall_timeout_seconds == 60
    assert load(["--stall-timeout", "5"], env).stall_timeout_seconds == 5
    assert load(["--upload-idle-timeout", "7"], env).stall_timeout_seconds == 7
    assert load([], {**env, "SAFEHOLD_STALL_TIMEOUT": "9"}).stall_timeout_seconds == 9
    assert load([], {**env, "SAFEHOLD_UPLOAD_IDLE_TIMEOUT": "11"}).stall_timeout_seconds == 11
    with pytest.raises(ConfigError, match="stall timeout must not be negative"):
        load(["--stall-timeout", "-1"], env)


def test_gamevault_defaults_are_gamevaults(tmp_path: Path) -> None:
    base = {"SAFEHOLD_DATA_DIR": str(tmp_path)}
    assert load([], {**base, "DB_HOST": "db"}).target == PostgresTarget(
        "db", 5432, "default", "gamevault"
    )
    assert load([], {**base, "DB_PASSWORD": "pw"}).password == "pw"
    assert load([], {**base, "DB_SYSTEM": "sqlite"}).target == SqliteTarget(
        Path("/db/database.sqlite")
    )
    assert load([], base).target == SqliteTarget(tmp_path / "safehold.sqlite")
    with pytest.raises(ConfigError, match="DB_SYSTEM must be"):
        load([], {**base, "DB_SYSTEM": "mysql"})


def test_a_database_url_uses_no_db_value(tmp_path: Path) -> None:
    env = {
        "SAFEHOLD_DATA_DIR": str(tmp_path),
        "SAFEHOLD_DATABASE_URL": "postgresql://app@127.0.0.1/app",
        "DB_PASSWORD": "gamevaults-password",
        "DB_HOST": "elsewhere",
    }
    with pytest.raises(ConfigError, match="no database password"):
        load([], env)
    assert load([], {**env, "SAFEHOLD_PASSWORD": "own"}).password == "own"

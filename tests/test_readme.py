"""The README's repository commands, run as written against a SQLite server and a
loopback S3 server standing in for the README's MinIO."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from helpers import SAFEHOLD, Server, sqlite_content
from s3server import s3_server

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(
    r"<!-- repository-commands: run by tests/test_readme.py -->\n"
    r"(.*?)<!-- end repository-commands -->",
    re.DOTALL,
)


def readme_commands() -> list[str]:
    match = _BLOCK.search(README.read_text())
    assert match, "the README lost its repository commands block"
    lines = [line.strip() for line in match.group(1).splitlines() if line.strip()]
    return [line.split("  #")[0].strip() for line in lines]


def test_readme_repository_commands_run_as_written(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    commands = readme_commands()
    exports = [c for c in commands if c.startswith("export ")]
    with s3_server(str(tmp_path / "moto.log")) as s3:
        s3.client().create_bucket(Bucket="backups")
        exported = {word.split("=")[0] for c in exports for word in shlex.split(c)[1:]}
        assert exported == set(s3.env), "the README's MinIO variables are not the ones used"
        env = {**sqlite_server.client_env(), **s3.env}
        original = sqlite_content(sqlite_db)
        outputs: dict[str, str] = {}
        for command in commands:
            if command.startswith("export "):
                continue
            argv = shlex.split(command)
            if argv[0] == ".venv/bin/safehold":
                argv[0] = SAFEHOLD
            result = subprocess.run(
                argv,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, f"{command}: {result.stderr}"
            outputs[argv[1]] = result.stdout
        assert len(s3.keys("backups")) == 4  # two encrypted backups and their manifests
    assert sqlite_content(sqlite_db) == original
    listed = outputs["list"].splitlines()
    assert len(listed) == 2 and all(" age " in line for line in listed)
    assert outputs["verify"].count("integrity_check passed") == 2
    assert "dry run: nothing removed" in outputs["prune"]
    assert "restored" in outputs["restore"]

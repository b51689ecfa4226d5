"""docs/benchmarks.md's commands run: bench/bench.py, at a tiny size and with every
option the docs show, produces every row. It asserts no timing: a benchmark is not a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_as_documented_and_writes_its_rows(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n\n<!-- results -->\n\nold results\n")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--engines",
            "sqlite,postgresql",
            "--sizes-mb",
            "1",
            "--reps",
            "1",
            "--time-limit-seconds",
            "300",
            "--write",
            str(doc),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n<!-- results -->") and "old results" not in text
    for row in (
        "| SQLite 1 MB backup",
        "| SQLite 1 MB restore",
        "| SQLite 1 MB: 4 backups at once",
        "| PostgreSQL 1 MB backup, compression level 0",
        "| PostgreSQL 1 MB backup (",
        "| PostgreSQL 1 MB restore",
    ):
        assert row in text, row
    assert "pre-restore backup" in text and "CPU server" in text

"""Benchmark safehold against the engines' own tools, side by side in one run.

For each engine and size it builds a database (indexes, text and binary
columns, incompressible data), then alternates the engine's own tool and
safehold through gRPC on loopback (the client writing a real file), and
reports times, ratios, time to first chunk and peak RSS of the server and of
the client, each measured in its own process. Writes docs/benchmarks.md.

    .venv/bin/python bench/bench.py --engines sqlite,postgresql --sizes-mb 100,500
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import Server, start_server  # noqa: E402
from pg import Cluster, cluster  # noqa: E402
from s3server import s3_server  # noqa: E402

PASSWORD = "bench password with spaces"
MIB = 1024 * 1024
TIME_LIMIT_SECONDS = 3600
"""Every loop below stops by this wall-clock budget, whatever the sizes asked."""


@dataclass
class Row:
    """One operation measured: the engine's tool against safehold."""

    name: str
    native: list[float] = field(default_factory=list)
    safehold: list[float] = field(default_factory=list)
    server_mib: float = 0.0
    client_mib: float = 0.0
    first_chunk_ms: float | None = None
    bytes: int = 0
    note: str = ""

    def ratio(self) -> float:
        """safehold's speed as a fraction of the tool's (above 1: faster)."""
        return _mean(self.native) / _mean(self.safehold)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_client(
    server: Server, *args: str, env: dict[str, str] | None = None
) -> tuple[dict[str, object], float]:
    """bench/client_run.py in its own process: its JSON report and peak RSS in MiB."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "client_run.py"), *args],
        env={**server.client_env(), **(env or {})},
        stdout=subprocess.PIPE,
        check=True,
    )
    report = json.loads(result.stdout)
    return report, int(report["peak_rss_kib"]) / 1024


def server_peak_mib(server: Server) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_server_peak(server: Server) -> None:
    """Linux resets VmHWM when 5 is written to clear_refs."""
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")


def fill_rows(
    insert: Callable[[list[tuple[str, str, bytes]]], None],
    size: Callable[[], int],
    target: int,
    deadline: float,
) -> None:
    """Insert batches of rows (an indexed name, text, random bytes) until size() >= target."""
    n = 0
    while size() < target and time.monotonic() < deadline:
        batch = []
        for _ in range(2000):
            n += 1
            text = base64.b64encode(os.urandom(300)).decode()
            batch.append((f"item {n:09d} ✓", text, os.urandom(600)))
        insert(batch)


def build_sqlite(path: Path, size: int, deadline: float) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, body TEXT, data BLOB)")
        db.execute("CREATE INDEX items_name ON items (name)")

        def insert(batch: list[tuple[str, str, bytes]]) -> None:
            db.executemany("INSERT INTO items (name, body, data) VALUES (?, ?, ?)", batch)
            db.commit()

        fill_rows(insert, lambda: path.stat().st_size, size, deadline)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def build_postgres(pg: Cluster, dbname: str, size: int, deadline: float) -> None:
    with pg.connect(dbname, "bench", PASSWORD) as db:
        db.execute(
            "CREATE TABLE items (id bigserial PRIMARY KEY, name text, body text, data bytea)"
        )

        def insert(batch: list[tuple[str, str, bytes]]) -> None:
            with db.cursor().copy("COPY items (name, body, data) FROM STDIN") as copy:
                for row in batch:
                    copy.write_row(row)

        def db_size() -> int:
            row = db.execute("SELECT pg_database_size(current_database())").fetchone()
            return int(row[0]) if row else 0

        fill_rows(insert, db_size, size, deadline)
        db.execute("CREATE INDEX items_name ON items (name)")
        db.execute("VACUUM ANALYZE items")


def bench_engine(
    label: str,
    *,
    server: Server,
    work: Path,
    reps: int,
    native_backup: Callable[[Path], None],
    native_restore: Callable[[Path], None],
) -> list[Row]:
    backup = Row(f"{label} backup")
    restore = Row(f"{label} restore")
    archive = work / "native.out"
    for rep in range(reps):
        order = ["native", "safehold"] if rep % 2 == 0 else ["safehold", "native"]
        for who in order:
            out = work / f"{who}-{rep}.out"
            if who == "native":
                backup.native.append(timed(lambda out=out: native_backup(out)))  # type: ignore[misc]
                out.replace(archive)
                continue
            reset_server_peak(server)
            report, client_mib = run_client(server, "backup", str(out))
            backup.safehold.append(float(report["seconds"]))  # type: ignore[arg-type]
            backup.server_mib = max(backup.server_mib, server_peak_mib(server))
            backup.client_mib = max(backup.client_mib, client_mib)
            backup.bytes = int(report["bytes"])  # type: ignore[call-overload]
            out.unlink()
    for rep in range(reps):
        order = ["native", "safehold"] if rep % 2 == 0 else ["safehold", "native"]
        for who in order:
            if who == "native":
                restore.native.append(timed(lambda: native_restore(archive)))
                continue
            reset_server_peak(server)
            report, client_mib = run_client(server, "restore", str(archive))
            phases: dict[str, float] = report["phases"]  # type: ignore[assignment]
            restoring = phases["DONE"] - phases["RESTORING"]
            restore.safehold.append(restoring)
            pre = phases["RESTORING"] - phases["PRE_RESTORE_BACKUP"]
            restore.note = (
                f"whole call {float(report['seconds']):.1f}s "  # type: ignore[arg-type]
                f"(upload+verify {phases['PRE_RESTORE_BACKUP']:.1f}s, "
                f"pre-restore backup {pre:.1f}s)"
            )
            restore.server_mib = max(restore.server_mib, server_peak_mib(server))
            restore.client_mib = max(restore.client_mib, client_mib)
            restore.bytes = archive.stat().st_size
    return [backup, restore]


def compression_rows(server: Server, work: Path, env: dict[str, str], size: int) -> list[Row]:
    """pg_dump's compression level against time and size, tool and safehold alike."""
    rows = []
    for level in (0, 1, 6):
        row = Row(f"PostgreSQL {size // MIB} MB backup, compression level {level}")
        out = work / f"level-{level}.out"
        row.native.append(
            timed(
                lambda out=out, level=level: subprocess.run(  # type: ignore[misc]
                    ["pg_dump", "-Fc", f"-Z{level}", "-f", str(out)], env=env, check=True
                )
            )
        )
        reset_server_peak(server)
        report, row.client_mib = run_client(
            server, "backup", str(out), "--compression-level", str(level)
        )
        row.safehold.append(float(report["seconds"]))  # type: ignore[arg-type]
        row.server_mib = server_peak_mib(server)
        row.bytes = int(report["bytes"])  # type: ignore[call-overload]
        row.note = f"archive {row.bytes / MIB:.0f} MiB"
        out.unlink()
        rows.append(row)
    return rows


def first_chunk_ms(server: Server, work: Path) -> float:
    report, _ = run_client(server, "backup", str(work / "small.out"))
    phases: dict[str, float] = report["phases"]  # type: ignore[assignment]
    (work / "small.out").unlink()
    return phases["BACKUP"] * 1000


def sqlite_rows(size: int, reps: int, work: Path, deadline: float) -> list[Row]:
    live = work / "live.sqlite"
    build_sqlite(live, size, deadline)
    server = start_server(work, f"sqlite:///{live}", PASSWORD)
    try:

        def native_backup(out: Path) -> None:
            with sqlite3.connect(live) as src, sqlite3.connect(out) as dst:
                src.backup(dst)

        def native_restore(archive: Path) -> None:
            with sqlite3.connect(archive) as src, sqlite3.connect(live) as dst:
                src.backup(dst)

        return bench_engine(
            f"SQLite {size // MIB} MB",
            server=server,
            work=work,
            reps=reps,
            native_backup=native_backup,
            native_restore=native_restore,
        )
    finally:
        server.stop()


def postgres_rows(pg: Cluster, size: int, reps: int, work: Path, deadline: float) -> list[Row]:
    dbname = f"bench_{size // MIB}"
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{dbname}" OWNER bench')
    build_postgres(pg, dbname, size, deadline)
    env = {**pg.env(), "PGUSER": "bench", "PGPASSWORD": PASSWORD, "PGDATABASE": dbname}
    server = start_server(work, f"postgresql://bench@127.0.0.1:{pg.port}/{dbname}", PASSWORD)
    restores = iter(range(1000))
    try:

        def native_backup(out: Path) -> None:
            subprocess.run(["pg_dump", "-Fc", "-f", str(out)], env=env, check=True)

        def native_restore(archive: Path) -> None:
            target = f"{dbname}_native_{next(restores)}"
            with pg.connect() as admin:
                admin.execute(f'CREATE DATABASE "{target}" OWNER bench')
            subprocess.run(
                [
                    "pg_restore",
                    "--single-transaction",
                    "--exit-on-error",
                    "-d",
                    target,
                    str(archive),
                ],
                env=env,
                check=True,
            )
            with pg.connect() as admin:
                admin.execute(f'DROP DATABASE "{target}"')

        rows = compression_rows(server, work, env, size)
        return rows + bench_engine(
            f"PostgreSQL {size // MIB} MB",
            server=server,
            work=work,
            reps=reps,
            native_backup=native_backup,
            native_restore=native_restore,
        )
    finally:
        server.stop()


def small_first_chunk(engine: str, pg: Cluster | None, work: Path) -> float:
    if engine == "sqlite":
        db = work / "small.sqlite"
        build_sqlite(db, MIB, time.monotonic() + 60)
        server = start_server(work, f"sqlite:///{db}", PASSWORD)
    else:
        assert pg is not None
        with pg.connect() as admin:
            admin.execute('CREATE DATABASE "bench_small" OWNER bench')
        build_postgres(pg, "bench_small", MIB, time.monotonic() + 60)
        server = start_server(work, f"postgresql://bench@127.0.0.1:{pg.port}/bench_small", PASSWORD)
    try:
        run_client(server, "backup", str(work / "warmup.out"))
        return min(first_chunk_ms(server, work) for _ in range(3))
    finally:
        server.stop()


def s3_report(size: int, work: Path, deadline: float) -> str:
    """A SQLite database of size streamed into S3 (moto on loopback) and restored from it,
    plain and age-encrypted: time and the client's peak RSS, which the multipart part
    size and parts in flight bound, not the backup's size."""
    import pyrage

    from safehold.repository.s3 import PART_SIZE, PARTS_IN_FLIGHT

    live = work / "live.sqlite"
    build_sqlite(live, size, deadline)
    identity = pyrage.x25519.Identity.generate()
    key = work / "key.txt"
    key.write_text(f"{identity}\n")
    lines = [
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {machine()}; "
        f"part size {PART_SIZE // MIB} MiB, {PARTS_IN_FLIGHT} parts in flight.",
        "",
        "| operation | MiB | seconds | MiB/s | client peak RSS | server peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    server = start_server(work, f"sqlite:///{live}", PASSWORD)
    try:
        with s3_server(str(work / "moto.log")) as s3:
            s3.client().create_bucket(Bucket="bench")
            public = ["--recipient", str(identity.to_public())]
            runs = [
                ("backup into S3", "backup-to", "s3://bench/plain", []),
                ("restore --latest from S3", "restore-latest", "s3://bench/plain", []),
                ("backup into S3, age", "backup-to", "s3://bench/age", public),
                (
                    "restore --latest, age",
                    "restore-latest",
                    "s3://bench/age",
                    ["--identity", str(key)],
                ),
            ]
            for label, op, url, extra in runs:
                reset_server_peak(server)
                report, client_mib = run_client(server, op, url, *extra, env=s3.env)
                seconds = float(report["seconds"])  # type: ignore[arg-type]
                mib = int(report["bytes"]) / MIB  # type: ignore[call-overload]
                lines.append(
                    f"| {label} | {mib:.0f} | {seconds:.1f} | {mib / seconds:.0f} | "
                    f"{client_mib:.0f} MiB | {server_peak_mib(server):.0f} MiB |"
                )
    finally:
        server.stop()
    return "\n".join(lines)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    pg = subprocess.run(
        ["pg_dump", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {pg}"
    )


def render(rows: list[Row], first_chunks: dict[str, float], command: str) -> str:
    lines = [
        "| operation | engine's tool (s) | safehold (s) | safehold speed / tool | "
        "server peak RSS | client peak RSS | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} ({row.bytes / MIB:.0f} MiB moved) | "
            f"{' / '.join(f'{t:.2f}' for t in row.native)} | "
            f"{' / '.join(f'{t:.2f}' for t in row.safehold)} | {row.ratio():.2f} | "
            f"{row.server_mib:.0f} MiB | {row.client_mib:.0f} MiB | {row.note} |"
        )
    chunks = ", ".join(f"{engine}: {ms:.0f} ms" for engine, ms in first_chunks.items())
    return "\n".join(
        [
            f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {machine()}.",
            "",
            f"Command: `{command}`",
            "",
            *lines,
            "",
            f"Time from the call to the first chunk, small database (best of 3): {chunks}.",
            "",
            "Times per repetition, tool and safehold alternating. For restores, the safehold "
            "time is its RESTORING phase (the replace itself); the notes give the whole call "
            "with upload, verification and the pre-restore backup. Backups: the tool is "
            "`pg_dump -Fc` to a file or SQLite's online backup API to a file; restores: "
            "`pg_restore --single-transaction` into an empty database, or the backup API "
            "into the live file.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--sizes-mb", default="100")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    parser.add_argument(
        "--s3-mb",
        type=int,
        help="instead: stream a SQLite database of this size into S3 (moto) and back",
    )
    args = parser.parse_args()
    if args.s3_mb:
        with tempfile.TemporaryDirectory(prefix="safehold-bench-") as tmp:
            print(s3_report(args.s3_mb * MIB, Path(tmp), time.monotonic() + TIME_LIMIT_SECONDS))
        return
    engines = args.engines.split(",")
    sizes = [int(s) * MIB for s in args.sizes_mb.split(",")]
    deadline = time.monotonic() + TIME_LIMIT_SECONDS
    rows: list[Row] = []
    first_chunks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="safehold-bench-") as tmp:
        work = Path(tmp)
        if "sqlite" in engines:
            for size in sizes:
                rows += sqlite_rows(size, args.reps, _fresh(work, f"sqlite-{size}"), deadline)
            first_chunks["SQLite"] = small_first_chunk("sqlite", None, _fresh(work, "sq-small"))
        if "postgresql" in engines:
            with cluster() as pg:
                pg.create_role("bench", PASSWORD)
                for size in sizes:
                    rows += postgres_rows(pg, size, args.reps, _fresh(work, f"pg-{size}"), deadline)
                first_chunks["PostgreSQL"] = small_first_chunk(
                    "postgresql", pg, _fresh(work, "pg-small")
                )
    command = "python bench/bench.py " + " ".join(sys.argv[1:])
    report = render(rows, first_chunks, command)
    print(report)
    if args.write:
        args.write.write_text(
            args.write.read_text().split("<!-- results -->")[0]
            + "<!-- results -->\n\n"
            + report
            + "\n"
        )


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    path.mkdir()
    return path


if __name__ == "__main__":
    main()

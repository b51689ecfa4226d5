"""One safehold client call, timed from inside, for bench.py.

Runs as its own process so that its peak RSS is its own, apart from
everything else. Prints one JSON line: seconds, time to first chunk, and
for a restore when each phase began.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from safehold.client import Client, Progress
from safehold.repository import crypto, open_repository


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["backup", "restore", "backup-to", "restore-latest"])
    parser.add_argument("path", help="a file, or for backup-to/restore-latest a repository")
    parser.add_argument("--compression-level", type=int)
    parser.add_argument("--recipient", action="append", default=[])
    parser.add_argument("--identity", type=Path, action="append", default=[])
    args = parser.parse_args()
    phases: dict[str, float] = {}
    started = time.perf_counter()

    def on_progress(progress: Progress) -> None:
        phases.setdefault(progress.phase, time.perf_counter() - started)

    with Client(os.environ["SAFEHOLD_TARGET"], os.environ["SAFEHOLD_PASSWORD"]) as client:
        if args.op == "backup":
            result = client.backup(
                args.path, compression_level=args.compression_level, on_progress=on_progress
            )
            size = result.size_bytes
        elif args.op == "backup-to":
            recipients = crypto.load_recipients(args.recipient, [])
            manifest = client.backup_to(
                open_repository(args.path), recipients=recipients, on_progress=on_progress
            )
            size = manifest.size_bytes
        elif args.op == "restore-latest":
            repository = open_repository(args.path)
            identities = crypto.load_identities(args.identity)
            size = client.restore_backup(
                repository, repository.latest(), identities=identities, on_progress=on_progress
            ).bytes_restored
        else:
            size = client.restore(args.path, on_progress=on_progress).bytes_restored
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "bytes": size,
                "phases": phases,
                "peak_rss_kib": _peak_rss_kib(),
            }
        )
    )


def _peak_rss_kib() -> int:
    """This process's own high-water RSS. (wait4's ru_maxrss would also count the
    parent's memory at fork, before exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    main()

"""Which compression pg_dump uses when the caller does not choose, chosen on purpose.

pg_dump's own default (gzip level 6, `-Fc`) spends most of a backup's time in
zlib: on a 1 GB database with incompressible columns level 1 was measured
1.8x faster for 2% more bytes (docs/benchmarks.md). So:

- the default backup is zstd level 1 where pg_dump has it (16 and later, when
  built with zstd), generally faster than gzip 1 at about gzip 6's ratio (not
  measured on this project's machines, which have pg_dump 15); else gzip level 1;
- the pre-restore backup, which the operator waits for before every restore and
  which never leaves this host, is lz4 where pg_dump has it, else not
  compressed at all: at 1 GB 7-9 s against 27-30 s for gzip 1, for 1.5x the
  bytes (docs/benchmarks.md has the numbers and what it costs on disk);
- a level the caller asks for (0-9) is passed on exactly as `--compress=N`,
  which every pg_dump reads as gzip at that level (0: none).

Whether this pg_dump was built with lz4 or zstd is asked of pg_dump itself,
once: it validates `--compress` before it connects, so a probe with no
connection settings fails on the method or on the connection, and only the
first means "not here".
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from safehold.server.engines.postgres.archive import major_of
from safehold.server.engines.postgres.tools import Tools, offline_env

METHODS_SINCE = (16, 0)
"""The first pg_dump whose custom format takes lz4 and zstd."""
GZIP_FAST = "1"
UNCOMPRESSED = "0"


@dataclass(frozen=True)
class Compression:
    """`--compress` values for the default backup and for the pre-restore backup."""

    default: str
    pre_restore: str


def choose(pg_dump_version: str, methods: frozenset[str]) -> Compression:
    """The compression for a pg_dump of this version that supports these methods."""
    newer = major_of(pg_dump_version) >= METHODS_SINCE
    return Compression(
        default="zstd:1" if newer and "zstd" in methods else GZIP_FAST,
        pre_restore="lz4" if newer and "lz4" in methods else UNCOMPRESSED,
    )


def for_tools(tools: Tools) -> Compression:
    """The compression this server's pg_dump should use."""
    version = tools.versions["pg_dump"]
    if major_of(version) < METHODS_SINCE:
        return choose(version, frozenset())
    return choose(version, frozenset(m for m in ("lz4", "zstd") if _supports(tools, m)))


def _supports(tools: Tools, method: str) -> bool:
    """Ask pg_dump whether it was built with method. It has no server to reach
    (offline_env points nowhere), so it stops at the compression check or at
    the connection; the message says which."""
    env = {**offline_env(), "PGHOST": "/nonexistent", "PGCONNECT_TIMEOUT": "1"}
    argv = tools.argv("pg_dump", "--format=custom", f"--compress={method}", "--file=/dev/null")
    result = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
    return method not in result.stderr.decode("utf-8", "replace").lower()

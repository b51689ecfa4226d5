"""Which S3 library to stream backups with: boto3 (through safehold's multipart writer)
against obstore, each uploading the same stream to a loopback S3 server (moto) in its
own process, with the same part size and parts in flight.

    .venv/bin/python bench/s3_libraries.py --mb 256

Prints one Markdown table row per library: seconds, MiB/s, peak RSS of the process.
obstore is not a dependency of safehold: install it by hand to run this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from s3server import s3_server  # noqa: E402

MIB = 1024 * 1024
PART = 8 * MIB
IN_FLIGHT = 2


def _chunks(total_mb: int) -> Iterator[bytes]:
    """total_mb MiB of incompressible bytes in 1 MiB chunks, as gRPC would deliver them."""
    block = os.urandom(MIB)
    for _ in range(total_mb):
        yield block


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def upload(library: str, bucket: str, total_mb: int) -> None:
    """Runs in the child: one upload, then a JSON line of seconds and peak RSS."""
    started = time.perf_counter()
    if library == "boto3":
        from safehold.repository.s3 import S3Store

        store = S3Store(f"s3://{bucket}/bench", part_size=PART, parts_in_flight=IN_FLIGHT)
        with store.create("boto3.bin") as out:
            for chunk in _chunks(total_mb):
                out.write(chunk)
    else:
        import obstore
        from obstore.store import S3Store as ObjectStore

        object_store = ObjectStore(
            bucket,
            endpoint=os.environ["AWS_ENDPOINT_URL"],
            region=os.environ["AWS_REGION"],
            client_options={"allow_http": True},
        )
        obstore.put(
            object_store,
            "bench/obstore.bin",
            _chunks(total_mb),
            chunk_size=PART,
            max_concurrency=IN_FLIGHT,
        )
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_kib": _peak_kib()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "BUCKET"))
    args = parser.parse_args()
    if args.child:
        upload(args.child[0], args.child[1], args.mb)
        return
    with tempfile.TemporaryDirectory() as tmp, s3_server(f"{tmp}/moto.log") as s3:
        s3.client().create_bucket(Bucket="bench")
        print(f"| library | {args.mb} MiB upload | MiB/s | peak RSS |")
        print("|---|---|---|---|")
        for library in ("boto3", "obstore"):
            result = subprocess.run(
                [sys.executable, __file__, "--mb", str(args.mb), "--child", library, "bench"],
                env={**os.environ, **s3.env},
                stdout=subprocess.PIPE,
                check=True,
            )
            report = json.loads(result.stdout)
            seconds = float(report["seconds"])
            print(
                f"| {library} | {seconds:.1f} s | {args.mb / seconds:.0f} | "
                f"{int(report['peak_kib']) / 1024:.0f} MiB |"
            )


if __name__ == "__main__":
    main()

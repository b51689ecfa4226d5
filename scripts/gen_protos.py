"""Regenerate the Python stubs (and their .pyi type stubs) and
docs/proto-reference.md from protos/.

Run with `--check` to fail when the committed stubs or reference differ from
what protos/ produces, so a contract change can never ship with stale code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from proto_reference import render

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client"
PACKAGE = Path("safehold") / "v1"
REFERENCE = ROOT / "docs" / "proto-reference.md"


def generate(out: Path) -> None:
    """Write the stubs for every .proto under protos/ into out/safehold/v1."""
    bin_dir = Path(sys.executable).parent
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *_sources(),
        ],
        check=True,
        cwd=PROTOS,
    )
    (out / PACKAGE / "__init__.py").write_text('"""Generated from protos/safehold/v1."""\n')


def _sources() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))


def stale_files(expected: Path, actual: Path) -> list[str]:
    """Names of files that differ, are missing, or are left over."""
    comparison = filecmp.dircmp(expected, actual, ignore=["__pycache__"])
    return sorted(
        comparison.left_only
        + comparison.right_only
        + [n for n in comparison.common_files if not filecmp.cmp(expected / n, actual / n, False)]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args()
    if not args.check:
        target = OUT / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        generate(OUT)
        REFERENCE.write_text(render(PROTOS, _sources()))
        print(f"generated {target.relative_to(ROOT)} and {REFERENCE.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = stale_files(Path(tmp) / PACKAGE, OUT / PACKAGE)
    if not REFERENCE.exists() or REFERENCE.read_text() != render(PROTOS, _sources()):
        stale.append(str(REFERENCE.relative_to(ROOT)))
    if stale:
        print("stale generated files, run `python scripts/gen_protos.py`: " + ", ".join(stale))
        return 1
    print("generated stubs and reference are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

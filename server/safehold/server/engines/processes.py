"""Child processes (pg_dump, pg_restore, psql) that never outlive their caller.

Each child gets an argument list, never a shell string; secrets travel in its
environment only. It is killed when the block that started it ends, however
it ends, and by the kernel (PR_SET_PDEATHSIG through setpriv) if the server
itself dies. Its stderr is drained by a thread so that it can never block on
a full pipe, and kept (the tail) for error messages.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

_STDERR_TAIL_LINES = 200
_STDERR_LINE_BYTES = 4096
"""A longer line (psql can echo a statement of an upload) is kept in pieces of this size."""
_PIPE_BYTES = 1024 * 1024
"""Pipes this wide let a child run a whole chunk ahead of the copy loop."""
_SETPRIV = shutil.which("setpriv")


class Child:
    """A running child process with its stderr collected in the background."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._drain = threading.Thread(target=self._collect, daemon=True)
        self._drain.start()

    @property
    def stdout(self) -> IO[bytes]:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.process.stdin is not None
        return self.process.stdin

    def wait(self) -> int:
        """Exit code, once stderr has been read to its end."""
        code = self.process.wait()
        self._drain.join()
        return code

    def stderr_lines(self) -> list[str]:
        return list(self._stderr)

    def _collect(self) -> None:
        assert self.process.stderr is not None
        stderr = self.process.stderr
        while raw := stderr.readline(_STDERR_LINE_BYTES):
            self._stderr.append(raw.decode("utf-8", "replace").rstrip())


@contextlib.contextmanager
def child(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
) -> Iterator[Child]:
    """Run argv; kill it if it is still running when the block ends."""
    prefix = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
    process = subprocess.Popen(
        [*prefix, *argv],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=dict(env),
        close_fds=True,
    )
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            _widen_pipe(stream)
    running = Child(process)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        running.wait()


def _widen_pipe(stream: IO[bytes]) -> None:
    """Grow a pipe from 64 KiB to a chunk (Linux); where that is refused, keep it."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

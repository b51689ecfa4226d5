"""A one-line progress display for a terminal: bytes, rate and ETA."""

from __future__ import annotations

import time
from typing import TextIO

from safehold.client.client import Progress

_MIB = 1024 * 1024


class TerminalProgress:
    """Redraws one line on `stream`; at most a few times a second."""

    def __init__(self, stream: TextIO, min_interval: float = 0.2) -> None:
        self._stream = stream
        self._min_interval = min_interval
        self._phase = ""
        self._phase_started = time.monotonic()
        self._last_draw = 0.0
        self._last: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.phase != self._phase:
            self.finish()
            self._phase = progress.phase
            self._phase_started = now
        elif now - self._last_draw < self._min_interval:
            self._last = progress
            return
        self._draw(progress, now)

    def finish(self) -> None:
        """End the current line, showing where its phase got to."""
        if self._last is not None:
            self._draw(self._last, time.monotonic())
        if self._phase:
            self._stream.write("\n")
            self._stream.flush()
        self._phase = ""

    def _draw(self, progress: Progress, now: float) -> None:
        self._last_draw = now
        self._last = None
        self._stream.write("\r\x1b[K" + _line(progress, now - self._phase_started))
        self._stream.flush()


def _line(progress: Progress, elapsed: float) -> str:
    done = progress.bytes_done / _MIB
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{progress.phase.lower():<18} {done:9.1f} MiB"
    if progress.bytes_total:
        total = progress.bytes_total / _MIB
        text += f" / {total:.1f} MiB"
        if rate > 0 and total > done:
            text += f"  ETA {(total - done) / rate:5.0f}s"
    if rate > 0:
        text += f"  {rate:7.1f} MiB/s"
    return text

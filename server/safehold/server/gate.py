"""Keeps backups from reading a database while a restore replaces it.

Many backups may run at once; a restore's replace step runs alone. A backup
that cannot get in within its wait is told to retry rather than left hanging
or handed a half-restored database.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from safehold.server.errors import DatabaseBusy


class ReadWriteGate:
    """A readers-writer lock whose readers give up after a bounded wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self, timeout: float) -> Iterator[None]:
        """Held by a backup for its whole stream."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._writing, timeout):
                raise DatabaseBusy(
                    "a restore is replacing the database; retry the backup when it is done"
                )
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, timeout: float) -> Iterator[None]:
        """Held by a restore while it replaces the database. New backups wait
        from the moment it asks; running ones get `timeout` seconds to finish."""
        with self._cond:
            self._writing = True
            if not self._cond.wait_for(lambda: self._readers == 0, timeout):
                self._writing = False
                self._cond.notify_all()
                raise DatabaseBusy(
                    "backups still running kept the restore from starting; retry when they end"
                )
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

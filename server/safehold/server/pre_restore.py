"""The pre-restore backups: a history of files, never one file replaced.

Each restore saves the database as it was to a new file named
`pre-restore-<UTC time with microseconds>[-<n>]<suffix>`, so an operator who
restored the wrong file, or whose undo failed, still has every earlier state.
Only files of exactly this naming are ever listed, pruned or cleaned up: the
directory may hold anything else (an old single `pre-restore.sqlite` included)
and it is left alone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3
PREFIX = "pre-restore-"
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_OWN_NAME = re.compile(r"pre-restore-(\d{8}T\d{6}\.\d{6}Z)(?:-(\d{1,6}))?(\.[A-Za-z0-9]+)")
# atomic_path's temp names: `.<final name>.partial-<random>`, with SQLite's
# `-journal` beside it; also those of the single-file versions (`.pre-restore.sqlite.partial-…`).
_OWN_PARTIAL = re.compile(
    r"\.pre-restore(-[0-9T.Z-]+)?\.[A-Za-z0-9]+\.partial-[A-Za-z0-9_]+(-journal)?"
)


@dataclass(frozen=True)
class PreRestoreHistory:
    """The pre-restore backups of one engine (one file suffix) in one directory."""

    directory: Path
    suffix: str
    keep: int = DEFAULT_KEEP

    @classmethod
    def from_setting(
        cls, setting: Path | None, data_dir: Path, suffix: str, keep: int
    ) -> PreRestoreHistory:
        """The history that --pre-restore-path names.

        The setting used to name one file; a value that still does (an existing
        file, or a name ending in the engine's suffix that is no directory)
        carries over as that file's directory, and the old file is kept as is.
        """
        if setting is None:
            return cls(data_dir / "pre-restore", suffix, keep)
        if setting.is_file() or (setting.suffix == suffix and not setting.is_dir()):
            log.warning(
                "--pre-restore-path %s names a file; pre-restore backups are now a history "
                "of files in its directory %s (the file itself is left untouched)",
                setting,
                setting.parent,
            )
            return cls(setting.parent, suffix, keep)
        return cls(setting, suffix, keep)

    def new_path(self, now: datetime | None = None) -> Path:
        """A name no file has yet, later than every earlier one; creates the
        directory (0700). Callers serialise restores, so the name stays free."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = (now or datetime.now(UTC)).strftime(_STAMP)
        newest = self.newest()
        if newest is not None and _sort_key(newest.name) >= (stamp, 0):
            # Same microsecond, or the clock went back: count on from the newest.
            stamp, count = _sort_key(newest.name)
            return self.directory / f"{PREFIX}{stamp}-{count + 1}{self.suffix}"
        return self.directory / f"{PREFIX}{stamp}{self.suffix}"

    def files(self) -> list[Path]:
        """The pre-restore backups of this engine, oldest first."""
        if not self.directory.is_dir():
            return []
        own = [
            p
            for p in self.directory.iterdir()
            if (m := _OWN_NAME.fullmatch(p.name)) and m.group(3) == self.suffix and p.is_file()
        ]
        return sorted(own, key=lambda p: _sort_key(p.name))

    def newest(self) -> Path | None:
        """The most recent pre-restore backup, if there is one."""
        files = self.files()
        return files[-1] if files else None

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep` files; call only after a restore succeeded.
        A file that cannot be deleted is logged, never a reason to fail that restore."""
        removed = []
        for path in self.files()[: -self.keep]:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove old pre-restore backup %s: %s", path, exc.strerror)
                continue
            log.info("removed old pre-restore backup %s (keeping the newest %d)", path, self.keep)
            removed.append(path)
        return removed

    def remove_partials(self) -> list[Path]:
        """Delete the temp files a killed server left while writing a pre-restore backup."""
        if not self.directory.is_dir():
            return []
        removed = [
            p for p in self.directory.iterdir() if _OWN_PARTIAL.fullmatch(p.name) and p.is_file()
        ]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed


def _sort_key(name: str) -> tuple[str, int]:
    """(time stamp, counter) of one of our names; stamps sort as times do."""
    match = _OWN_NAME.fullmatch(name)
    assert match is not None
    return match.group(1), int(match.group(2) or 0)

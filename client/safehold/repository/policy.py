"""Which backups a retention policy keeps, as a pure function (restic's `forget`).

`plan()` touches no storage: it groups backups by database, sorts each group newest
first and walks it once per rule. A rule "keep N hourly/daily/weekly/monthly/yearly"
keeps the newest backup of each of the N most recent hours/days/ISO weeks/months/years
that have one; "keep last N" keeps the N newest; N = -1 means no limit. A backup is kept
if any rule keeps it, and every rule that keeps it is named as a reason. Buckets are in
UTC (restic uses local time). An empty policy is refused, and every rule keeps the newest
backup of its first bucket, so the newest backup of each database is always kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from safehold.repository.manifest import Manifest


@dataclass(frozen=True)
class Policy:
    """How many backups to keep per rule; 0 turns a rule off, -1 keeps all it matches."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def is_empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


@dataclass(frozen=True)
class Decision:
    """One backup and why it stays; no reasons means it goes."""

    manifest: Manifest
    reasons: tuple[str, ...] = field(default=())

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


_Bucket = Callable[[datetime], object]
_RULES: tuple[tuple[str, _Bucket], ...] = (
    ("last", lambda t: t),
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: t.year),
)


def plan(backups: Sequence[Manifest], policy: Policy) -> list[Decision]:
    """A decision for every backup, newest first within each database."""
    if policy.is_empty():
        raise ValueError("an empty policy would remove everything: give at least one --keep-*")
    if min(getattr(policy, rule) for rule, _ in _RULES) < -1:
        raise ValueError("a --keep-* count is a number of backups, or -1 for all")
    by_database: dict[str, list[Manifest]] = {}
    for manifest in backups:
        by_database.setdefault(manifest.database_name, []).append(manifest)
    decisions: list[Decision] = []
    for database in sorted(by_database):
        decisions += _plan_one(by_database[database], policy)
    return decisions


def _plan_one(backups: list[Manifest], policy: Policy) -> list[Decision]:
    ordered = sorted(backups, key=lambda m: (m.created_at, m.name), reverse=True)
    reasons: list[list[str]] = [[] for _ in ordered]
    for rule, bucket in _RULES:
        remaining = getattr(policy, rule)
        last_bucket: object = None
        for i, manifest in enumerate(ordered):
            if remaining == 0:
                break
            value = bucket(manifest.created_at)
            if value != last_bucket:
                reasons[i].append(f"{rule} backup")
                last_bucket = value
                remaining -= 1
    return [Decision(m, tuple(r)) for m, r in zip(ordered, reasons, strict=True)]

"""The prune policy as a pure function: fixed timestamps against recorded keep sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.repository import Manifest, Policy, plan


def manifest(stamp: str, database: str = "app") -> Manifest:
    created = datetime.fromisoformat(stamp).replace(tzinfo=UTC)
    return Manifest(
        name=f"{database}-{created:%Y%m%dT%H%M%S}Z.sqlite",
        engine="SQLite",
        engine_version="3",
        dump_format="DUMP_FORMAT_SQLITE_FILE",
        database_name=database,
        created_at=created,
        safehold_version="0",
        size_bytes=1,
        sha256="0" * 64,
        stored_size_bytes=1,
        stored_sha256="0" * 64,
    )


STAMPS = [
    "2025-12-31T23:00",
    "2026-01-01T10:00",
    "2026-01-01T11:30",
    "2026-01-01T11:45",
    "2026-01-02T09:00",
    "2026-01-05T09:00",  # Monday, ISO week 2
    "2026-01-12T09:00",  # Monday, ISO week 3
    "2026-02-01T09:00",  # Sunday, ISO week 5
    "2026-02-15T09:00",  # Sunday, ISO week 7
]


def kept(policy: Policy) -> dict[str, tuple[str, ...]]:
    """What plan() keeps of STAMPS, by timestamp, with its reasons."""
    decisions = plan([manifest(s) for s in STAMPS], policy)
    assert len(decisions) == len(STAMPS)
    return {f"{d.manifest.created_at:%Y-%m-%dT%H:%M}": d.reasons for d in decisions if d.keep}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            Policy(last=2),
            {"2026-02-15T09:00": ("last backup",), "2026-02-01T09:00": ("last backup",)},
        ),
        (
            # one per hour: 11:45 stands for its hour, 11:30 goes
            Policy(hourly=-1),
            {s: ("hourly backup",) for s in STAMPS if s != "2026-01-01T11:30"},
        ),
        (
            Policy(daily=5),
            {
                "2026-02-15T09:00": ("daily backup",),
                "2026-02-01T09:00": ("daily backup",),
                "2026-01-12T09:00": ("daily backup",),
                "2026-01-05T09:00": ("daily backup",),
                "2026-01-02T09:00": ("daily backup",),
            },
        ),
        (
            # 2026-01-01 is in ISO week 2026-W01, 2025-12-31 too
            Policy(weekly=5),
            {
                "2026-02-15T09:00": ("weekly backup",),
                "2026-02-01T09:00": ("weekly backup",),
                "2026-01-12T09:00": ("weekly backup",),
                "2026-01-05T09:00": ("weekly backup",),
                "2026-01-02T09:00": ("weekly backup",),
            },
        ),
        (
            Policy(monthly=3),
            {
                "2026-02-15T09:00": ("monthly backup",),
                "2026-01-12T09:00": ("monthly backup",),
                "2025-12-31T23:00": ("monthly backup",),
            },
        ),
        (
            Policy(yearly=10),
            {"2026-02-15T09:00": ("yearly backup",), "2025-12-31T23:00": ("yearly backup",)},
        ),
        (
            Policy(last=1, daily=2, monthly=3),
            {
                "2026-02-15T09:00": ("last backup", "daily backup", "monthly backup"),
                "2026-02-01T09:00": ("daily backup",),
                "2026-01-12T09:00": ("monthly backup",),
                "2025-12-31T23:00": ("monthly backup",),
            },
        ),
    ],
)
def test_policy_keeps_recorded_sets_with_reasons(
    policy: Policy, expected: dict[str, tuple[str, ...]]
) -> None:
    assert kept(policy) == expected


def test_each_database_has_its_own_buckets() -> None:
    backups = [manifest("2026-01-01T10:00", "a"), manifest("2026-01-01T09:00", "a")]
    backups += [manifest("2026-01-01T08:00", "b")]
    decisions = plan(backups, Policy(daily=1))
    assert [(d.manifest.database_name, d.keep) for d in decisions] == [
        ("a", True),
        ("a", False),
        ("b", True),
    ]


@pytest.mark.parametrize("policy", [Policy(), Policy(daily=-2)])
def test_empty_or_negative_policy_is_refused(policy: Policy) -> None:
    with pytest.raises(ValueError, match="keep"):
        plan([manifest(STAMPS[0])], policy)


counts = st.integers(min_value=-1, max_value=4)


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(min_value=0, max_value=3 * 365 * 24 * 60), max_size=30),
    policy=st.builds(Policy, counts, counts, counts, counts, counts, counts).filter(
        lambda p: not p.is_empty()
    ),
)
def test_the_newest_backup_is_always_kept(offsets: list[int], policy: Policy) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    backups = [
        manifest(f"{start + timedelta(minutes=o):%Y-%m-%dT%H:%M}", db)
        for o in offsets
        for db in ("a", "b")
    ]
    decisions = plan(backups, policy)
    for database in ("a", "b"):
        mine = [d for d in decisions if d.manifest.database_name == database]
        if mine:
            newest = max(mine, key=lambda d: d.manifest.created_at)
            assert newest.keep

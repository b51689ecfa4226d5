"""When scheduled backups run, and where they go: `serve --schedule SPEC --repository URL`.

SPEC is a five-field cron expression, read by croniter in UTC unless
--schedule-timezone names another zone, or an interval (`30s`, `15m`, `6h`, `1d`).
The settings here are parsed once at start, so that a typo stops the server with
a message instead of a night without a backup.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from safehold.repository import Policy

_INTERVAL = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
NOTIFY_EVENTS = ("success", "failure")
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


class ScheduleError(ValueError):
    """A schedule setting that cannot work; the message says what to change."""


@dataclass(frozen=True)
class Schedule:
    """A cron expression in a time zone, or a fixed interval."""

    spec: str
    zone: ZoneInfo
    interval: timedelta | None

    @classmethod
    def parse(cls, spec: str, zone_name: str = "UTC") -> Schedule:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(
                f"--schedule-timezone {zone_name!r} is no known time zone"
            ) from None
        spec = spec.strip()
        if match := _INTERVAL.fullmatch(spec):
            seconds = int(match.group(1)) * _UNITS[match.group(2)]
            if seconds < 1:
                raise ScheduleError("--schedule interval must be at least 1s")
            return cls(spec, zone, timedelta(seconds=seconds))
        if len(spec.split()) != 5 or not croniter.is_valid(spec):
            raise ScheduleError(
                f"--schedule {spec!r} is neither a five-field cron expression "
                "(e.g. '0 3 * * *') nor an interval (30s, 15m, 6h, 1d)"
            )
        return cls(spec, zone, None)

    def next_after(self, moment: datetime) -> datetime:
        """The first run strictly after moment (timezone-aware)."""
        if self.interval is not None:
            return moment + self.interval
        found: datetime = croniter(self.spec, moment.astimezone(self.zone)).get_next(datetime)
        return found

    def period(self, moment: datetime) -> timedelta:
        """How long one period is around moment: the interval, or the gap between the
        next two cron runs (for '0 3 * * *', a day)."""
        if self.interval is not None:
            return self.interval
        first = self.next_after(moment)
        return self.next_after(first) - first


@dataclass(frozen=True)
class RepositorySettings:
    """The server's own repository, and what its runs do."""

    url: str
    schedule: Schedule | None
    recipients: tuple[str, ...] = ()
    recipients_files: tuple[str, ...] = ()
    policy: Policy | None = None
    notify_url: str | None = field(default=None, repr=False)
    """May carry a token in its path: never logged whole."""
    notify_on: frozenset[str] = frozenset({"failure"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduling flags of `safehold serve`."""
    env = " (env %s)"
    parser.add_argument(
        "--schedule",
        help="take backups into --repository on this schedule: a five-field cron expression "
        "such as '0 3 * * *', or an interval (30s, 15m, 6h, 1d)" + env % "SAFEHOLD_SCHEDULE",
    )
    parser.add_argument(
        "--schedule-timezone",
        help="time zone of the cron expression, default UTC" + env % "SAFEHOLD_SCHEDULE_TIMEZONE",
    )
    parser.add_argument(
        "--repository",
        help="directory or s3://bucket/prefix the server backs up into, and lists over the "
        "contract" + env % "SAFEHOLD_REPOSITORY",
    )
    parser.add_argument(
        "--recipient",
        action="append",
        help="age-encrypt the server's backups to this age or SSH public key (repeatable)"
        + env % "SAFEHOLD_RECIPIENTS, space-separated",
    )
    parser.add_argument(
        "--recipients-file",
        action="append",
        help="file of recipients, one per line (repeatable)" + env % "SAFEHOLD_RECIPIENTS_FILE",
    )
    for rule in KEEP_RULES:
        parser.add_argument(
            f"--keep-{rule}",
            type=int,
            help=f"after each run, keep this many {rule} backups (restic's forget rules; "
            "-1 keeps all)" + env % f"SAFEHOLD_KEEP_{rule.upper()}",
        )
    parser.add_argument(
        "--notify-url",
        help="POST a JSON document here when a run fails" + env % "SAFEHOLD_NOTIFY_URL",
    )
    parser.add_argument(
        "--notify-on",
        help="which runs to notify: failure (default), or success,failure"
        + env % "SAFEHOLD_NOTIFY_ON",
    )


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> RepositorySettings | None:
    """The repository settings, None without --repository; ScheduleError says what to fix."""

    def pick(flag: object, name: str) -> str | None:
        if flag is not None:
            return str(flag)
        return environ.get(f"SAFEHOLD_{name}") or None

    url = pick(args.repository, "REPOSITORY")
    spec = pick(args.schedule, "SCHEDULE")
    if not url:
        if spec:
            raise ScheduleError("--schedule needs --repository: where should the backups go?")
        return None
    zone = pick(args.schedule_timezone, "SCHEDULE_TIMEZONE") or "UTC"
    recipients = args.recipient or (environ.get("SAFEHOLD_RECIPIENTS") or "").split()
    files = args.recipients_file or ([f] if (f := environ.get("SAFEHOLD_RECIPIENTS_FILE")) else [])
    keep = {
        rule: pick(getattr(args, f"keep_{rule}"), f"KEEP_{rule.upper()}") for rule in KEEP_RULES
    }
    try:
        policy = Policy(**{rule: int(v) for rule, v in keep.items() if v is not None})
    except ValueError:
        raise ScheduleError("--keep-* take whole numbers (-1 keeps all)") from None
    notify_on = frozenset(
        e.strip() for e in (pick(args.notify_on, "NOTIFY_ON") or "failure").split(",") if e.strip()
    )
    if not notify_on <= set(NOTIFY_EVENTS):
        raise ScheduleError(f"--notify-on takes {', '.join(NOTIFY_EVENTS)}, comma-separated")
    notify_url = pick(args.notify_url, "NOTIFY_URL")
    if notify_url and not re.match(r"https?://", notify_url):
        raise ScheduleError("--notify-url must be an http:// or https:// URL")
    return RepositorySettings(
        url=url,
        schedule=Schedule.parse(spec, zone) if spec else None,
        recipients=tuple(recipients),
        recipients_files=tuple(files),
        policy=None if policy.is_empty() else policy,
        notify_url=notify_url,
        notify_on=notify_on,
    )

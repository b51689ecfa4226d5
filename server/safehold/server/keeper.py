"""The server keeps its own database backed up: runs into its repository, on a schedule
or when asked (CreateRepositoryBackup), and says when they fail. (listing.py shows
the repository over the contract.)

A run takes the Backup RPC's own frames (servicer.backup_frames: the same backup
slots, read gate, engine path and shutdown refusal), streams the chunks into the
repository (age-encrypted to the configured recipients), re-reads what was stored
against its manifest, then applies the retention policy. A run that fails is retried
with backoff within its period, then reported: a log line, the metrics, and the
webhook. Runs never overlap: one lock is held for each of them.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import tenacity
from prometheus_client import CollectorRegistry, Counter, Gauge

from safehold.client.errors import SafeholdError as ClientError
from safehold.client.output import safe_name
from safehold.contract import Reason
from safehold.formats import engine_label, file_suffix
from safehold.repository import Artefact, Manifest, Policy, crypto, open_repository
from safehold.repository.location import is_remote
from safehold.server import notify
from safehold.server.config import ConfigError
from safehold.server.errors import SafeholdError, TooManyBackups
from safehold.server.schedule import RepositorySettings, Schedule
from safehold.streams import ChunksReader, as_binary
from safehold.v1 import backup_service_pb2 as pb

if TYPE_CHECKING:  # the servicer imports this module
    from safehold.server.servicer import BackupServicer

log = logging.getLogger(__name__)

SAFEHOLD_VERSION = version("safehold")
MAX_ATTEMPTS = 5
"""Attempts of one scheduled run, all within its period."""
CATCH_UP_JITTER_SECONDS = 10.0
"""At most this much random delay before a catch-up run, so that servers started
together do not all back up at the same second."""


class NoRepository(SafeholdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.NO_REPOSITORY


class RepositoryFailed(SafeholdError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.REPOSITORY_FAILED


@dataclass(frozen=True)
class RunResult:
    """A backup stored, verified and kept by the policy."""

    manifest: Manifest
    backups_in_repository: int
    pruned: int
    seconds: float


class KeeperMetrics:
    """What an alert needs: when the last scheduled run succeeded and failed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_success = Gauge(
            "safehold_scheduled_backup_last_success_timestamp_seconds",
            "Unix time of the last repository backup that was stored and verified",
            registry=registry,
        )
        self.last_failure = Gauge(
            "safehold_scheduled_backup_last_failure_timestamp_seconds",
            "Unix time of the last repository backup run that failed after its retries",
            registry=registry,
        )
        self.duration = Gauge(
            "safehold_scheduled_backup_last_duration_seconds",
            "Duration of the last successful repository backup run",
            registry=registry,
        )
        self.size = Gauge(
            "safehold_scheduled_backup_last_size_bytes",
            "Size of the last repository backup (the engine's artefact)",
            registry=registry,
        )
        self.backups = Gauge(
            "safehold_repository_backups",
            "Complete backups in the server's repository after the last run",
            registry=registry,
        )
        self.attempts = Counter(
            "safehold_scheduled_backup_attempts",
            "Attempts of repository backup runs, by outcome",
            ["outcome"],
            registry=registry,
        )


class Keeper:
    """The server's repository: runs into it, and the schedule that starts them."""

    def __init__(
        self, settings: RepositorySettings, servicer: BackupServicer, registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.repository = open_repository(settings.url)
        if not is_remote(settings.url):
            Path(settings.url).mkdir(parents=True, exist_ok=True, mode=0o700)
        # Keys are read at start: a bad one stops the server, not a night's backup.
        try:
            self._recipients = crypto.load_recipients(
                settings.recipients, [Path(f) for f in settings.recipients_files]
            )
        except ClientError as err:
            raise ConfigError(f"--recipient/--recipients-file: {err}") from None
        self._servicer = servicer
        self.metrics = KeeperMetrics(registry)
        self._run_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one run -------------------------------------------------------------

    def run_now(self, wait_seconds: float) -> RunResult:
        """One run, waiting up to wait_seconds for a run under way; errors as SafeholdErrors."""
        if not self._run_lock.acquire(timeout=wait_seconds):
            raise TooManyBackups("a repository backup is running; retry when it has finished")
        try:
            result = self._run_once()
        except (ClientError, OSError) as err:
            raise RepositoryFailed(f"{self.repository.location}: {err}") from None
        finally:
            self._run_lock.release()
        self._stored("requested backup", result, attempts=1)
        return result

    def _run_once(self) -> RunResult:
        started = time.monotonic()
        with self._servicer.backup_frames() as frames:
            first = next(frames)
            artefact = _artefact(first.manifest)
            manifest = self.repository.write(
                artefact, as_binary(ChunksReader(_chunks(frames))), self._recipients
            )
        self.repository.verify(manifest)
        pruned = self._apply_policy(self.settings.policy)
        count = len(self.repository.backups())
        return RunResult(manifest, count, pruned, time.monotonic() - started)

    def _apply_policy(self, policy: Policy | None) -> int:
        if policy is None:
            return 0
        prune_plan = self.repository.plan_prune(policy)
        self.repository.prune(prune_plan)
        return len(prune_plan.remove)

    # --- the schedule ----------------------------------------------------------

    def start(self) -> None:
        """Run the schedule in a thread of its own, if there is one."""
        if self.settings.schedule is None:
            return
        self._thread = threading.Thread(
            target=self._loop, args=(self.settings.schedule,), name="safehold-schedule", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """No new run; a run under way ends at the servicer's shutdown refusal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, schedule: Schedule) -> None:
        next_at = self._first_run(schedule)
        while not self._stop.wait(max(0.0, (next_at - datetime.now(UTC)).total_seconds())):
            started = datetime.now(UTC)
            self._scheduled_run(schedule.next_after(started))
            next_at = schedule.next_after(started)
            if next_at <= datetime.now(UTC):
                next_at = schedule.next_after(datetime.now(UTC))
            log.info("next scheduled backup at %s", next_at.isoformat(timespec="seconds"))

    def _first_run(self, schedule: Schedule) -> datetime:
        """Soon, when the newest backup of this database is older than one period (a
        server down at 03:00 still gets its night's backup); else the next slot."""
        now = datetime.now(UTC)
        period = schedule.period(now)
        newest = self._newest_backup()
        if newest is not None:
            # A restart is no missed backup: the alert on last success keeps its time.
            self.metrics.last_success.set(newest.created_at.timestamp())
        if newest is not None and now - newest.created_at <= period:
            next_at = schedule.next_after(now)
            log.info(
                "scheduled backups (%s) into %s; newest backup %s; next at %s",
                schedule.spec,
                self.repository.location,
                newest.name,
                next_at.isoformat(timespec="seconds"),
            )
            return next_at
        delay = random.uniform(0, min(CATCH_UP_JITTER_SECONDS, period.total_seconds() / 10))  # noqa: S311 (jitter, not a secret)
        log.info(
            "scheduled backups (%s) into %s; %s: catching up in %.1fs",
            schedule.spec,
            self.repository.location,
            f"newest backup {newest.name} is older than one period" if newest else "no backup yet",
            delay,
        )
        return now + timedelta(seconds=delay)

    def _newest_backup(self) -> Manifest | None:
        try:
            database = self._servicer.database_name()
            backups = self.repository.backups()
        except (SafeholdError, ClientError, OSError) as err:
            log.warning("cannot tell the newest backup (%s): backing up soon", _describe(err))
            return None
        self.metrics.backups.set(len(backups))
        return next((m for m in backups if m.database_name == database), None)

    def _scheduled_run(self, deadline: datetime) -> None:
        """A run with retries until MAX_ATTEMPTS or shortly before the next slot; reported."""
        started_at = datetime.now(UTC)
        budget = max(1.0, (deadline - started_at).total_seconds() * 0.9)
        attempts = 0

        def attempt() -> RunResult:
            nonlocal attempts
            attempts += 1
            with self._run_lock:
                return self._run_once()

        def on_retry(state: tenacity.RetryCallState) -> None:
            self.metrics.attempts.labels("failed").inc()
            err = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "scheduled backup attempt %d failed: %s; retrying in %.1fs",
                state.attempt_number,
                _describe(err),
                wait,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(MAX_ATTEMPTS)
            | tenacity.stop_before_delay(budget)
            | tenacity.stop_when_event_set(self._stop),
            wait=tenacity.wait_exponential(multiplier=min(60.0, budget / 20), max=budget / 4),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=on_retry,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            result = retrying(attempt)
        except Exception as err:  # reported, never the end of the schedule
            self.metrics.attempts.labels("failed").inc()
            if self._stop.is_set():
                log.warning("scheduled backup stopped by shutdown; nothing was stored")
                return
            self._report_failure(started_at, attempts, err)
            return
        self.metrics.attempts.labels("succeeded").inc()
        self._report_success(started_at, attempts, result)

    def _report_success(self, started_at: datetime, attempts: int, result: RunResult) -> None:
        m = result.manifest
        self._stored("scheduled backup", result, attempts)
        if "success" in self.settings.notify_on:
            self._notify(
                "success",
                started_at,
                attempts,
                backup=m.name,
                size_bytes=m.size_bytes,
                database=m.database_name,
                backups_in_repository=result.backups_in_repository,
            )

    def _stored(self, what: str, result: RunResult, attempts: int) -> None:
        """A run's backup is stored and verified: the metrics and the log say so."""
        m = result.manifest
        self.metrics.last_success.set(time.time())
        self.metrics.duration.set(result.seconds)
        self.metrics.size.set(m.size_bytes)
        self.metrics.backups.set(result.backups_in_repository)
        log.info(
            "%s of %s stored: %s/%s, %d bytes%s, verified, %.1fs, attempt %d; "
            "%d backups in the repository, %d pruned",
            what,
            m.database_name,
            self.repository.location,
            m.name,
            m.size_bytes,
            ", age-encrypted" if m.encrypted else "",
            result.seconds,
            attempts,
            result.backups_in_repository,
            result.pruned,
        )

    def _report_failure(self, started_at: datetime, attempts: int, err: BaseException) -> None:
        self.metrics.last_failure.set(time.time())
        log.error(
            "scheduled backup FAILED after %d attempts into %s: %s",
            attempts,
            self.repository.location,
            _describe(err),
        )
        if "failure" in self.settings.notify_on:
            self._notify("failure", started_at, attempts, error=_describe(err))

    def _notify(self, event: str, started_at: datetime, attempts: int, **fields: object) -> None:
        if not self.settings.notify_url:
            return
        document = {
            "event": event,
            "repository": self.repository.location,
            "host": socket.gethostname(),
            "started_at": iso(started_at),
            "finished_at": iso(datetime.now(UTC)),
            "attempts": attempts,
            "safehold_version": SAFEHOLD_VERSION,
            **fields,
        }
        notify.post(self.settings.notify_url, document, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        """Wait between attempts, cut short by shutdown."""
        self._stop.wait(seconds)


def _artefact(manifest: pb.BackupManifest) -> Artefact:
    return Artefact(
        engine=engine_label(manifest.engine),
        engine_version=manifest.engine_version,
        dump_format=pb.DumpFormat.Name(manifest.dump_format),
        database_name=manifest.database_name,
        created_at=manifest.created_at.ToDatetime(tzinfo=UTC),
        safehold_version=manifest.safehold_version,
        suggested_name=safe_name(manifest.suggested_file_name, file_suffix(manifest.dump_format)),
    )


def _chunks(frames: Iterator[pb.BackupResponse]) -> Iterator[bytes]:
    """The chunk frames' bytes; the trailer is the servicer's own digest, in-process."""
    for frame in frames:
        if frame.WhichOneof("frame") == "chunk":
            yield frame.chunk


def _describe(err: BaseException | None) -> str:
    if isinstance(err, SafeholdError):
        return f"{err.message} [{err.reason}]"
    if isinstance(err, ClientError):
        return f"{err} [{err.reason}]"
    return f"{type(err).__name__}: {err}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

"""The job schedule inside ``clinicbox serve``: the only module that imports APScheduler.

Schedules are cron expressions from ``[jobs]`` in the config (empty: not scheduled).  A run missed
while the box was off (its last finished run is older than the schedule's previous fire time)
runs once at start-up.  Runs of one job never overlap (APScheduler ``max_instances=1``, plus the
job's lock file against runs started by hand); a fire APScheduler drops because the previous run
is still going is recorded as ``skipped`` like any other.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from clinicbox.archive.ingest import Archive
from clinicbox.core.config import Config, ConfigError
from clinicbox.jobs.runner import FINISHED, JOBS, last_run, record_skipped, run_job

log = logging.getLogger(__name__)


NEEDS_TARGET = ("backup", "restore-test")


def schedules(config: Config) -> dict[str, str]:
    plan = {name: getattr(config.jobs, name.replace("-", "_")) for name in JOBS
            if getattr(config.jobs, name.replace("-", "_"), "")}
    if not config.backup.target:
        for name in NEEDS_TARGET:
            plan.pop(name, None)
    return plan


_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _weekdays(field: str) -> str:
    """A crontab weekday field (0 or 7 = Sunday, names too) as APScheduler day names.

    APScheduler 3 reads weekday *numbers* with 0 = Monday, even in ``from_crontab``: "30 4 * * 0"
    would run on Mondays.  Spelling the days out keeps crontab's meaning.
    """
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        spec, _, step = part.partition("/")
        lo, _, hi = spec.partition("-")

        def num(t: str) -> int:
            return _DAYS.index(t[:3]) if t[:3] in _DAYS else int(t) % 7

        if spec in ("*", "?"):
            first, last = 0, 6
        else:
            first = num(lo)
            last = num(hi) if hi else (6 if step else first)
            if hi and hi.strip() == "7":
                last = 7
        values = list(range(first, last + 1)) if last >= first else list(range(first, 7)) + list(range(0, last + 1))
        days.update(v % 7 for v in values[::int(step) if step else 1])
    return ",".join(_DAYS[d] for d in sorted(days))


def trigger_for(expression: str, timezone=None) -> CronTrigger:
    """A cron trigger from ``"m h dom mon dow"`` (or six fields with seconds first), crontab meaning."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    second, minute, hour, day, month, dow = fields
    return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_weekdays(dow), timezone=timezone)


def _previous_fire(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The last time the schedule fired before ``now`` (searched back up to ~a year)."""
    from datetime import timedelta

    for window in (timedelta(minutes=2), timedelta(hours=2), timedelta(days=1), timedelta(days=8),
                   timedelta(days=32), timedelta(days=370)):
        start = now - window
        t = trigger.get_next_fire_time(None, start)
        last = None
        while t is not None and t <= now:
            last = t
            t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
        if last is not None:
            return last
    return None


class Scheduler:
    def __init__(self, config: Config, archive: Archive) -> None:
        self.config = config
        self.archive = archive
        self._scheduler = BackgroundScheduler(timezone=config.jobs.timezone or None)
        self._stopping = threading.Event()  # a run waiting for another job's end gives up on it
        self._scheduler.add_listener(self._dropped, EVENT_JOB_MAX_INSTANCES)

    def start(self) -> None:
        plan = schedules(self.config)
        if not self.config.backup.target:
            log.warning("no backup target (backup.target): this box keeps the only copy of its images")
        triggers = {}
        for name, expression in plan.items():
            try:
                triggers[name] = trigger_for(expression, self._scheduler.timezone)
            except ValueError as exc:
                raise ConfigError(f"jobs.{name.replace('-', '_')}", f"{expression!r}: {exc}") from None
        for name, expression in plan.items():
            trigger = triggers[name]
            self._scheduler.add_job(self._run, trigger, args=[name, "schedule"], id=name, max_instances=1,
                                    coalesce=True, misfire_grace_time=3600)
            log.info("job %s scheduled: %s", name, expression)
        self._scheduler.start()
        now = datetime.now(self._scheduler.timezone)
        for name, expression in plan.items():
            previous = _previous_fire(triggers[name], now)
            done = last_run(self.archive, name, FINISHED)  # a failed run is tried again at start
            if previous is not None and (done is None or datetime.fromisoformat(done["started_at"]) < previous):
                log.info("job %s missed its run of %s (box off?): running it now", name, previous)
                self._scheduler.add_job(self._run, args=[name, "missed"], id=f"{name}-missed", max_instances=1)

    def _dropped(self, event) -> None:
        name = event.job_id.removesuffix("-missed")
        if name in JOBS:
            record_skipped(self.archive, name, "schedule", "the previous run is still going")

    def _run(self, name: str, trigger: str) -> None:
        run_job(name, self.config, self.archive, trigger=trigger, stop=self._stopping)

    def stop(self) -> None:
        self._stopping.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

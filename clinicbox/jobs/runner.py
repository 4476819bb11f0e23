"""The jobs: plain functions of the appliance's config and archive, each run recorded in ``job_runs``.

``run_job(name, …)`` is what the scheduler, ``clinicbox jobs run``, the console and tests call.  A
run holds a per-job lock file in the data dir, so runs of one job never overlap, even between the
service and a run started by hand; a run that finds its job's lock taken is recorded as ``skipped``.
Runs of different jobs wait for each other (one more lock, ``jobs.lock``): retention deleting files
while the scrub checks them (and "repairs" them back from the backup), or a backup pruning the one
the restore test is reading, must not happen.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from clinicbox.archive import index as idx
from clinicbox.archive.index import MigrationSet
from clinicbox.archive.ingest import Archive
from clinicbox.core.config import Config
from clinicbox.jobs import backup

log = logging.getLogger(__name__)

migrations = MigrationSet("clinicbox.jobs")
ALL_JOBS_LOCK = "jobs.lock"
# outcomes of a run that ran to its end (a run with "problems" did its work and found trouble)
FINISHED = ("ok", "problems")


@migrations(name="0001_job_runs")
def _m0001(db) -> None:
    db.executescript(
        """
        CREATE TABLE job_runs (
            id INTEGER PRIMARY KEY,
            job TEXT NOT NULL,
            trigger TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            outcome TEXT NOT NULL DEFAULT 'running',
            figures TEXT NOT NULL DEFAULT '{}',
            error TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX job_runs_job ON job_runs (job, started_at);
        """
    )


@migrations(name="0002_retention")
def _m0002(db) -> None:
    db.executescript(
        """
        CREATE TABLE legal_holds (
            kind TEXT NOT NULL CHECK (kind IN ('patient', 'study')),
            value TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            who TEXT NOT NULL DEFAULT '',
            at TEXT NOT NULL,
            PRIMARY KEY (kind, value)
        );
        -- append-only: who did what, when (deletions, holds); the archive's migration 0005 creates it
        -- on newer data dirs (reconciliation writes to it too)
        CREATE TABLE IF NOT EXISTS audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            who TEXT NOT NULL,
            action TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        """
    )


@dataclass(frozen=True)
class Job:
    name: str
    doc: str
    fn: Callable[[Config, Archive], dict]


def _target(config: Config) -> Path:
    if not config.backup.target:
        raise backup.BackupError("no backup target: set backup.target in the config (a mounted disk or NAS "
                                 "folder), or give --to DIR")
    return Path(config.backup.target)


def _backup(config: Config, archive: Archive) -> dict:
    def flag(items) -> None:
        # stored files the backup found damaged or missing: marked like the scrub marks them, and first
        # in line for its next run (which repairs them from an earlier backup)
        def write(conn):
            for table in ("instances", "held_objects"):
                conn.executemany(f"UPDATE {table} SET state=?, verified_at=NULL WHERE path=? AND sha256=?"
                                 " AND state='ok'", [(state, p, h) for p, h, state in items])
        archive.writer.call(write)

    return backup.run_backup(config.data_dir, _target(config), keep=config.backup.keep, flag=flag).figures()


def _restore_test(config: Config, archive: Archive) -> dict:
    from clinicbox.jobs.restore import restore_test

    return restore_test(config.data_dir, _target(config))


def _scrub(config: Config, archive: Archive) -> dict:
    from clinicbox.jobs.integrity import scrub

    target = config.backup.target if config.integrity.repair_from_backup else None
    return scrub(archive, files_per_run=config.integrity.files_per_run, backup_target=target or None)


def _retention(config: Config, archive: Archive) -> dict:
    from clinicbox.jobs.retention import run_retention

    return run_retention(config, archive)


JOBS: dict[str, Job] = {
    "backup": Job("backup", "copy the index snapshot and new objects to backup.target; prune old backups", _backup),
    "restore-test": Job("restore-test", "restore the latest backup into a scratch folder and check it", _restore_test),
    "retention": Job("retention", "delete studies past their keeping time (rules, minors, holds, verified backup)",
                     _retention),
    "scrub": Job("scrub", "re-read stored files against their ingest checksums; repair from the backup", _scrub),
}


def open_jobs(archive: Archive) -> None:
    """Migrations; runs left 'running' by a process that died (kill -9, power cut) marked interrupted."""
    applied = idx.migrate(archive.db_path, migrations)
    if applied:
        log.info("jobs: applied migrations %s", ", ".join(applied))
    stale = [r["job"] for r in archive.index.conn.execute(
        "SELECT DISTINCT job FROM job_runs WHERE outcome = 'running'")]
    for job in stale:
        with open(archive.store.root / f"job-{job}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # running right now, in another process
            archive.writer.call(lambda conn, job=job: conn.execute(
                "UPDATE job_runs SET outcome='failed', ended_at=?, error='interrupted (the process ended mid-run)'"
                " WHERE job=? AND outcome='running'", (idx.utcnow(), job)))
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_archive(config: Config) -> Archive:
    """The archive of ``config`` opened with the jobs room's tables, for the CLI and the console."""
    archive = Archive(config.storage)
    archive.open()
    try:
        open_jobs(archive)
    except BaseException:
        archive.close()
        raise
    return archive


def run_job(name: str, config: Config, archive: Archive, *, trigger: str = "manual",
            stop: threading.Event | None = None) -> dict:
    """Run one job now and record it; returns the run's record (outcome ok, problems (it ran and found
    trouble), failed or skipped).  While another job runs it waits; ``stop`` set meanwhile (the service
    shutting down) gives up, recorded as skipped."""
    job = JOBS.get(name)
    if job is None:
        raise KeyError(f"no job {name!r} (jobs: {', '.join(JOBS)})")
    lock_path = config.data_dir / f"job-{name}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return record_skipped(archive, name, trigger, "the previous run is still going")
        with open(config.data_dir / ALL_JOBS_LOCK, "a") as all_jobs:
            waited = False
            while True:
                try:
                    fcntl.flock(all_jobs, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.info("job %s (%s) waits: another job is running", name, trigger)
                        waited = True
                    if stop is not None and stop.wait(0.5):
                        return record_skipped(archive, name, trigger, "the service stopped while another job ran")
                    if stop is None:
                        time.sleep(0.5)
            # start-up repair of a service starting meanwhile leaves objects/ and the index alone while a
            # job changes them (else it would index again the files of a study retention is deleting)
            with archive.importing():
                return _run_locked(job, config, archive, trigger)


def _run_locked(job: Job, config: Config, archive: Archive, trigger: str) -> dict:
    name = job.name
    started = idx.utcnow()
    run_id = archive.writer.call(lambda conn: conn.execute(
        "INSERT INTO job_runs (job, trigger, started_at) VALUES (?,?,?)", (name, trigger, started)).lastrowid)
    t0 = time.monotonic()
    try:
        figures = job.fn(config, archive) or {}
    except backup.BackupError as exc:
        log.error("job %s failed: %s", name, exc)
        return _finish(archive, run_id, name, trigger, started, "failed", {}, str(exc))
    except Exception as exc:
        log.error("job %s failed: %s\n%s", name, exc, traceback.format_exc())
        return _finish(archive, run_id, name, trigger, started, "failed", {}, f"{type(exc).__name__}: {exc}")
    figures.setdefault("seconds", round(time.monotonic() - t0, 3))
    outcome = figures.pop("_outcome", "ok")  # a job that ran but found trouble says so
    log.info("job %s done in %.2f s: %s", name, time.monotonic() - t0, outcome)
    return _finish(archive, run_id, name, trigger, started, outcome, figures, "")


def _finish(archive, run_id, name, trigger, started, outcome, figures, error) -> dict:
    ended = idx.utcnow()
    archive.writer.call(lambda conn: conn.execute(
        "UPDATE job_runs SET ended_at=?, outcome=?, figures=?, error=? WHERE id=?",
        (ended, outcome, json.dumps(figures), error, run_id)))
    return {"job": name, "trigger": trigger, "started_at": started, "ended_at": ended, "outcome": outcome,
            "figures": figures, "error": error}


def record_skipped(archive: Archive, name: str, trigger: str, why: str) -> dict:
    """Record a run that did not start (the scheduler dropped it: the previous one is still going)."""
    log.warning("job %s not started (%s): %s", name, trigger, why)
    return _record(archive, name, trigger, idx.utcnow(), "skipped", {}, why)


def _record(archive, name, trigger, started, outcome, figures, error) -> dict:
    archive.writer.call(lambda conn: conn.execute(
        "INSERT INTO job_runs (job, trigger, started_at, ended_at, outcome, figures, error) VALUES (?,?,?,?,?,?,?)",
        (name, trigger, started, idx.utcnow(), outcome, json.dumps(figures), error)))
    return {"job": name, "trigger": trigger, "started_at": started, "outcome": outcome, "error": error}


def history(archive: Archive, job: str | None = None, limit: int = 50) -> list[dict]:
    sql = "SELECT job, trigger, started_at, ended_at, outcome, figures, error FROM job_runs"
    args: tuple = ()
    if job:
        sql += " WHERE job=?"
        args = (job,)
    rows = archive.index.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
    return [dict(r) | {"figures": json.loads(r["figures"] or "{}")} for r in rows]


def last_run(archive: Archive, job: str, outcomes: tuple[str, ...] = ("ok",)) -> dict | None:
    """The job's newest run with one of ``outcomes`` (default: ok), or None."""
    marks = ",".join("?" * len(outcomes))
    row = archive.index.conn.execute(
        f"SELECT started_at, ended_at, outcome, figures, error FROM job_runs WHERE job=? AND outcome IN ({marks})"
        " ORDER BY id DESC LIMIT 1", (job, *outcomes)).fetchone()
    return dict(row) if row else None


def schedule_of(config: Config, name: str) -> str:
    """The job's cron schedule as configured, ``-`` when off, ``(no target)`` for backup jobs without one."""
    if name in ("backup", "restore-test") and not config.backup.target:
        return "(no target)"
    return getattr(config.jobs, name.replace("-", "_"), "") or "-"


def jobs_table(config: Config, archive: Archive) -> list[dict]:
    """Each job with its schedule and its last run (None when it never ran), for ``jobs list`` and the
    console."""
    rows = []
    for name, job in JOBS.items():
        last = history(archive, name, 1)
        rows.append({"job": name, "doc": job.doc, "schedule": schedule_of(config, name),
                     "last": last[0] if last else None})
    return rows


def _latest_failure(archive: Archive, job: str) -> dict | None:
    """The job's newest run that ended (runs skipped or still going do not count) when it failed:
    {at, error}; else None."""
    latest = last_run(archive, job, (*FINISHED, "failed"))
    if latest and latest["outcome"] == "failed":
        return {"at": latest["started_at"], "error": latest["error"]}
    return None


def overview(config: Config, archive: Archive) -> dict:
    """What ``clinicbox status`` and the console's first screen show: disk guard, counts, backups.

    ``last_backup`` is the newest backup that ran to its end (ok, or with problems: files left out),
    ``last_verified_restore`` the newest restore test that passed; ``backup_failed`` and
    ``restore_test_failed`` the newest finished run when it failed (a backup that no longer runs or
    restores must not hide behind an older success).
    """
    state, free = archive.disk_state()
    verified = last_run(archive, "restore-test")
    backup_run = last_run(archive, "backup", FINISHED)
    return {
        "data_dir": str(config.data_dir),
        "disk": {"state": state, "free_mb": free // (1024 * 1024),
                 "warning_below_mb": config.storage.min_free_warning_mb,
                 "refusing_below_mb": config.storage.min_free_critical_mb},
        **archive.index.counts(),
        "backup_target": config.backup.target or None,
        "last_backup": backup_run["started_at"] if backup_run else None,
        "backup_failed": _latest_failure(archive, "backup"),
        "last_verified_restore": (verified["ended_at"] or verified["started_at"]) if verified else None,
        "last_verified_backup": json.loads(verified["figures"] or "{}").get("backup") if verified else None,
        "restore_test_failed": _latest_failure(archive, "restore-test"),
        "instances_not_ok": dict(archive.index.conn.execute(
            "SELECT state, count(*) FROM instances WHERE state != 'ok' GROUP BY state").fetchall()),
    }

"""The console (Textual pilot): status with the last verified restore, jobs run from it, and a snapshot."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clinicbox.archive.ingest import Archive
from clinicbox.console.app import StatusPanel, make_console
from clinicbox.console.text import status_lines, when
from clinicbox.core.config import Config
from clinicbox.jobs import runner
from clinicbox.jobs.runner import history, open_jobs
from tests.support.peers import REPO
from tests.support.synth import write_ct_series

SIZE = (130, 36)


def pilot_test(fn):
    """Run an async pilot test in its own event loop (no pytest async plugin needed)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def make_config(tmp_path: Path, *, target: bool = True, data_dir: str | None = None) -> Config:
    config = Config().with_overrides(data_dir=data_dir or str(tmp_path / "data"))
    if target:
        usb = tmp_path / "usb"
        usb.mkdir(exist_ok=True)
        config = replace(config, backup=replace(config.backup, target=str(usb)))
    return config


def fill(config: Config, folder: Path, count: int = 6) -> None:
    archive = Archive(config.storage)
    archive.open()
    try:
        for f in write_ct_series(folder, count, rows=16, cols=16):
            archive.store_file(f)
    finally:
        archive.close()


def panel(app) -> dict[str, tuple[str, str]]:
    return {label: (text, level) for label, text, level in app.query_one(StatusPanel).lines}


async def until_idle(pilot, app, timeout: float = 60.0) -> None:
    """Wait until the console's job threads have finished and their results were handled."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while app.running:
        assert loop.time() < end, f"jobs still running: {list(app.running)}"
        await pilot.pause(0.05)
    await pilot.pause()


@pilot_test
async def test_backup_and_restore_test_run_from_the_console_show_the_last_verified_restore(tmp_path):
    config = make_config(tmp_path)
    fill(config, tmp_path / "in")
    app = make_console(config, refresh_seconds=0)
    async with app.run_test(size=SIZE) as pilot:
        shown = panel(app)
        assert shown["Stored"][0].startswith("1 patients, 1 studies, 6 instances")
        assert shown["Last verified restore"][0].startswith("never") and shown["Last verified restore"][1] == "error"
        assert shown["Last backup"] == ("never", "warning")

        assert app.selected_job() == "backup"
        await pilot.press("r")
        await until_idle(pilot, app)
        await pilot.press("down")
        assert app.selected_job() == "restore-test"
        await pilot.press("r")
        await until_idle(pilot, app)

        shown = panel(app)
        assert shown["Last backup"][0] != "never"
        backup_id = history(app.archive, "backup", 1)[0]["figures"]["backup"]
        text, level = shown["Last verified restore"]
        assert level == "ok" and text.endswith(f"backup {backup_id}") and "never" not in text
        runs = [(r["job"], r["trigger"], r["outcome"]) for r in history(app.archive)]
        assert runs == [("restore-test", "console", "ok"), ("backup", "console", "ok")]
        # the tables show it too: newest run first, and the jobs' last outcome
        table = app.query_one("#history")
        assert [str(c) for c in table.get_row_at(0)[1:4]] == ["restore-test", "console", "ok"]
        assert str(app.query_one("#jobs").get_row_at(1)[3]) == "ok"


@pilot_test
async def test_a_failed_restore_test_is_shown_even_after_an_earlier_success(tmp_path):
    config = make_config(tmp_path)
    fill(config, tmp_path / "in")
    archive = Archive(config.storage)
    archive.open()
    open_jobs(archive)
    try:
        assert runner.run_job("backup", config, archive)["outcome"] == "ok"
        assert runner.run_job("restore-test", config, archive)["outcome"] == "ok"
        # damage the pool copy the restore test reads
        pool = Path(config.backup.target) / "clinicbox-backup" / "objects"
        victim = next(p for p in pool.rglob("*.dcm"))
        victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
        assert runner.run_job("restore-test", config, archive)["outcome"] == "failed"
    finally:
        archive.close()
    app = make_console(config, refresh_seconds=0)
    async with app.run_test(size=SIZE):
        shown = panel(app)
        assert shown["Last verified restore"][1] == "ok"  # the earlier success stays visible …
        text, level = shown["RESTORE TEST FAILED"]  # … but not alone
        assert level == "error" and "checksum" in text


def _slow_scrub(monkeypatch):
    release, started = threading.Event(), threading.Event()

    def slow(config, archive):
        started.set()
        assert release.wait(30)
        return {"checked": 0}

    monkeypatch.setitem(runner.JOBS, "scrub", runner.Job("scrub", "test job", slow))
    return release, started


SCRUB_ROW = list(runner.JOBS).index("scrub")


def _outcome_cell(app, row: int) -> str:
    return str(app.query_one("#jobs").get_row_at(row)[3])


async def press_run_on_scrub(pilot) -> None:
    for _ in range(SCRUB_ROW):
        await pilot.press("down")
    await pilot.press("r")


async def until_closed(pilot, app, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while app.is_running:
        assert loop.time() < end, "the console did not close"
        await pilot.pause(0.05)


@pilot_test
async def test_quit_while_a_job_runs_waits_for_it(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    release, started = _slow_scrub(monkeypatch)
    app = make_console(config, refresh_seconds=0)
    async with app.run_test(size=SIZE) as pilot:
        await press_run_on_scrub(pilot)
        assert await asyncio.to_thread(started.wait, 10)
        await pilot.press("r")  # a second press does not start a second run
        await pilot.press("f5")
        assert _outcome_cell(app, SCRUB_ROW) == "running…"
        await pilot.press("q")
        await pilot.pause(0.2)
        assert app.is_running and "scrub" in app.running
        release.set()
        await until_idle(pilot, app)
        await until_closed(pilot, app)  # closed by itself once the run ended
    runs = [(r["job"], r["trigger"], r["outcome"]) for r in _history(config)]
    assert runs == [("scrub", "console", "ok")]


@pilot_test
async def test_a_job_waiting_for_another_shows_waiting_and_quit_twice_closes(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    release, started = _slow_scrub(monkeypatch)
    app = make_console(config, refresh_seconds=0)
    async with app.run_test(size=SIZE) as pilot:
        other = open(app.config.data_dir / "jobs.lock", "a")
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's job is running
        try:
            await press_run_on_scrub(pilot)
            await pilot.pause(0.3)
            await pilot.press("f5")
            assert _outcome_cell(app, SCRUB_ROW) == "waiting…" and not started.is_set()
            await pilot.press("q", "q")  # the second q closes now; the run goes on in its thread
            await until_closed(pilot, app)
        finally:
            fcntl.flock(other, fcntl.LOCK_UN)
            other.close()
    assert await asyncio.to_thread(started.wait, 10)
    release.set()
    for thread in list(app.running.values()):
        await asyncio.to_thread(thread.join, 10)
    app.archive.close()
    assert [(r["job"], r["outcome"]) for r in _history(config)] == [("scrub", "ok")]


def _history(config: Config) -> list[dict]:
    archive = Archive(config.storage)
    archive.open()
    try:
        return history(archive)
    finally:
        archive.close()


def test_status_lines_name_every_trouble():
    now = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    status = {"disk": {"state": "critical", "free_mb": 800, "warning_below_mb": 5000, "refusing_below_mb": 1000},
              "patients": 1, "studies": 1, "instances": 3, "backup_target": None, "last_backup": None,
              "last_verified_restore": "2026-11-01T03:30:00.000+00:00", "last_verified_backup": "B1",
              "backup_failed": None, "restore_test_failed": None, "instances_not_ok": {"damaged": 2}}
    lines = {label: (text, level) for label, text, level in status_lines(status, now)}
    assert lines["Disk"][1] == "error" and "stores refused below 1,000 MB" in lines["Disk"][0]
    assert lines["Backup target"][1] == "error" and "only copy" in lines["Backup target"][0]
    assert lines["Last verified restore"] == ("2026-11-01 03:30 (22 days ago), backup B1", "warning")  # stale
    assert lines["NOT OK"][1] == "error" and "2 damaged" in lines["NOT OK"][0]
    assert when(None, now) == "never"
    assert when("2026-11-23T11:15:00+00:00", now) == "2026-11-23 11:15 (45 min ago)"


# ----------------------------------------------------------------------------------------- snapshot

FIXED_NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
RUNS = [  # in the order they ran
    ("backup", "schedule", "2026-11-22T02:00:00.000+00:00", "2026-11-22T02:03:10.000+00:00", "ok",
     '{"backup": "20261122T020000000000Z", "instances": 5100, "copied": 100, "seconds": 190.1}', ""),
    ("restore-test", "schedule", "2026-11-22T03:30:00.000+00:00", "2026-11-22T03:41:00.000+00:00", "ok",
     '{"backup": "20261122T020000000000Z", "verified": true, "instances": 5100, "seconds": 660.2}', ""),
    ("backup", "schedule", "2026-11-23T02:00:00.000+00:00", "2026-11-23T02:00:01.000+00:00", "failed", "{}",
     "backup target /mnt/usb-backup does not exist or is not mounted"),
    ("scrub", "schedule", "2026-11-23T04:00:00.000+00:00", "2026-11-23T04:01:00.000+00:00", "ok",
     '{"checked": 2000, "damaged": 0, "missing": 0, "seconds": 60.0}', ""),
]


@pytest.fixture
def fixed_console(tmp_path, monkeypatch):
    """A console over fixed job runs, fixed disk figures, a relative data dir and a fixed clock."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    config = make_config(tmp_path, target=False, data_dir="clinicbox-data")
    config = replace(config, backup=replace(config.backup, target="/mnt/usb-backup"))
    archive = Archive(config.storage)
    archive.open()
    open_jobs(archive)
    archive.writer.call(lambda conn: conn.executemany(
        "INSERT INTO job_runs (job, trigger, started_at, ended_at, outcome, figures, error) VALUES (?,?,?,?,?,?,?)",
        RUNS))
    archive.close()
    monkeypatch.setattr(Archive, "disk_state", lambda self: ("warning", 4200 * 1024 * 1024))
    return make_console(config, now=lambda: FIXED_NOW, refresh_seconds=0)


def test_snapshot_overview(fixed_console, snap_compare):
    assert snap_compare(fixed_console, terminal_size=SIZE)


def test_a_data_dir_the_console_cannot_open_is_one_clear_line(tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data dir should be")
    r = subprocess.run([sys.executable, "-m", "clinicbox", "console", "--data-dir", str(not_a_dir)],
                       capture_output=True, text=True, cwd=REPO, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr.startswith(f"clinicbox: cannot open the data dir {not_a_dir}:") and "Traceback" not in r.stderr

"""The console app: the appliance's state and its scheduled jobs (run one now, see every run).

``make_console(config)`` builds it for ``clinicbox console`` and for the tests (Textual's pilot).
A job started here runs in a thread of this process through ``jobs.runner.run_job``, under the same
per-job lock as the service's scheduler and the CLI, so runs never overlap; it is recorded with
trigger ``console``.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
from datetime import datetime
from typing import Callable

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, Label, Static

from clinicbox.archive.ingest import Archive
from clinicbox.core.config import Config
from clinicbox.jobs import runner
from clinicbox.console.text import run_details, status_lines, when

log = logging.getLogger(__name__)

_STYLE = {"ok": "", "warning": "bold yellow", "error": "bold red"}
_OUTCOME_STYLE = {"ok": "green", "failed": "bold red", "problems": "bold yellow", "skipped": "yellow",
                  "running": "cyan", "waiting": "cyan"}


def _local_now() -> datetime:
    return datetime.now().astimezone()


class StatusPanel(Static):
    """Disk guard, counts, backup target, last backup and last verified restore."""

    lines: list[tuple[str, str, str]] = []

    def show(self, status: dict, now: datetime) -> None:
        text = Text()
        lines = self.lines = status_lines(status, now)
        width = max(len(label) for label, _t, _l in lines) + 2
        for i, (label, value, level) in enumerate(lines):
            if i:
                text.append("\n")
            text.append(f"{label:<{width}}", style="bold" if level == "ok" else _STYLE[level])
            text.append(value, style=_STYLE[level])
        self.update(text)


class ClinicBoxConsole(App):
    """The office console."""

    TITLE = "ClinicBox"
    CSS = """
    StatusPanel { padding: 0 1; margin-bottom: 1; border: round $primary; height: auto; }
    .section { padding: 0 1; text-style: bold; }
    #jobs { height: auto; max-height: 8; margin-bottom: 1; }
    #history { height: 1fr; }
    """
    BINDINGS = [
        Binding("r", "run_job", "Run job now"),
        Binding("f5", "refresh", "Refresh"),
        Binding("tab", "focus_next", "Next table", show=False),
        Binding("q", "quit", "Quit"),
    ]

    class JobFinished(Message):
        def __init__(self, name: str, run: dict) -> None:
            super().__init__()
            self.name = name
            self.run = run

    def __init__(self, config: Config, *, archive: Archive | None = None, now: Callable[[], datetime] = _local_now,
                 refresh_seconds: float = 5.0) -> None:
        super().__init__()
        self.config = config
        self.now = now
        self.refresh_seconds = refresh_seconds
        self.archive: Archive | None = archive
        self.running: dict[str, threading.Thread] = {}
        self._quit_asked = False  # quit pressed while a job ran: close when it ends (or at a second press)

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield StatusPanel(id="status")
            yield Label("Jobs", classes="section")
            yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            yield Label("Recent runs", classes="section")
            yield DataTable(id="history", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.config.data_dir)
        if self.archive is None:
            self.archive = runner.open_archive(self.config)
        self.query_one("#jobs", DataTable).add_columns("Job", "Schedule", "Last run", "Outcome", "What it does")
        self.query_one("#history", DataTable).add_columns("Started", "Job", "Trigger", "Outcome", "Details")
        self.refresh_data()
        self.query_one("#jobs", DataTable).focus()
        if self.refresh_seconds:
            self.set_interval(self.refresh_seconds, self.refresh_data)

    def on_unmount(self) -> None:
        # a run still going (quit pressed twice) keeps the archive: run() waits for it, then closes it
        if self.archive is not None and not self.running:
            self.archive.close()
            self.archive = None

    # -- reading ---------------------------------------------------------------------------------

    def refresh_data(self) -> None:
        if self.archive is None:
            return
        now = self.now()
        self.query_one(StatusPanel).show(runner.overview(self.config, self.archive), now)
        jobs = self.query_one("#jobs", DataTable)
        cursor = jobs.cursor_row
        jobs.clear()
        for row in runner.jobs_table(self.config, self.archive):
            last = row["last"]
            if row["job"] in self.running:
                # its run is recorded once it has the jobs' lock: until then it waits for another job
                state = "running" if last and last["outcome"] == "running" else "waiting"
                outcome = Text(f"{state}…", style=_OUTCOME_STYLE[state])
            elif last:
                outcome = Text(last["outcome"], style=_OUTCOME_STYLE.get(last["outcome"], ""))
            else:
                outcome = Text("")
            jobs.add_row(row["job"], row["schedule"], when(last["started_at"], now) if last else "never", outcome,
                         row["doc"], key=row["job"])
        if jobs.row_count:
            jobs.move_cursor(row=min(cursor, jobs.row_count - 1))
        history = self.query_one("#history", DataTable)
        history.clear()
        for run in runner.history(self.archive, limit=100):
            history.add_row(when(run["started_at"], now, with_age=False), run["job"], run["trigger"],
                            Text(run["outcome"], style=_OUTCOME_STYLE.get(run["outcome"], "")), run_details(run))

    def action_refresh(self) -> None:
        self.refresh_data()

    # -- acting ----------------------------------------------------------------------------------

    def selected_job(self) -> str | None:
        jobs = self.query_one("#jobs", DataTable)
        if not jobs.row_count:
            return None
        return jobs.coordinate_to_cell_key(jobs.cursor_coordinate).row_key.value

    def action_run_job(self) -> None:
        name = self.selected_job()
        if name is None:
            return
        if name in self.running:
            self.notify(f"{name} is already running", severity="warning")
            return
        self.start_job(name)

    def start_job(self, name: str) -> None:
        config, archive = self.config, self.archive

        def work() -> None:
            try:
                run = runner.run_job(name, config, archive, trigger="console")
            except Exception as exc:  # run_job records job failures itself; this is the console's own
                log.exception("console: job %s could not be started", name)
                run = {"job": name, "outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}
            self.post_message(self.JobFinished(name, run))

        thread = threading.Thread(target=work, name=f"console-job-{name}")
        self.running[name] = thread
        self.notify(f"{name} started")
        thread.start()
        self.refresh_data()

    @on(JobFinished)
    def job_finished(self, message: JobFinished) -> None:
        thread = self.running.pop(message.name, None)
        if thread is not None:
            thread.join()
        run = message.run
        detail = run_details(run)
        if run["outcome"] == "ok":
            self.notify(f"{message.name} done" + (f": {detail}" if detail else ""), timeout=8)
        elif run["outcome"] == "problems":
            self.notify(f"{message.name} done, with problems: {detail}", severity="warning", timeout=30)
        elif run["outcome"] == "skipped":
            self.notify(f"{message.name} not started: {run.get('error') or 'already running'}", severity="warning")
        else:
            self.notify(f"{message.name} {run['outcome']}: {run.get('error', '')}", severity="error", timeout=30)
        self.refresh_data()
        if self._quit_asked and not self.running:
            self.exit()

    async def action_quit(self) -> None:
        if self.running and not self._quit_asked:
            names = ", ".join(self.running)
            self._quit_asked = True
            self.notify(f"{names} still running: the console closes when it ends (q again: close now, the run "
                        "goes on and the command returns when it ends)", severity="warning", timeout=30)
            return
        self.exit()


def make_console(config: Config, **kwargs) -> ClinicBoxConsole:
    """The console for ``config`` (the CLI and the tests build it here)."""
    return ClinicBoxConsole(config, **kwargs)


class _Held(logging.Handler):
    """Keeps log records while the console has the terminal (lines on stderr would tear the screen);
    they are written to stderr, as ever, when it closes."""

    def __init__(self, limit: int = 2000) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


def run(config: Config) -> int:
    try:  # before the screen is taken: a data dir this user may not open is one clear line
        archive = runner.open_archive(config)
    except (OSError, sqlite3.Error) as exc:
        print(f"clinicbox: cannot open the data dir {config.data_dir}: {exc}", file=sys.stderr)
        return 1
    root = logging.getLogger()
    saved = root.handlers[:]
    held = _Held()
    root.handlers = [held]
    app = make_console(config, archive=archive)
    try:
        app.run()
    finally:
        root.handlers = saved
        for record in held.records:
            root.handle(record)
    for name, thread in list(app.running.items()):
        print(f"clinicbox: waiting for the {name} run to end (it is recorded in jobs history)", file=sys.stderr)
        thread.join()
    if app.archive is not None:
        app.archive.close()
    return 0

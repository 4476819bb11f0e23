"""What the console says, as plain text: times in the clinic's local time with their age, the
status lines, a job run's details.  No Textual here, so it is tested on its own."""

from __future__ import annotations

from datetime import datetime, timezone

# older than this is shown as a warning: the schedule should have run it since (backups nightly,
# restore tests weekly by default)
BACKUP_STALE_DAYS = 2
RESTORE_TEST_STALE_DAYS = 8


def parse_time(iso: str | None) -> datetime | None:
    if not iso:
        return None
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def age(t: datetime, now: datetime) -> str:
    seconds = (now - t).total_seconds()
    if seconds < 0:
        return "just now"
    if seconds < 90:
        return f"{int(seconds)} s ago"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min ago"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h ago"
    return f"{round(seconds / 86400)} days ago"


def when(iso: str | None, now: datetime, *, with_age: bool = True) -> str:
    """``2026-11-23 03:30 (5 h ago)`` in local time; ``never`` for no time."""
    t = parse_time(iso)
    if t is None:
        return "never"
    local = t.astimezone(now.tzinfo) if now.tzinfo else t.astimezone()
    text = local.strftime("%Y-%m-%d %H:%M")
    return f"{text} ({age(t, now)})" if with_age else text


def status_lines(status: dict, now: datetime) -> list[tuple[str, str, str]]:
    """(label, text, level) per line of the status panel; level is ok, warning or error."""
    disk = status["disk"]
    disk_level = {"ok": "ok", "warning": "warning"}.get(disk["state"], "error")
    disk_text = (f"{disk['state']}, {disk['free_mb']:,} MB free (warning below {disk['warning_below_mb']:,} MB, "
                 f"stores refused below {disk['refusing_below_mb']:,} MB)")
    lines = [
        ("Disk", disk_text, disk_level),
        ("Stored", f"{status['patients']:,} patients, {status['studies']:,} studies, "
                   f"{status['instances']:,} instances", "ok"),
    ]
    if status["backup_target"]:
        lines.append(("Backup target", status["backup_target"], "ok"))
        last = parse_time(status["last_backup"])
        stale = last is None or (now - last).total_seconds() > BACKUP_STALE_DAYS * 86400
        lines.append(("Last backup", when(status["last_backup"], now), "warning" if stale else "ok"))
        failed = status.get("backup_failed")
        if failed:
            lines.append(("BACKUP FAILED", f"{when(failed['at'], now)}: {failed['error']}", "error"))
    else:
        lines.append(("Backup target", "NONE: this box holds the only copy (set backup.target)", "error"))
    verified = parse_time(status["last_verified_restore"])
    if verified is None:
        restore = ("never: no backup has been proven to restore yet (run restore-test)", "error")
    else:
        stale = (now - verified).total_seconds() > RESTORE_TEST_STALE_DAYS * 86400
        text = when(status["last_verified_restore"], now)
        if status.get("last_verified_backup"):
            text += f", backup {status['last_verified_backup']}"
        restore = (text, "warning" if stale else "ok")
    lines.append(("Last verified restore", *restore))
    failed = status.get("restore_test_failed")
    if failed:
        lines.append(("RESTORE TEST FAILED", f"{when(failed['at'], now)}: {failed['error']}", "error"))
    if status["instances_not_ok"]:
        bad = ", ".join(f"{n} {state}" for state, n in status["instances_not_ok"].items())
        lines.append(("NOT OK", f"{bad} (run scrub: it repairs from the backup)", "error"))
    return lines


def run_details(run: dict) -> str:
    """A job run's error, else its figures in one line."""
    if run.get("error"):
        return run["error"]
    figures = run.get("figures") or {}
    return ", ".join(f"{k} {v}" for k, v in figures.items() if k not in ("pruned", "_outcome")
                     and not isinstance(v, (dict, list)))

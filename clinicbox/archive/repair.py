"""Start-up repair: make objects/, incoming/ and the index agree again after any stop.

* ``incoming/`` leftovers are stores that never finished (no sender was told Success): removed.
* A file in ``objects/`` without an index row was placed but not yet indexed when the process
  stopped (or the index lost its last transactions to a power cut): it is indexed now.
  A file that does not parse, or whose name does not match its UID, is moved to ``quarantine/``.
* An index row whose file is gone is flagged ``state='missing'`` (never silently dropped), and a
  flagged row whose file is back is set ``ok`` again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from clinicbox.archive import index as idx
from clinicbox.archive.files import file_sha256, uid_key
from clinicbox.archive.ingest import IMPORT_PREFIX, REPAIR_LOCK, Archive
from clinicbox.archive.parse import InvalidObject, parse_file

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"


@dataclass
class RepairReport:
    incoming_removed: int = 0
    indexed: int = 0
    quarantined: list[str] = field(default_factory=list)
    missing: int = 0
    recovered: int = 0

    def __str__(self) -> str:
        return (f"removed {self.incoming_removed} unfinished incoming file(s), indexed {self.indexed} "
                f"unindexed object(s), quarantined {len(self.quarantined)}, flagged {self.missing} missing, "
                f"{self.recovered} back")


def repair(archive: Archive) -> RepairReport:
    report = RepairReport()
    with open(archive.store.root / REPAIR_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # A `clinicbox import` is writing right now: its files are not orphans. Only leftovers of
            # dead processes are cleared; objects/ and the index are reconciled at the next start.
            _clear_incoming(archive, report)
            log.warning("start-up repair: an import is running, so objects/ and the index were not "
                        "reconciled this time (%s)", report)
            return report
        return _repair(archive, report)


def _clear_incoming(archive: Archive, report: RepairReport) -> None:
    store = archive.store
    for entry in os.scandir(store.incoming):
        if _belongs_to_live_import(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            report.incoming_removed += 1
        except OSError as exc:
            log.error("cannot remove incoming leftover %s: %s", entry.name, exc)


def _repair(archive: Archive, report: RepairReport) -> RepairReport:
    store = archive.store
    _clear_incoming(archive, report)
    on_disk = set(store.iter_objects())
    indexed = archive.index.instance_paths()
    flagged = archive.index.missing_paths()

    for relpath in sorted(on_disk - indexed):
        if _index_orphan(archive, relpath):
            report.indexed += 1
        else:
            report.quarantined.append(relpath)

    gone = indexed - on_disk - flagged
    back = flagged & on_disk
    if gone or back:
        def _flag(conn):
            for p in gone:
                idx.set_instance_state(conn, p, "missing")
            for p in back:
                idx.set_instance_state(conn, p, "ok")
        archive.writer.call(_flag)
    report.missing, report.recovered = len(gone), len(back)
    for p in sorted(gone)[:20]:
        log.error("object file missing for indexed instance: %s", p)
    level = logging.WARNING if (report.indexed or report.quarantined or report.missing) else logging.INFO
    log.log(level, "start-up repair: %s (%d objects on disk)", report, len(on_disk))
    return report


def _belongs_to_live_import(name: str) -> bool:
    if not name.startswith(IMPORT_PREFIX):
        return False
    try:
        os.kill(int(name[len(IMPORT_PREFIX):].split("-", 1)[0]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _index_orphan(archive: Archive, relpath: str) -> bool:
    path = archive.store.abspath(relpath)
    try:
        parsed = parse_file(path)
        uid = parsed.get("SOPInstanceUID")
        if not uid or not uid.isascii() or not Path(relpath).name.startswith(uid_key(uid)):
            raise InvalidObject("file name does not match its SOP Instance UID")
        record = idx.record_for(parsed, path=relpath, sha256=file_sha256(path, parsed.dataset_offset),
                                calling_ae="", source="repair")

        def _insert(conn):
            row = conn.execute("SELECT path, state FROM instances WHERE sop_instance_uid=?", (uid,)).fetchone()
            if row is not None and row[1] == "ok" and archive.store.abspath(row[0]).exists():
                return False  # an uncommitted replacement of an indexed object: never acknowledged
            held = conn.execute("SELECT 1 FROM held_objects WHERE sop_instance_uid=? AND sha256=?",
                                (uid, record.sha256)).fetchone()
            if held is not None:
                return False  # an unacknowledged copy of a held object
            # through the intake hook: an object that would have been held is held now
            archive.commit_record(conn, record, replacing=row is not None)
            return True
        if archive.writer.call(_insert):
            return True
        raise InvalidObject("an unacknowledged second version of an indexed instance")
    except Exception as exc:  # unreadable for whatever reason: set aside, never stop the start-up
        dest = archive.store.root / QUARANTINE / Path(relpath).name
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
        log.error("quarantined unreadable object %s: %s", relpath, exc)
        return False

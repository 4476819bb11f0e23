"""The rolling scrub: stored files re-read against the checksums taken at ingest.

Each run checks the files checked least recently (never checked first), up to
``integrity.files_per_run``, so a large archive is covered over several nights.  A file whose data
set no longer hashes to its ingest checksum is flagged ``damaged``, a vanished one ``missing``
(both stay in the index, never silently dropped); with ``integrity.repair_from_backup`` and a
backup target holding the file intact, it is put back the way ingest places files (temporary
file in incoming/, hash checked, fsync, rename, directory fsync) and flagged ``ok`` again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from clinicbox.archive.files import dataset_sha256
from clinicbox.archive.index import utcnow
from clinicbox.archive.ingest import Archive
from clinicbox.archive.parse import InvalidObject
from clinicbox.jobs.backup import ROOT

log = logging.getLogger(__name__)


def _repair(archive: Archive, row, target: Path) -> bool:
    """Put the backup's copy of the row's file back if it hashes right; True when done."""
    relpath, sha = row["path"], row["sha256"]
    root = Path(target) / ROOT
    for source in (root / relpath, root / f"{relpath}.{sha[:16]}"):  # the same path with other content
        try:                                                            # has its checksum name
            if source.is_file() and dataset_sha256(source) == sha:
                return archive.put_back(row["tbl"], row["id"], relpath, sha, source)
        except (OSError, InvalidObject) as exc:
            log.error("repair of %s from the backup failed: %s", relpath, exc)
            return False
    return False


def scrub(archive: Archive, *, files_per_run: int = 20000, backup_target: str | Path | None = None) -> dict:
    """One scrub run; returns its figures (checked, ok, damaged, missing, repaired, problems)."""
    # indexed instances and objects held for reconciliation alike, the least recently verified first
    rows = archive.index.conn.execute(
        "SELECT * FROM (SELECT 'instances' AS tbl, id, path, sha256, sop_instance_uid, state, verified_at"
        " FROM instances WHERE state IN ('ok', 'damaged', 'missing') UNION ALL"
        " SELECT 'held_objects', id, path, sha256, sop_instance_uid, state, verified_at FROM held_objects"
        " WHERE state IN ('ok', 'damaged', 'missing'))"
        " ORDER BY verified_at IS NOT NULL, verified_at, id LIMIT ?", (files_per_run,)).fetchall()
    now = utcnow()
    updates, problems = [], []
    figures = {"checked": 0, "ok": 0, "damaged": 0, "missing": 0, "repaired": 0}
    for row in rows:
        path = archive.store.abspath(row["path"])
        figures["checked"] += 1
        try:
            state = "ok" if dataset_sha256(path) == row["sha256"] else "damaged"
        except FileNotFoundError:
            state = "missing"
        except (OSError, InvalidObject):
            state = "damaged"
        if state != "ok" and backup_target and _repair(archive, row, Path(backup_target)):
            log.warning("instance %s was %s: repaired from the backup", row["sop_instance_uid"], state)
            figures["repaired"] += 1
            state = "ok"
        elif state != "ok":
            log.error("instance %s is %s (%s): no intact copy to repair it from", row["sop_instance_uid"], state,
                      row["path"])
            problems.append({"sop_instance_uid": row["sop_instance_uid"], "path": row["path"], "state": state})
        figures[state] += 1
        updates.append((row["tbl"], (state, now, row["id"], row["path"], row["sha256"])))

    def write(conn):
        # only if the row is still the one read (not replaced or deleted while we were reading files)
        for table in ("instances", "held_objects"):
            conn.executemany(f"UPDATE {table} SET state=?, verified_at=? WHERE id=? AND path=? AND sha256=?",
                             [u for t, u in updates if t == table])

    if updates:
        archive.writer.call(write)
    figures["problems"] = problems[:50]
    if problems:
        figures["_outcome"] = "problems"
    log.info("scrub: %d checked, %d ok, %d damaged, %d missing, %d repaired from backup", figures["checked"],
             figures["ok"], figures["damaged"], figures["missing"], figures["repaired"])
    return figures

"""The print queue's tables, in the same SQLite index, by their own numbered migrations."""

from __future__ import annotations

from clinicbox.archive.index import MigrationSet

migrations = MigrationSet("clinicbox.printing")

QUEUED, DONE, WAITING = "queued", "done", "waiting"   # job: outputs pending / all done / one failed, retrying
LOST = "lost"  # job: its archive copies are gone (rejected in reconciliation, trash emptied): nothing to print
PENDING, OK, FAILED = "pending", "ok", "failed"        # one output of a job


@migrations(name="0001_print_jobs")
def _m0001(db) -> None:
    db.executescript(
        """
        CREATE TABLE print_jobs (
            id INTEGER PRIMARY KEY,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            calling_ae TEXT NOT NULL DEFAULT '',
            color INTEGER NOT NULL DEFAULT 0,
            copies INTEGER NOT NULL DEFAULT 1,
            priority TEXT NOT NULL DEFAULT 'MED',
            medium TEXT NOT NULL DEFAULT 'PAPER',
            label TEXT NOT NULL DEFAULT '',
            film TEXT NOT NULL,                   -- JSON: film box attributes, cells, image boxes -> SOP UIDs
            patient_id TEXT NOT NULL DEFAULT '',  -- from the device's procedure step; '' = not known
            patient_name TEXT NOT NULL DEFAULT '',
            accession_number TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'queued',
            next_attempt_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT '',
            pdf_path TEXT NOT NULL DEFAULT '',
            rendered_at TEXT,
            done_at TEXT,
            scratch_removed_at TEXT
        );
        CREATE INDEX print_jobs_due ON print_jobs (next_attempt_at) WHERE status != 'done';
        CREATE TABLE print_outputs (
            job_id INTEGER NOT NULL REFERENCES print_jobs (id),
            destination TEXT NOT NULL,            -- cups:QUEUE | folder:PATH | dicom:DEVICE
            status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT '',
            done_at TEXT,
            PRIMARY KEY (job_id, destination)
        );
        """
    )

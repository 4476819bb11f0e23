"""The reconciliation queue's table, in the same SQLite index, by its own numbered migrations.

An item groups the held objects of one study from one sender that claim one identity; the objects
themselves are rows of the archive's ``held_objects`` (stored durably, out of the hierarchy).
"""

from __future__ import annotations

from clinicbox.archive.index import MigrationSet

migrations = MigrationSet("clinicbox.reconcile")

HELD, ASSIGNED, NEW_PATIENT, REJECTED, EXPIRED = "held", "assigned", "new-patient", "rejected", "expired"
STATUSES = (HELD, ASSIGNED, NEW_PATIENT, REJECTED, EXPIRED)


@migrations(name="0001_reconcile_items")
def _m0001(db) -> None:
    db.executescript(
        """
        CREATE TABLE reconcile_items (
            id INTEGER PRIMARY KEY,
            status TEXT NOT NULL DEFAULT 'held',
            kind TEXT NOT NULL,                    -- conflicting | unknown
            reasons TEXT NOT NULL DEFAULT '[]',    -- JSON list of sentences
            calling_ae TEXT NOT NULL DEFAULT '',
            device_role TEXT NOT NULL DEFAULT '',
            intake TEXT NOT NULL DEFAULT '',
            patient_id TEXT NOT NULL DEFAULT '',
            issuer_of_patient_id TEXT NOT NULL DEFAULT '',
            patient_name TEXT NOT NULL DEFAULT '',
            patient_birth_date TEXT NOT NULL DEFAULT '',
            patient_sex TEXT NOT NULL DEFAULT '',
            accession_number TEXT NOT NULL DEFAULT '',
            study_instance_uid TEXT NOT NULL DEFAULT '',
            study_date TEXT NOT NULL DEFAULT '',
            study_description TEXT NOT NULL DEFAULT '',
            modality TEXT NOT NULL DEFAULT '',
            titles TEXT NOT NULL DEFAULT '',       -- document titles / series descriptions seen
            suggested_patient_id TEXT NOT NULL DEFAULT '',
            suggested_accession TEXT NOT NULL DEFAULT '',
            objects INTEGER NOT NULL DEFAULT 0,    -- objects ever held by this item
            released INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            decided_by TEXT NOT NULL DEFAULT '',
            decided_at TEXT,
            decision TEXT NOT NULL DEFAULT '{}'     -- JSON: patient/accession chosen, reject reason
        );
        CREATE INDEX reconcile_items_open ON reconcile_items (study_instance_uid) WHERE status = 'held';
        CREATE INDEX reconcile_items_status ON reconcile_items (status, decided_at);
        """
    )

"""The orders room's tables, in the same SQLite index as the archive, by their own numbered migrations."""

from __future__ import annotations

from clinicbox.archive.index import MigrationSet


migrations = MigrationSet("clinicbox.orders")

#: order and step states (PS3.4 K / F): staff cancel, MPPS moves the rest
SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED, CANCELLED = (
    "SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED", "CANCELLED")
STATUSES = (SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED, CANCELLED)
ACTIVE = (SCHEDULED, IN_PROGRESS)  # what the worklist shows
PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")


@migrations(name="0001_orders")
def _m0001(db) -> None:
    db.executescript(
        """
        CREATE TABLE order_patients (
            id INTEGER PRIMARY KEY,
            patient_id TEXT NOT NULL,
            issuer_of_patient_id TEXT NOT NULL DEFAULT '',
            patient_name TEXT NOT NULL,
            patient_birth_date TEXT NOT NULL DEFAULT '',
            patient_sex TEXT NOT NULL DEFAULT '',
            other_patient_ids TEXT NOT NULL DEFAULT '',
            medical_alerts TEXT NOT NULL DEFAULT '',
            allergies TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (patient_id, issuer_of_patient_id)
        );
        CREATE INDEX order_patients_name ON order_patients (patient_name COLLATE NOCASE);

        CREATE TABLE orders (
            id INTEGER PRIMARY KEY,
            patient_pk INTEGER NOT NULL REFERENCES order_patients (id),
            accession_number TEXT NOT NULL UNIQUE,
            study_instance_uid TEXT NOT NULL UNIQUE,
            requested_procedure_id TEXT NOT NULL,
            requested_procedure_description TEXT NOT NULL DEFAULT '',
            procedure_code_value TEXT NOT NULL DEFAULT '',
            procedure_code_scheme TEXT NOT NULL DEFAULT '',
            procedure_code_meaning TEXT NOT NULL DEFAULT '',
            priority TEXT NOT NULL DEFAULT 'ROUTINE',
            referring_physician_name TEXT NOT NULL DEFAULT '',
            requesting_physician TEXT NOT NULL DEFAULT '',
            requested_contrast_agent TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'SCHEDULED',
            created_by TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX orders_patient ON orders (patient_pk);
        CREATE INDEX orders_status ON orders (status);

        CREATE TABLE procedure_steps (
            id INTEGER PRIMARY KEY,
            order_pk INTEGER NOT NULL REFERENCES orders (id),
            step_id TEXT NOT NULL,
            modality TEXT NOT NULL,
            station_ae_titles TEXT NOT NULL,
            station_name TEXT NOT NULL DEFAULT '',
            start_date TEXT NOT NULL,
            start_time TEXT NOT NULL,
            performing_physician_name TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            location TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'SCHEDULED',
            updated_at TEXT NOT NULL,
            UNIQUE (order_pk, step_id)
        );
        CREATE INDEX procedure_steps_order ON procedure_steps (order_pk);
        -- the worklist asks for today's active steps of one modality: keep that lookup an index range
        CREATE INDEX procedure_steps_active ON procedure_steps (start_date, modality, start_time)
            WHERE status IN ('SCHEDULED', 'IN PROGRESS');

        -- every change of an order, who made it and when (append-only)
        CREATE TABLE order_events (
            id INTEGER PRIMARY KEY,
            order_pk INTEGER REFERENCES orders (id),
            at TEXT NOT NULL,
            who TEXT NOT NULL,
            what TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX order_events_order ON order_events (order_pk);

        CREATE TABLE performed_steps (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            order_pk INTEGER REFERENCES orders (id),
            step_pk INTEGER REFERENCES procedure_steps (id),
            status TEXT NOT NULL,
            calling_ae TEXT NOT NULL DEFAULT '',
            performed_station_ae TEXT NOT NULL DEFAULT '',
            modality TEXT NOT NULL DEFAULT '',
            patient_id TEXT NOT NULL DEFAULT '',
            patient_name TEXT NOT NULL DEFAULT '',
            accession_number TEXT NOT NULL DEFAULT '',
            study_instance_uid TEXT NOT NULL DEFAULT '',
            pps_id TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            start_date TEXT NOT NULL DEFAULT '',
            start_time TEXT NOT NULL DEFAULT '',
            end_date TEXT NOT NULL DEFAULT '',
            end_time TEXT NOT NULL DEFAULT '',
            discontinuation_reason TEXT NOT NULL DEFAULT '',
            series_count INTEGER NOT NULL DEFAULT 0,
            image_count INTEGER NOT NULL DEFAULT 0,
            attributes TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX performed_steps_order ON performed_steps (order_pk);

        -- the last worklist query of each device, for connectivity checks
        CREATE TABLE worklist_queries (
            ae_title TEXT PRIMARY KEY,
            host TEXT NOT NULL DEFAULT '',
            at TEXT NOT NULL,
            identifier TEXT NOT NULL,
            answers INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT ''
        );
        """
    )

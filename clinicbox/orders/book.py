"""The order book: front-desk orders in, their status out; every change recorded with who and when.

Writes go through the archive's single index writer (one SQLite writer for the whole data dir);
reads use the per-thread read connections of the archive's index.  The worklist
(:mod:`clinicbox.orders.worklist`) and MPPS (:mod:`clinicbox.orders.mpps`) work on the same tables.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import datetime

from pydicom.uid import generate_uid

from clinicbox.archive import index as idx
from clinicbox.archive.ingest import Archive
from clinicbox.orders import mpps, schema, worklist
from clinicbox.orders.history import record_event, set_order_status
from clinicbox.orders.model import NewOrder, OrderError, PatientMismatch, same_person_name, validated
from clinicbox.orders.schema import ACTIVE, CANCELLED, STATUSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Added:
    accession_number: str
    study_instance_uid: str
    requested_procedure_id: str
    step_ids: tuple[str, ...]
    patient_reused: bool


def _next_accession(conn: sqlite3.Connection, today: str) -> str:
    """``CB`` + YYMMDD + a 4-digit counter of the day: unique, 12 characters, sorts by date."""
    prefix = "CB" + today[2:]
    row = conn.execute("SELECT max(accession_number) FROM orders WHERE accession_number GLOB ?",
                       (prefix + "[0-9][0-9][0-9][0-9]*",)).fetchone()
    n = int(row[0][len(prefix):len(prefix) + 4]) + 1 if row[0] else 1
    while True:
        candidate = f"{prefix}{n:04d}"
        if not conn.execute("SELECT 1 FROM orders WHERE accession_number=?", (candidate,)).fetchone():
            return candidate
        n += 1


def _patient(conn: sqlite3.Connection, o: NewOrder, confirm: bool, who: str, now: str) -> tuple[int, bool]:
    """The order_patients row for ``o`` (reused by ID); refuse a changed name/birth date unless confirmed."""
    key = (o.patient_id, o.issuer_of_patient_id)
    row = conn.execute("SELECT id, patient_name, patient_birth_date FROM order_patients"
                       " WHERE patient_id=? AND issuer_of_patient_id=?", key).fetchone()
    known = row
    if known is None:  # not ordered before: images already in the archive may know the patient
        known = conn.execute("SELECT NULL AS id, patient_name, patient_birth_date FROM patients"
                             " WHERE patient_id=? AND issuer_of_patient_id=?", key).fetchone()
    if known is not None:
        differs = []
        if not same_person_name(known["patient_name"], o.patient_name):
            differs.append(f"name {known['patient_name']!r}")
        if o.patient_birth_date and known["patient_birth_date"] and known["patient_birth_date"] != o.patient_birth_date:
            differs.append(f"birth date {known['patient_birth_date']}")
        if differs and not confirm:
            raise PatientMismatch("patient_id", f"patient ID {o.patient_id} is already known with "
                                  f"{' and '.join(differs)}; check the ID, or confirm the change (--confirm)")
    fields = {"patient_name": o.patient_name, "patient_birth_date": o.patient_birth_date,
              "patient_sex": o.patient_sex, "other_patient_ids": "\\".join(o.other_patient_ids),
              "medical_alerts": "\\".join(o.medical_alerts), "allergies": "\\".join(o.allergies)}
    if row is not None:
        # keep what the desk did not fill in this time; take what it did
        sets = {k: v for k, v in fields.items() if v}
        conn.execute(f"UPDATE order_patients SET {', '.join(f'{k}=?' for k in sets)}, updated_at=? WHERE id=?",
                     (*sets.values(), now, row["id"]))
        if known is not None and not same_person_name(known["patient_name"], o.patient_name):
            record_event(conn, None, who, "patient changed",
                         f"patient {o.patient_id}: name changed (confirmed)")
        return row["id"], True
    cur = conn.execute(
        "INSERT INTO order_patients (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
        " patient_sex, other_patient_ids, medical_alerts, allergies, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?)", (*key, *fields.values(), now, now))
    return cur.lastrowid, known is not None


def insert_order(conn: sqlite3.Connection, o: NewOrder, *, who: str, confirm: bool = False) -> Added:
    """Write one validated order with its steps (runs in the writer's transaction)."""
    now = idx.utcnow()
    patient_pk, reused = _patient(conn, o, confirm, who, now)
    accession = o.accession_number or _next_accession(conn, datetime.now().strftime("%Y%m%d"))
    if conn.execute("SELECT 1 FROM orders WHERE accession_number=?", (accession,)).fetchone():
        raise OrderError("accession", f"accession number {accession} is already used by another order")
    study_uid = o.study_instance_uid or generate_uid()
    if conn.execute("SELECT 1 FROM orders WHERE study_instance_uid=?", (study_uid,)).fetchone():
        raise OrderError("study_uid", f"Study Instance UID {study_uid} is already used by another order")
    rp_id = o.requested_procedure_id or accession
    cur = conn.execute(
        "INSERT INTO orders (patient_pk, accession_number, study_instance_uid, requested_procedure_id,"
        " requested_procedure_description, procedure_code_value, procedure_code_scheme, procedure_code_meaning,"
        " priority, referring_physician_name, requesting_physician, requested_contrast_agent, status,"
        " created_by, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (patient_pk, accession, study_uid, rp_id, o.requested_procedure_description, o.procedure_code_value,
         o.procedure_code_scheme if o.procedure_code_value else "",
         (o.requested_procedure_description or o.procedure_code_value) if o.procedure_code_value else "",
         o.priority, o.referring_physician_name, o.requesting_physician, o.requested_contrast_agent,
         schema.SCHEDULED, who, now, now))
    order_pk = cur.lastrowid
    step_ids = []
    for i, s in enumerate(o.steps, start=1):
        step_id = s.step_id or (f"{accession}-{i}" if len(accession) <= 13 else f"SPS{order_pk}-{i}")[:16]
        step_ids.append(step_id)
        conn.execute(
            "INSERT INTO procedure_steps (order_pk, step_id, modality, station_ae_titles, station_name,"
            " start_date, start_time, performing_physician_name, description, location, status, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (order_pk, step_id, s.modality, "\\".join(s.station_ae_titles), s.station_name,
             s.start.strftime("%Y%m%d"), s.start.strftime("%H%M%S"), s.performing_physician_name,
             s.description or o.requested_procedure_description, s.location, schema.SCHEDULED, now))
    record_event(conn, order_pk, who, "created",
                 f"{len(o.steps)} step(s): " + ", ".join(f"{s.modality} on {'/'.join(s.station_ae_titles)} at "
                                                         f"{s.start:%Y-%m-%d %H:%M}" for s in o.steps))
    return Added(accession, study_uid, rp_id, tuple(step_ids), reused)


def _cancel(conn: sqlite3.Connection, accession: str, who: str, reason: str) -> str:
    row = conn.execute("SELECT id, status FROM orders WHERE accession_number=?", (accession,)).fetchone()
    if row is None:
        raise OrderError("accession", f"no order with accession number {accession}")
    if row["status"] not in ACTIVE:
        raise OrderError("accession", f"order {accession} is {row['status']}; only scheduled or in-progress "
                                      "orders can be cancelled")
    conn.execute("UPDATE procedure_steps SET status=?, updated_at=? WHERE order_pk=? AND status IN (?,?)",
                 (CANCELLED, idx.utcnow(), row["id"], *ACTIVE))
    set_order_status(conn, row["id"], CANCELLED, who, reason)
    return row["status"]


# "images received": the archive's own counts for the studies that carry the order's Study Instance
# UID or accession number, read when asked.  Nothing is written per stored image (a per-image order
# update cost ingest 15-25 % of its throughput), and re-sends, replacements and deletions count right.
_ORDER_STUDIES = ("FROM studies s WHERE s.study_instance_uid = o.study_instance_uid"
                  " OR (o.accession_number != '' AND s.accession_number = o.accession_number)")
_IMAGES = (f"(SELECT coalesce(sum(s.num_instances), 0) {_ORDER_STUDIES}) AS images,"
           f" (SELECT min(s.created_at) {_ORDER_STUDIES}) AS first_image_at,"
           f" (SELECT max(s.updated_at) {_ORDER_STUDIES}) AS last_image_at")


class OrderBook:
    """The orders room's front door (CLI, console and the DICOM doors call it)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def open(self) -> None:
        """Create or upgrade the orders tables (the archive must be open)."""
        applied = idx.migrate(self.archive.db_path, schema.migrations)
        if applied:
            log.info("orders: applied migrations %s", ", ".join(applied))

    @property
    def conn(self) -> sqlite3.Connection:
        return self.archive.index.conn

    def write(self, fn):
        return self.archive.writer.call(fn)

    # --- staff actions --------------------------------------------------------------------------

    def add(self, order: NewOrder, *, who: str, confirm: bool = False) -> Added:
        order = validated(order)
        added = self.write(lambda conn: insert_order(conn, order, who=who, confirm=confirm))
        log.info("order %s added by %s (%d step(s))", added.accession_number, who, len(added.step_ids))
        return added

    def cancel(self, accession: str, *, who: str, reason: str = "") -> str:
        was = self.write(lambda conn: _cancel(conn, accession.strip(), who, reason))
        log.info("order %s cancelled by %s (was %s)", accession, who, was)
        return was

    # --- reads ---------------------------------------------------------------------------------

    def orders(self, *, date: str | None = None, status: str | None = None, accession: str | None = None,
               limit: int = 10000) -> list[dict]:
        """Orders with their steps, newest schedule first; ``date`` is YYYYMMDD of a step's start."""
        where, args = [], []
        if status:
            status = status.upper().replace("_", " ")
            if status not in STATUSES:
                raise OrderError("status", f"{status!r} is not one of {', '.join(STATUSES)}")
            where.append("o.status = ?")
            args.append(status)
        if date:
            where.append("o.id IN (SELECT order_pk FROM procedure_steps WHERE start_date = ?)")
            args.append(date)
        if accession:
            where.append("o.accession_number = ?")
            args.append(accession)
        sql = ("SELECT o.id, o.accession_number, o.study_instance_uid, o.requested_procedure_id,"
               " o.requested_procedure_description, o.priority, o.referring_physician_name, o.status,"
               f" {_IMAGES}, o.created_by, o.created_at, o.updated_at,"
               " p.patient_id, p.patient_name, p.patient_birth_date, p.patient_sex"
               " FROM orders o JOIN order_patients p ON p.id = o.patient_pk"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY (SELECT min(start_date || start_time) FROM procedure_steps WHERE order_pk = o.id) DESC,"
                 " o.id DESC LIMIT ?")
        out = []
        for r in self.conn.execute(sql, (*args, limit)):
            order = dict(r)
            pk = order.pop("id")
            order["steps"] = [dict(s) for s in self.conn.execute(
                "SELECT step_id, modality, station_ae_titles, station_name, start_date, start_time, description,"
                " location, performing_physician_name, status FROM procedure_steps WHERE order_pk=? ORDER BY id",
                (pk,))]
            order["performed"] = [dict(s) for s in self.conn.execute(
                "SELECT sop_instance_uid, status, performed_station_ae, start_date, start_time, end_date, end_time,"
                " discontinuation_reason, series_count, image_count FROM performed_steps WHERE order_pk=?"
                " ORDER BY id", (pk,))]
            out.append(order)
        return out

    def order(self, accession: str) -> dict | None:
        rows = self.orders(accession=accession, limit=1)
        return rows[0] if rows else None

    def history(self, accession: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute(
            "SELECT e.at, e.who, e.what, e.detail FROM order_events e JOIN orders o ON o.id = e.order_pk"
            " WHERE o.accession_number=? ORDER BY e.id", (accession,))]

    def performed(self, *, unscheduled_only: bool = False) -> list[dict]:
        sql = ("SELECT ps.sop_instance_uid, ps.status, ps.calling_ae, ps.performed_station_ae, ps.modality,"
               " ps.patient_id, ps.patient_name, ps.accession_number, ps.study_instance_uid, ps.start_date,"
               " ps.start_time, ps.end_date, ps.end_time, ps.discontinuation_reason, ps.series_count,"
               " ps.image_count, o.accession_number AS order_accession, ps.created_at, ps.updated_at"
               " FROM performed_steps ps LEFT JOIN orders o ON o.id = ps.order_pk")
        if unscheduled_only:
            sql += " WHERE ps.order_pk IS NULL"
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY ps.id DESC")]

    # --- the DICOM services' calls ----------------------------------------------------------------

    def worklist(self, query, **options):
        """Answers to a worklist query (:func:`clinicbox.orders.worklist.find`), read-only."""
        return worklist.find(self.conn, query, **options)

    def record_query(self, ae_title: str, host: str, identifier_json: str, answers: int, status: str) -> None:
        """Keep the last worklist query of each device (asynchronously)."""
        def write(conn):
            conn.execute("INSERT INTO worklist_queries (ae_title, host, at, identifier, answers, status)"
                         " VALUES (?,?,?,?,?,?) ON CONFLICT (ae_title) DO UPDATE SET host=excluded.host,"
                         " at=excluded.at, identifier=excluded.identifier, answers=excluded.answers,"
                         " status=excluded.status", (ae_title, host, idx.utcnow(), identifier_json, answers, status))
        self.archive.writer.submit(write).add_done_callback(_log_failure)

    def mpps_create(self, uid: str, ds, calling_ae: str):
        return self.write(lambda conn: mpps.create(conn, uid, ds, calling_ae))

    def mpps_set(self, uid: str, ds, calling_ae: str):
        return self.write(lambda conn: mpps.update(conn, uid, ds, calling_ae))

    def last_queries(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute(
            "SELECT ae_title, host, at, identifier, answers, status FROM worklist_queries ORDER BY at DESC")]


def _log_failure(fut) -> None:  # for background writes (the last worklist query of a device)
    if fut.exception() is not None:
        log.warning("orders: a background index write failed: %s", fut.exception())

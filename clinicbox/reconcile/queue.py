"""The reconciliation queue: the intake hook that holds objects, and the decisions staff take on them.

:meth:`Reconciler.hook` is installed as the archive's intake hook: it runs inside the index
transaction that would file an object, reads who sent it (device role or per-device setting,
``[intake]``), asks :func:`clinicbox.reconcile.match.classify`, and when the object must wait it
files it under an open queue item instead (same study, same sender, same claimed identity).
The sender hears Success either way: a held object is stored as durably as any other.

Decisions — assign to a known patient (and order), accept as a new patient, reject — release or
trash the held objects and are written to the audit log with who and when.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydicom.uid import generate_uid

from clinicbox.archive import index as idx
from clinicbox.archive.ingest import Archive, StoreOutcome
from clinicbox.core.config import IntakeSettings, ReconcileSettings
from clinicbox.orders import schema as orders_schema
from clinicbox.orders.model import OrderError, dicom_date, person_name, text_value
from clinicbox.reconcile import schema
from clinicbox.archive.documents import is_document
from clinicbox.reconcile.match import MATCHED, UNKNOWN, Verdict, classify, known_patients, person_key
from clinicbox.reconcile.rewrite import rewrite

log = logging.getLogger(__name__)


class ReconcileError(Exception):
    """A decision that cannot be taken as asked; the message says why and what to do instead."""


_PATIENT_FIELDS = (("PatientID", "patient_id"), ("IssuerOfPatientID", "issuer_of_patient_id"),
                   ("PatientName", "patient_name"), ("PatientBirthDate", "patient_birth_date"),
                   ("PatientSex", "patient_sex"))


class Reconciler:
    def __init__(self, archive: Archive, intake: IntakeSettings, settings: ReconcileSettings) -> None:
        self.archive = archive
        self.intake = intake
        self.settings = settings

    def open(self) -> None:
        """Create or upgrade the queue (and the orders tables it reads); the archive must be open."""
        for migration_set in (orders_schema.migrations, schema.migrations):
            applied = idx.migrate(self.archive.db_path, migration_set)
            if applied:
                log.info("%s: applied migrations %s", migration_set.name, ", ".join(applied))

    def install(self) -> None:
        """From now on every object the archive receives goes through :meth:`hook`."""
        self.archive.intake = self.hook

    @property
    def conn(self) -> sqlite3.Connection:
        return self.archive.index.conn

    # --- intake --------------------------------------------------------------------------------

    def mode_of(self, conn: sqlite3.Connection, calling_ae: str) -> tuple[str, str]:
        """(role, intake mode) of a caller: its device row's setting, else the default for its role."""
        row = conn.execute("SELECT role, intake FROM devices WHERE ae_title=? AND added_at IS NOT NULL",
                           (calling_ae,)).fetchone()
        role = row["role"] if row is not None else "unknown"
        mode = row["intake"] if row is not None and row["intake"] else self.intake.mode_for(role)
        return role, mode

    def hook(self, conn: sqlite3.Connection, record: idx.InstanceRecord) -> int | None:
        role, mode = self.mode_of(conn, record.calling_ae)
        if record.source == "print":
            # a printed image: the patient is what the device's procedure step named, or nobody yet
            mode = "match"
            if not record.values.get("PatientID"):
                verdict = Verdict(UNKNOWN, [f"printed by {record.calling_ae or '?'}, which had no procedure step "
                                            "in progress naming the patient"])
                return self._hold(conn, record, verdict, role, "print")
        if mode == "accept":
            return None
        need_known = mode == "match" and (self.intake.match_scope == "all" or is_document(record.sop_class_uid))
        verdict = classify(conn, record.values, match_on=self.intake.match_on, need_known_patient=need_known)
        if verdict.kind == MATCHED:
            return None
        return self._hold(conn, record, verdict, role, mode)

    def _hold(self, conn: sqlite3.Connection, record: idx.InstanceRecord, verdict: Verdict, role: str,
              mode: str) -> int:
        v = record.values
        key = (record.calling_ae, v.get("StudyInstanceUID", ""), v.get("PatientID", ""), v.get("PatientName", ""),
               v.get("PatientBirthDate", ""), verdict.kind)
        now = idx.utcnow()
        title = v.get("DocumentTitle") or v.get("SeriesDescription") or ""
        row = conn.execute("SELECT id, titles FROM reconcile_items WHERE status='held' AND calling_ae=? AND"
                           " study_instance_uid=? AND patient_id=? AND patient_name=? AND patient_birth_date=?"
                           " AND kind=?", key).fetchone()
        if row is not None:
            titles = row["titles"]
            if title and title not in titles.split(" | ") and len(titles) < 500:
                titles = f"{titles} | {title}" if titles else title
            conn.execute("UPDATE reconcile_items SET objects = objects + 1, titles=?, updated_at=? WHERE id=?",
                         (titles, now, row["id"]))
            return row["id"]
        cur = conn.execute(
            "INSERT INTO reconcile_items (kind, reasons, calling_ae, device_role, intake, patient_id,"
            " issuer_of_patient_id, patient_name, patient_birth_date, patient_sex, accession_number,"
            " study_instance_uid, study_date, study_description, modality, titles, suggested_patient_id,"
            " suggested_accession, objects, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1,?,?)",
            (verdict.kind, json.dumps(verdict.reasons, ensure_ascii=False), record.calling_ae, role, mode,
             v.get("PatientID", ""), v.get("IssuerOfPatientID", ""), v.get("PatientName", ""),
             v.get("PatientBirthDate", ""), v.get("PatientSex", ""), v.get("AccessionNumber", ""),
             v.get("StudyInstanceUID", ""), v.get("StudyDate", ""), v.get("StudyDescription", ""),
             v.get("Modality", ""), title, verdict.patient_id, verdict.accession, now, now))
        log.info("reconciliation item %d opened (%s) for objects from %s", cur.lastrowid, verdict.kind,
                 record.calling_ae or record.source)
        return cur.lastrowid

    # --- reading -------------------------------------------------------------------------------

    def items(self, status: str | None = schema.HELD) -> list[dict]:
        sql = ("SELECT r.*, (SELECT count(*) FROM held_objects h WHERE h.item_id = r.id) AS held"
               " FROM reconcile_items r")
        args: tuple = ()
        if status is not None:
            sql += " WHERE r.status = ?"
            args = (status,)
        sql += " ORDER BY r.id"
        return [_item_dict(r) for r in self.conn.execute(sql, args)]

    def item(self, item_id: int) -> dict:
        row = self.conn.execute("SELECT r.*, (SELECT count(*) FROM held_objects h WHERE h.item_id = r.id) AS held"
                                " FROM reconcile_items r WHERE r.id=?", (item_id,)).fetchone()
        if row is None:
            raise ReconcileError(f"no reconciliation item {item_id} (see `clinicbox reconcile list`)")
        item = _item_dict(row)
        item["objects_held"] = [self._object_dict(r) for r in self.conn.execute(
            'SELECT id, sop_instance_uid, sop_class_uid, path, size, "values", received_at, calling_ae, state'
            " FROM held_objects WHERE item_id=? ORDER BY id", (item_id,))]
        return item

    @staticmethod
    def _object_dict(r: sqlite3.Row) -> dict:
        v = json.loads(r["values"])
        return {"held_id": r["id"], "sop_instance_uid": r["sop_instance_uid"], "sop_class_uid": r["sop_class_uid"],
                "modality": v.get("Modality", ""), "series_instance_uid": v.get("SeriesInstanceUID", ""),
                "title": v.get("DocumentTitle") or v.get("SeriesDescription", ""), "size": r["size"],
                "received_at": r["received_at"], "path": r["path"], "state": r["state"]}

    # --- decisions -----------------------------------------------------------------------------

    def _open_item(self, item_id: int) -> dict:
        item = self.item(item_id)
        if item["status"] != schema.HELD:
            raise ReconcileError(f"item {item_id} is already {item['status']} "
                                 f"(by {item['decided_by'] or '?'} at {item['decided_at'] or '?'})")
        return item

    def _target_patient(self, patient_id: str, issuer: str | None) -> sqlite3.Row:
        rows = known_patients(self.conn, patient_id, issuer or "")
        if issuer is not None:
            rows = [r for r in rows if r["issuer"] == issuer] or rows
        if not rows:
            raise ReconcileError(f"no patient with ID {patient_id} is known; check the ID, or accept the item "
                                 "as a new patient (`clinicbox reconcile new-patient`)")
        keys = {(r["issuer"], person_key(r["name"]), r["birth_date"]) for r in rows}
        if len(keys) > 1:
            raise ReconcileError(f"patient ID {patient_id} names more than one patient (issuers or names differ); "
                                 "give --issuer")
        return rows[0]

    def assign(self, item_id: int, patient_id: str, *, accession: str | None = None, issuer: str | None = None,
               who: str) -> dict:
        """File the item's objects under a known patient (and order), rewriting what they said."""
        item = self._open_item(item_id)
        target = self._target_patient(patient_id, issuer)
        patient = {"PatientID": target["patient_id"], "IssuerOfPatientID": target["issuer"],
                   "PatientName": target["name"], "PatientBirthDate": target["birth_date"]}
        sex = self._patient_sex(target["patient_id"], target["issuer"])
        if sex:
            patient["PatientSex"] = sex
        study_uid = None
        if accession:
            study_uid = self._order_study(accession, target)
        decision = {"patient_id": target["patient_id"], "accession": accession or ""}
        return self._release(item, patient, accession=accession, study_uid=study_uid, who=who,
                             status=schema.ASSIGNED, action="reconcile assign", decision=decision)

    def new_patient(self, item_id: int, *, who: str, patient_id: str | None = None, name: str | None = None,
                    birth_date: str | None = None, sex: str | None = None) -> dict:
        """Accept the item's objects as a patient nobody knew yet (optionally under a new ID or name)."""
        item = self._open_item(item_id)
        pid = (patient_id or item["patient_id"]).strip()
        if not pid:
            raise ReconcileError(f"item {item_id} has no patient ID: give one with --patient-id")
        issuer = item["issuer_of_patient_id"] if patient_id is None else ""
        if known_patients(self.conn, pid, issuer):
            raise ReconcileError(f"patient ID {pid} already belongs to a known patient: assign the item to them "
                                 "(`clinicbox reconcile assign`), or give another --patient-id")
        patient = {"PatientID": _checked(text_value, "--patient-id", pid, 64)}
        if patient_id is not None:
            patient["IssuerOfPatientID"] = ""  # a new ID is the clinic's own
        if name is not None:
            patient["PatientName"] = _checked(person_name, "--name", name)
        if birth_date is not None:
            patient["PatientBirthDate"] = _checked(dicom_date, "--birth-date", birth_date)
        if sex is not None:
            if sex not in ("M", "F", "O", ""):
                raise ReconcileError(f"--sex {sex!r} is not M, F or O")
            patient["PatientSex"] = sex
        decision = {"patient_id": pid, "new_patient": True}
        return self._release(item, patient, accession=None, study_uid=None, who=who, status=schema.NEW_PATIENT,
                             action="reconcile new-patient", decision=decision)

    def reject(self, item_id: int, *, reason: str, who: str) -> dict:
        """Keep the item's objects in the trash (still held, never queryable) for reconcile.trash_days."""
        if not reason.strip():
            raise ReconcileError("a rejection needs a reason (--reason)")
        item = self._open_item(item_id)
        now = idx.utcnow()

        def write(conn):
            cur = conn.execute("UPDATE reconcile_items SET status=?, decided_by=?, decided_at=?, decision=?,"
                               " updated_at=? WHERE id=? AND status='held'",
                               (schema.REJECTED, who, now, json.dumps({"reason": reason}), now, item_id))
            if not cur.rowcount:
                raise ReconcileError(f"item {item_id} was decided meanwhile; see `clinicbox reconcile show {item_id}`")
            self.archive.trash_held(conn, item_id)
            idx.audit(conn, who, "reconcile reject", {"item": item_id, "reason": reason, "objects": item["held"]})
        self.archive.writer.call(write)
        log.info("reconciliation item %d rejected by %s (%d objects kept %d days)", item_id, who, item["held"],
                 self.settings.trash_days)
        return {"item": item_id, "status": schema.REJECTED, "objects": item["held"],
                "expires_after_days": self.settings.trash_days}

    def expire_rejected(self, *, now: datetime | None = None, who: str = "retention job",
                        dry_run: bool = False) -> dict:
        """Remove the objects of items rejected more than reconcile.trash_days ago."""
        now = now or datetime.now(timezone.utc)
        cutoff = (now - timedelta(days=self.settings.trash_days)).isoformat(timespec="milliseconds")
        rows = self.conn.execute("SELECT id FROM reconcile_items WHERE status=? AND decided_at <= ?",
                                 (schema.REJECTED, cutoff)).fetchall()
        if dry_run:
            return {"expired_items": len(rows), "expired_objects": 0}
        removed = 0
        for (item_id,) in rows:
            held = [r[0] for r in self.conn.execute("SELECT id FROM held_objects WHERE item_id=?", (item_id,))]

            def finish(conn, item_id=item_id, n=len(held)):
                conn.execute("UPDATE reconcile_items SET status=?, updated_at=? WHERE id=?",
                             (schema.EXPIRED, idx.utcnow(), item_id))
                idx.audit(conn, who, "reconcile expire", {"item": item_id, "objects": n})
            removed += self.archive.drop_held(held, finish)
        if rows:
            log.info("reconciliation trash: %d rejected item(s) removed (%d objects)", len(rows), removed)
        return {"expired_items": len(rows), "expired_objects": removed}

    # --- releasing -----------------------------------------------------------------------------

    def _patient_sex(self, pid: str, issuer: str) -> str:
        for table in ("patients", "order_patients"):
            row = self.conn.execute(f"SELECT patient_sex FROM {table} WHERE patient_id=? AND issuer_of_patient_id=?",
                                    (pid, issuer)).fetchone()
            if row is not None and row[0]:
                return row[0]
        return ""

    def _order_study(self, accession: str, target: sqlite3.Row) -> str:
        """The Study Instance UID the chosen order (or stored study) gives; it must be the target's."""
        row = self.conn.execute(
            "SELECT o.study_instance_uid, p.patient_id, p.issuer_of_patient_id FROM orders o"
            " JOIN order_patients p ON p.id = o.patient_pk WHERE o.accession_number=?", (accession,)).fetchone()
        if row is None:
            row = self.conn.execute(
                "SELECT s.study_instance_uid, p.patient_id, p.issuer_of_patient_id FROM studies s"
                " JOIN patients p ON p.id = s.patient_pk WHERE s.accession_number=? ORDER BY s.id LIMIT 1",
                (accession,)).fetchone()
        if row is None:
            raise ReconcileError(f"no order or study has accession {accession}")
        if row[1] != target["patient_id"]:
            raise ReconcileError(f"accession {accession} belongs to another patient (ID {row[1]})")
        return row[0]

    def _study_owner(self, study_uid: str) -> tuple[str, str] | None:
        """(patient ID, issuer) of the stored study or order with this Study Instance UID."""
        row = self.conn.execute("SELECT p.patient_id, p.issuer_of_patient_id FROM studies s"
                                " JOIN patients p ON p.id = s.patient_pk WHERE s.study_instance_uid=?",
                                (study_uid,)).fetchone()
        if row is None:
            row = self.conn.execute("SELECT p.patient_id, p.issuer_of_patient_id FROM orders o"
                                    " JOIN order_patients p ON p.id = o.patient_pk WHERE o.study_instance_uid=?",
                                    (study_uid,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _accession_owner(self, accession: str) -> tuple[str, str] | None:
        """(patient ID, issuer) of the order, else the stored study, with this accession."""
        row = self.conn.execute("SELECT p.patient_id, p.issuer_of_patient_id FROM orders o"
                                " JOIN order_patients p ON p.id = o.patient_pk WHERE o.accession_number=?",
                                (accession,)).fetchone()
        if row is None:
            row = self.conn.execute("SELECT p.patient_id, p.issuer_of_patient_id FROM studies s"
                                    " JOIN patients p ON p.id = s.patient_pk WHERE s.accession_number=? LIMIT 1",
                                    (accession,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _series_study(self, series_uid: str) -> str | None:
        row = self.conn.execute("SELECT s.study_instance_uid FROM series se JOIN studies s ON s.id = se.study_pk"
                                " WHERE se.series_instance_uid=?", (series_uid,)).fetchone()
        return None if row is None else row[0]

    def _changes_for(self, values: dict, patient: dict, accession: str | None, study_uid: str | None,
                     new_uids: dict[str, str]) -> dict[str, str]:
        """What one object must say to belong to ``patient`` (and the order), never to anyone else.

        Its own accession and Study/Series Instance UIDs stay unless they belong to somebody else:
        an accession of another patient's order is cleared, a study or series already filed under
        another patient gets a new UID (the same new UID for every object of that study/series).
        """
        # who the object will belong to: an owner with another ID, or another issuer, is somebody else
        me = (patient["PatientID"], patient.get("IssuerOfPatientID", values.get("IssuerOfPatientID", "")))
        changes = dict(patient)
        if accession is not None:
            changes["AccessionNumber"] = accession
        else:
            own = values.get("AccessionNumber", "")
            owner = self._accession_owner(own) if own else None
            if owner is not None and owner != me:
                changes["AccessionNumber"] = ""
        old_study = values.get("StudyInstanceUID", "")
        if study_uid is not None:
            target_study = study_uid
        else:
            owner = self._study_owner(old_study)
            if owner is not None and owner != me:
                target_study = new_uids.setdefault(old_study, generate_uid())
            else:
                target_study = old_study
        if target_study != old_study:
            changes["StudyInstanceUID"] = target_study
        old_series = values.get("SeriesInstanceUID", "")
        filed_in = self._series_study(old_series)
        if filed_in is not None and filed_in != target_study:
            changes["SeriesInstanceUID"] = new_uids.setdefault(old_series, generate_uid())
        return changes

    def _release(self, item: dict, patient: dict, *, accession: str | None, study_uid: str | None, who: str,
                 status: str, action: str, decision: dict) -> dict:
        item_id = item["id"]
        released, new_uids = 0, {}
        now = idx.utcnow()

        def close(conn):
            # only if nothing of the item is held any more (an object may arrive while we release) and
            # nobody decided otherwise meanwhile
            cur = conn.execute(
                "UPDATE reconcile_items SET status=?, decided_by=?, decided_at=?, decision=?, released = released + ?,"
                " updated_at=? WHERE id=? AND status='held' AND NOT EXISTS"
                " (SELECT 1 FROM held_objects WHERE item_id=?)",
                (status, who, now, json.dumps(decision | {"objects": released}), released, now, item_id, item_id))
            if cur.rowcount:
                idx.audit(conn, who, action, {"item": item_id, **decision, "objects": released})
            return cur.rowcount

        # as `clinicbox import` does: a start-up repair running meanwhile waits (it would take our files
        # placed but not yet committed for orphans)
        with self.archive.importing():
            for _round in range(5):
                rows = self.conn.execute('SELECT id, path, "values", calling_ae FROM held_objects WHERE item_id=?'
                                         " ORDER BY id", (item_id,)).fetchall()
                for row in rows:
                    try:
                        self._release_one(row, patient, accession, study_uid, new_uids, who)
                    except ReconcileError:
                        raise
                    except Exception as exc:  # the object stays held; the item stays open
                        log.error("reconciliation item %d: held object %d not released: %s", item_id, row["id"], exc)
                        raise ReconcileError(f"item {item_id}: {released} object(s) released, the others still held: "
                                             f"{exc}; run the command again") from None
                    released += 1
                if self.archive.writer.call(close):
                    log.info("reconciliation item %d: %s by %s, %d object(s) released", item_id, status, who, released)
                    return {"item": item_id, "status": status, **decision, "objects": released}
                if self.item(item_id)["status"] != schema.HELD:
                    raise ReconcileError(f"item {item_id} was decided by someone else meanwhile ({released} object(s) "
                                         "released by this command)")
        raise ReconcileError(f"item {item_id}: objects keep arriving; {released} released so far, run the command again")

    def _release_one(self, row: sqlite3.Row, patient: dict, accession: str | None, study_uid: str | None,
                     new_uids: dict[str, str], who: str) -> None:
        values = json.loads(row["values"])
        changes = self._changes_for(values, patient, accession, study_uid, new_uids)
        src = self.archive.store.abspath(row["path"])
        fd, tmp = self.archive.new_incoming()
        os.close(fd)
        try:
            source = f"{row['calling_ae'] or 'unknown sender'} (reconciled by {who})"
            if not rewrite(src, tmp, changes, source=source):
                shutil.copyfile(src, tmp)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        result = self.archive.store_incoming(Path(tmp), calling_ae=row["calling_ae"], source="reconcile",
                                             releasing=row["id"])
        if result.outcome is StoreOutcome.DUPLICATE:
            self.archive.drop_held([row["id"]])  # the archive already holds this very object
        elif result.outcome is StoreOutcome.KEPT_FIRST:
            raise ReconcileError(f"the archive already holds another version of SOP Instance UID "
                                 f"{result.sop_instance_uid} (storage.duplicate_policy = keep-first); this copy "
                                 "stays held: compare them (documents export) and reject one")


def _checked(check, name: str, value: str, *args) -> str:
    try:
        return check(name, value, *args)
    except OrderError as exc:
        raise ReconcileError(str(exc)) from None


def _item_dict(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["reasons"] = json.loads(d["reasons"])
    d["decision"] = json.loads(d["decision"])
    return d

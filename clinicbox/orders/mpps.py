"""Modality Performed Procedure Step (PS3.4 F.7): N-CREATE starts it, N-SET finishes it.

The checks of PS3.4 F.7.2 live here; the DICOM door only turns a refusal into its status.  A
performed step links to its order by the Scheduled Step Attributes Sequence (accession number,
requested procedure ID, scheduled step ID, Study Instance UID); one that names no known order is
kept as *unscheduled* and shown for reconciliation.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass

from pydicom.dataset import Dataset

from clinicbox.archive import index as idx
from clinicbox.orders.history import record_event, set_order_status
from clinicbox.orders.schema import ACTIVE, COMPLETED, DISCONTINUED, IN_PROGRESS

log = logging.getLogger(__name__)

# statuses of PS3.7 C.4 / PS3.4 F.7.2 (with the Error IDs PS3.4 names where it names one)
PROCESSING_FAILURE, DUPLICATE_INSTANCE, NO_SUCH_INSTANCE = 0x0110, 0x0111, 0x0112
INVALID_ATTRIBUTE_VALUE, MISSING_ATTRIBUTE, MISSING_ATTRIBUTE_VALUE = 0x0106, 0x0120, 0x0121
NO_LONGER_UPDATABLE_ERROR_ID = 0xA710

FINAL = (COMPLETED, DISCONTINUED)
# N-CREATE Type 1 (PS3.4 Table F.7.2-1, SCU column)
_CREATE_REQUIRED = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
                    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                    "PerformedProcedureStepStatus", "Modality")
_SCHEDULED_ITEM_REQUIRED = ("StudyInstanceUID",)


class MppsRefused(Exception):
    """The request is refused; ``status`` is the DIMSE status, the message its Error Comment."""

    def __init__(self, status: int, comment: str, error_id: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # Error Comment is LO
        self.error_id = error_id


@dataclass(frozen=True)
class MppsResult:
    status: str
    order_accession: str | None  # None: unscheduled


def _require(ds: Dataset, keywords, where: str = "") -> None:
    for kw in keywords:
        if kw not in ds:
            raise MppsRefused(MISSING_ATTRIBUTE, f"{where}{kw} missing")
        elem = ds[kw]
        if elem.value in (None, "", []) or (elem.VR == "SQ" and not len(elem.value)):
            raise MppsRefused(MISSING_ATTRIBUTE_VALUE, f"{where}{kw} is empty")


def _text(ds: Dataset, kw: str) -> str:
    v = ds.get(kw, "")
    return "" if v is None else str(v)


def _series_counts(ds: Dataset) -> tuple[int, int]:
    series = ds.get("PerformedSeriesSequence") or []
    images = sum(len(s.get("ReferencedImageSequence") or []) + len(s.get("ReferencedNonImageCompositeSOPInstanceSequence") or [])
                 for s in series)
    return len(series), images


def _reason(ds: Dataset) -> str:
    seq = ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or []
    if seq:
        item = seq[0]
        return _text(item, "CodeMeaning") or _text(item, "CodeValue")
    return ""


def _attributes(ds: Dataset) -> str:
    try:
        return json.dumps(ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: ""))
    except Exception:  # an odd value must not lose the step; keep what we can say of it
        return json.dumps({"unreadable": True})


def _link(conn: sqlite3.Connection, scheduled: list[Dataset]) -> tuple[int | None, list[int]]:
    """The order (and its steps) the Scheduled Step Attributes Sequence points to, if any."""
    for item in scheduled:
        accession = _text(item, "AccessionNumber").strip()
        study_uid = _text(item, "StudyInstanceUID").strip()
        rp_id = _text(item, "RequestedProcedureID").strip()
        row = None
        if accession:
            row = conn.execute("SELECT id FROM orders WHERE accession_number=?", (accession,)).fetchone()
        if row is None and study_uid:
            row = conn.execute("SELECT id FROM orders WHERE study_instance_uid=?", (study_uid,)).fetchone()
        if row is None and rp_id:
            row = conn.execute("SELECT id FROM orders WHERE requested_procedure_id=? ORDER BY id DESC",
                               (rp_id,)).fetchone()
        if row is None:
            continue
        steps = []
        for it in scheduled:
            sid = _text(it, "ScheduledProcedureStepID").strip()
            if sid:
                s = conn.execute("SELECT id FROM procedure_steps WHERE order_pk=? AND step_id=?",
                                 (row["id"], sid)).fetchone()
                if s:
                    steps.append(s["id"])
        if not steps:
            # no step named, or a step ID the order does not have (a modality that invents its own):
            # the performed step is the order's, so it moves the order's active steps
            steps = [r["id"] for r in conn.execute(
                f"SELECT id FROM procedure_steps WHERE order_pk=? AND status IN ({','.join('?' * len(ACTIVE))})",
                (row["id"], *ACTIVE))]
        return row["id"], steps
    return None, []


def _update_order(conn: sqlite3.Connection, order_pk: int, who: str) -> None:
    """The order's status from its steps: in progress while any is; final when none is active.

    A cancelled order stays cancelled (the desk cancelled it after the modality fetched the list:
    the MPPS is kept, linked, and shows in the order's history)."""
    current = conn.execute("SELECT status FROM orders WHERE id=?", (order_pk,)).fetchone()
    if current is not None and current[0] == "CANCELLED":
        return
    states = [r[0] for r in conn.execute("SELECT status FROM procedure_steps WHERE order_pk=?", (order_pk,))]
    if IN_PROGRESS in states:
        set_order_status(conn, order_pk, IN_PROGRESS, who)
    elif states and not any(s in ACTIVE for s in states):
        final = COMPLETED if COMPLETED in states else DISCONTINUED
        set_order_status(conn, order_pk, final, who)


def create(conn: sqlite3.Connection, uid: str, ds: Dataset, calling_ae: str) -> MppsResult:
    """N-CREATE: a new performed step IN PROGRESS (runs in the writer's transaction)."""
    if conn.execute("SELECT 1 FROM performed_steps WHERE sop_instance_uid=?", (uid,)).fetchone():
        raise MppsRefused(DUPLICATE_INSTANCE, "this MPPS instance already exists")
    _require(ds, _CREATE_REQUIRED)
    status = _text(ds, "PerformedProcedureStepStatus").strip()
    if status != IN_PROGRESS:
        raise MppsRefused(INVALID_ATTRIBUTE_VALUE, f"N-CREATE status must be IN PROGRESS, not {status!r}")
    scheduled = list(ds.ScheduledStepAttributesSequence)
    for i, item in enumerate(scheduled):
        _require(item, _SCHEDULED_ITEM_REQUIRED, f"ScheduledStepAttributesSequence[{i}].")
    order_pk, step_pks = _link(conn, scheduled)
    first = scheduled[0]
    now = idx.utcnow()
    series, images = _series_counts(ds)
    conn.execute(
        "INSERT INTO performed_steps (sop_instance_uid, order_pk, step_pk, status, calling_ae, performed_station_ae,"
        " modality, patient_id, patient_name, accession_number, study_instance_uid, pps_id, description, start_date,"
        " start_time, series_count, image_count, attributes, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (uid, order_pk, step_pks[0] if step_pks else None, IN_PROGRESS, calling_ae, _text(ds, "PerformedStationAETitle"),
         _text(ds, "Modality"), _text(ds, "PatientID"), _text(ds, "PatientName"), _text(first, "AccessionNumber"),
         _text(first, "StudyInstanceUID"), _text(ds, "PerformedProcedureStepID"),
         _text(ds, "PerformedProcedureStepDescription"), _text(ds, "PerformedProcedureStepStartDate"),
         _text(ds, "PerformedProcedureStepStartTime"), series, images, _attributes(ds), now, now))
    accession = None
    if order_pk is not None:
        who = f"MPPS {calling_ae}"
        for pk in step_pks:
            conn.execute("UPDATE procedure_steps SET status=?, updated_at=? WHERE id=? AND status IN (?,?)",
                         (IN_PROGRESS, now, pk, *ACTIVE))
        _update_order(conn, order_pk, who)
        record_event(conn, order_pk, who, "performed step started", uid)
        accession = conn.execute("SELECT accession_number FROM orders WHERE id=?", (order_pk,)).fetchone()[0]
    return MppsResult(IN_PROGRESS, accession)


def update(conn: sqlite3.Connection, uid: str, ds: Dataset, calling_ae: str) -> MppsResult:
    """N-SET: change an IN PROGRESS performed step; COMPLETED or DISCONTINUED ends it."""
    row = conn.execute("SELECT id, order_pk, status, attributes FROM performed_steps WHERE sop_instance_uid=?",
                       (uid,)).fetchone()
    if row is None:
        raise MppsRefused(NO_SUCH_INSTANCE, "no such MPPS instance")
    if row["status"] in FINAL:
        raise MppsRefused(PROCESSING_FAILURE, f"MPPS is {row['status']} and may no longer be updated",
                          NO_LONGER_UPDATABLE_ERROR_ID)
    status = _text(ds, "PerformedProcedureStepStatus").strip() or IN_PROGRESS
    if status not in (IN_PROGRESS, *FINAL):
        raise MppsRefused(INVALID_ATTRIBUTE_VALUE, f"status {status!r} is not IN PROGRESS, COMPLETED or DISCONTINUED")
    try:
        merged = Dataset.from_json(row["attributes"])
    except Exception:
        merged = Dataset()
    for elem in ds:
        merged[elem.tag] = elem
    if status in FINAL:
        # PS3.4 F.7.2.2.2: the final state needs its end date and time, and what was done
        _require(merged, ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"))
        if status == COMPLETED:
            _require(merged, ("PerformedSeriesSequence",))
    series, images = _series_counts(merged)
    now = idx.utcnow()
    conn.execute(
        "UPDATE performed_steps SET status=?, end_date=?, end_time=?, discontinuation_reason=?, series_count=?,"
        " image_count=?, description=?, attributes=?, updated_at=? WHERE id=?",
        (status, _text(merged, "PerformedProcedureStepEndDate"), _text(merged, "PerformedProcedureStepEndTime"),
         _reason(merged), series, images, _text(merged, "PerformedProcedureStepDescription"), _attributes(merged),
         now, row["id"]))
    accession = None
    if row["order_pk"] is not None:
        who = f"MPPS {calling_ae}"
        if status in FINAL:
            scheduled = list(merged.get("ScheduledStepAttributesSequence") or [])
            _order_pk, step_pks = _link(conn, scheduled)
            for pk in step_pks or []:
                conn.execute("UPDATE procedure_steps SET status=?, updated_at=? WHERE id=? AND status IN (?,?)",
                             (status, now, pk, *ACTIVE))
            detail = f"{uid}: {series} series, {images} image(s)"
            if status == DISCONTINUED and _reason(merged):
                detail += f"; reason: {_reason(merged)}"
            record_event(conn, row["order_pk"], who, f"performed step {status.lower()}", detail)
            _update_order(conn, row["order_pk"], who)
        accession = conn.execute("SELECT accession_number FROM orders WHERE id=?", (row["order_pk"],)).fetchone()[0]
    return MppsResult(status, accession)

"""Thin doors: each handler turns one DIMSE request into one call on a room, and back into a status."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from clinicbox.archive.ingest import Archive, IngestError, StoreOutcome, is_no_space
from clinicbox.dicom import tuning
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

# C-STORE statuses, PS3.4 Table B.2-1
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

_STATUS_FOR_KIND = {
    "invalid": CANNOT_UNDERSTAND,
    "class-mismatch": DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "no-space": OUT_OF_RESOURCES,
    "failure": OUT_OF_RESOURCES,
}


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def handle_echo(event) -> int:
    return SUCCESS


def handle_store(event, archive: Archive) -> Dataset:
    session = session_of(event.assoc)
    session.stores_in_progress += 1
    try:
        return _store(event, archive, session)
    except Exception:  # never a traceback to the sender: a refusal, and the service stays up
        session.failed += 1
        log.exception("C-STORE %s from %s failed unexpectedly", event.request.AffectedSOPInstanceUID, session.who)
        return _status(OUT_OF_RESOURCES, "internal error; see the ClinicBox log")
    finally:
        session.stores_in_progress -= 1
        incoming = tuning.incoming_file(event)
        if incoming is not None:
            incoming.close()  # pynetdicom skips its own close when a handler raises


def _store(event, archive: Archive, session) -> Dataset:
    req = event.request
    incoming = tuning.incoming_file(event)
    uid = str(req.AffectedSOPInstanceUID or "")
    if incoming is None:  # pragma: no cover - only if the tuning sink is bypassed
        log.error("C-STORE %s from %s: no incoming file (receive sink not installed)", uid, session.who)
        return _status(OUT_OF_RESOURCES, "internal error: no receive sink")
    if incoming.error is not None:
        session.failed += 1
        reason = "out of disk space" if is_no_space(incoming.error) else f"cannot write: {incoming.error.strerror}"
        log.error("C-STORE %s from %s refused with 0xA700, %s (%s)", uid, session.who, reason, incoming.error)
        incoming.path.unlink(missing_ok=True)
        return _status(OUT_OF_RESOURCES, reason)
    try:
        incoming.sync()
        result = archive.store_incoming(
            incoming.path, calling_ae=session.calling_ae, source="network",
            expected_sop_class=str(req.AffectedSOPClassUID or ""), expected_sop_instance=uid,
            sha256=incoming.dataset_sha256, synced=True)
    except IngestError as exc:
        session.failed += 1
        status = _STATUS_FOR_KIND[exc.kind]
        reason = f"out of disk space: {exc.reason}" if exc.kind == "no-space" else exc.reason
        log.error("C-STORE %s from %s refused with 0x%04X (%s): %s", uid, session.who, status, exc.kind, reason)
        return _status(status, reason)
    except OSError as exc:
        session.failed += 1
        log.error("C-STORE %s from %s failed: %s", uid, session.who, exc)
        return _status(OUT_OF_RESOURCES, f"cannot write: {exc.strerror}")
    session.count(result)
    if result.outcome is StoreOutcome.DUPLICATE:
        log.debug("C-STORE %s from %s: identical duplicate", uid, session.who)
    return _status(SUCCESS)

"""C-GET SCP door: the archive room says which instances; they go back as stored (C-MOVE: move.py).

pynetdicom's C-GET service sends only ``Dataset`` objects (it re-encodes them).  To send each
object's stored bytes unchanged, the handler yields a :class:`StoredObject` (a ``Dataset`` that only
carries the file's identity) and the association's ``send_c_store`` is wrapped for the request:
when the peer accepted the stored transfer syntax the file is streamed as it is (pynetdicom's
chunked send), else it is decoded (pylibjpeg for compressed pixel data) and sent uncompressed,
keeping its SOP Instance UID.
"""

from __future__ import annotations

import logging
from functools import wraps
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from clinicbox.archive.ingest import Archive
from clinicbox.archive.query import QueryRefused
from clinicbox.archive.retrieve import instances_to_retrieve
from clinicbox.dicom.contexts import NATIVE_SYNTAXES
from clinicbox.dicom.find import CANCEL, PENDING, UNABLE_TO_PROCESS, read_identifier
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
}
UNCOMPRESSED = NATIVE_SYNTAXES


class StoredObject(Dataset):
    """Stands for one stored object in pynetdicom's sub-operation loop; never encoded itself."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self._clinicbox_path = path
        self._clinicbox_syntax = transfer_syntax


def _accepts(assoc, sop_class: str, syntax: str) -> bool:
    return any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax
               for cx in assoc.accepted_contexts)


def guard_responses(assoc) -> None:
    """Keep the association's own reactor from taking the C-STORE responses meant for send_c_store.

    pynetdicom's send_*() pause the reactor with a flag that can be stale (check-then-act), so under
    load the reactor sometimes takes a response itself, drops it as unexpected, and the sender waits
    out the DIMSE timeout: a C-MOVE of 500 images stalled at image 295 this way.  While one of our
    sends is in flight the reactor's non-blocking polls see an empty queue; the sender's own blocking
    read is untouched.
    """
    if getattr(assoc, "_clinicbox_guarded", False):
        return
    assoc._clinicbox_guarded = True
    dimse = assoc.dimse
    original_get = dimse.get_msg
    assoc._clinicbox_sending = False

    def get_msg(block: bool = False):
        if not block and assoc._clinicbox_sending:
            return None, None
        return original_get(block)

    dimse.get_msg = get_msg


def _wrap_send(assoc) -> None:
    if getattr(assoc, "_clinicbox_send_wrapped", False):
        return
    original = assoc.send_c_store
    guard_responses(assoc)

    @wraps(original)
    def send_c_store(dataset, *args, **kwargs):
        assoc._clinicbox_sending = True
        try:
            return _send(dataset, *args, **kwargs)
        finally:
            assoc._clinicbox_sending = False

    def _send(dataset, *args, **kwargs):
        if not isinstance(dataset, StoredObject):
            return original(dataset, *args, **kwargs)
        path, syntax = dataset._clinicbox_path, dataset._clinicbox_syntax
        if not path.exists():
            raise FileNotFoundError(f"stored file of {dataset.SOPInstanceUID} is missing")
        if _accepts(assoc, str(dataset.SOPClassUID), syntax):
            return original(path, *args, **kwargs)  # the stored bytes, streamed
        ds = pydicom.dcmread(path)
        if syntax not in UNCOMPRESSED:
            ds.decompress(generate_instance_uid=False)  # keeps the SOP Instance UID (pydicom 3)
        return original(ds, *args, **kwargs)

    assoc.send_c_store = send_c_store
    assoc._clinicbox_send_wrapped = True


def _rows(event, archive: Archive, models: dict, what: str):
    """(level, rows) for a retrieve request, or (status, None) when it cannot be answered."""
    model = models.get(str(event.request.AffectedSOPClassUID))
    level, values = read_identifier(event.identifier)
    session = session_of(event.assoc)
    try:
        return level, instances_to_retrieve(archive.index, model, level, values)
    except QueryRefused as exc:
        log.warning("%s from %s refused (0x%04X): %s", what, session.who, exc.status, exc.reason)
        return exc.status, None
    except Exception:
        log.exception("%s from %s failed", what, session.who)
        return UNABLE_TO_PROCESS, None


def _sub_operations(event, archive: Archive, rows: list[dict], what: str):
    session = session_of(event.assoc)
    for row in rows:
        if event.is_cancelled:
            log.info("%s from %s cancelled", what, session.who)
            yield CANCEL, None
            return
        path = archive.store.abspath(row["path"])
        if row["state"] != "ok" or not path.exists():
            # still yielded: sending it fails, so pynetdicom counts a failed sub-operation and lists the UID
            log.error("%s: instance %s has no readable file", what, row["sop_instance_uid"])
        yield PENDING, StoredObject(path, row["sop_class_uid"], row["sop_instance_uid"],
                                    row["transfer_syntax_uid"])


def handle_get(event, archive: Archive):
    level, rows = _rows(event, archive, MODELS, "C-GET")
    if rows is None:
        yield level, None
        return
    _wrap_send(event.assoc)
    yield len(rows)
    log.info("C-GET %s level from %s: %d instance(s)", level, session_of(event.assoc).who, len(rows))
    yield from _sub_operations(event, archive, rows, "C-GET")

"""C-GET SCP door: the archive room says which instances; they go back as stored.

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
    StudyRootQueryRetrieveInformationModelGet,
)

from clinicbox.archive.ingest import Archive
from clinicbox.archive.query import QueryRefused
from clinicbox.archive.retrieve import instances_to_retrieve
from clinicbox.dicom.find import _plain
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}
PENDING, CANCEL = 0xFF00, 0xFE00
UNABLE_TO_PROCESS = 0xC000
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")


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


def _wrap_send(assoc) -> None:
    if getattr(assoc, "_clinicbox_send_wrapped", False):
        return
    original = assoc.send_c_store

    @wraps(original)
    def send_c_store(dataset, *args, **kwargs):
        if not isinstance(dataset, StoredObject):
            return original(dataset, *args, **kwargs)
        path, syntax = dataset._clinicbox_path, dataset._clinicbox_syntax
        if _accepts(assoc, str(dataset.SOPClassUID), syntax):
            return original(path, *args, **kwargs)  # the stored bytes, streamed
        ds = pydicom.dcmread(path)
        if syntax not in UNCOMPRESSED:
            ds.decompress(generate_instance_uid=False)  # keeps the SOP Instance UID (pydicom 3)
        return original(ds, *args, **kwargs)

    assoc.send_c_store = send_c_store
    assoc._clinicbox_send_wrapped = True


def handle_get(event, archive: Archive):
    model = MODELS.get(str(event.request.AffectedSOPClassUID))
    session = session_of(event.assoc)
    identifier = event.identifier
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    values = {e.keyword: _plain(e.value) for e in identifier if e.keyword and e.VR != "SQ"}
    try:
        rows = instances_to_retrieve(archive.index, model, level, values)
    except QueryRefused as exc:
        log.warning("C-GET from %s refused (0x%04X): %s", session.who, exc.status, exc.reason)
        yield exc.status, None
        return
    except Exception:
        log.exception("C-GET from %s failed", session.who)
        yield UNABLE_TO_PROCESS, None
        return
    _wrap_send(event.assoc)
    yield len(rows)
    log.info("C-GET %s level from %s: %d instance(s)", level, session.who, len(rows))
    for row in rows:
        if event.is_cancelled:
            log.info("C-GET from %s cancelled", session.who)
            yield CANCEL, None
            return
        path = archive.store.abspath(row["path"])
        if row["state"] != "ok" or not path.exists():
            log.error("C-GET: instance %s has no readable file", row["sop_instance_uid"])
            yield PENDING, Dataset()  # counted by pynetdicom as a failed sub-operation
            continue
        yield PENDING, StoredObject(path, row["sop_class_uid"], row["sop_instance_uid"],
                                    row["transfer_syntax_uid"])

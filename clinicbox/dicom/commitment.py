"""Storage Commitment Push Model SCP: N-ACTION in, N-EVENT-REPORT out (PS3.4 J.3).

The N-ACTION is answered at once; each referenced instance is then checked (indexed and its file
verifies against the checksum taken at ingest) and the result reported with N-EVENT-REPORT on the
same association while it is open, else on a new association to the caller's address from the
device table.
"""

from __future__ import annotations

import logging
import threading

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from clinicbox.archive.ingest import Archive
from clinicbox.archive.verify import verify_instance
from clinicbox.dicom import tuning
from clinicbox.dicom.retrieve import guard_responses
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

SOP_CLASS = str(StorageCommitmentPushModel)
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1
ALL_COMMITTED, FAILURES_EXIST = 1, 2
NO_SUCH_ACTION_TYPE, MISSING_ATTRIBUTE, INVALID_ARGUMENT = 0x0123, 0x0120, 0x0115
SAME_ASSOCIATION_GRACE = 0.3  # seconds
SAME_ASSOCIATION_TIMEOUT = 5.0  # seconds to wait for the report's response on the caller's association


def handle_n_action(event, archive: Archive, our_ae_title: str):
    req = event.request
    session = session_of(event.assoc)
    if str(req.RequestedSOPClassUID) != SOP_CLASS:
        return 0x0118, None  # no such SOP class
    if req.ActionTypeID != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION_TYPE, None
    info = event.action_information
    refs = info.get("ReferencedSOPSequence") if info is not None else None
    if info is None or "TransactionUID" not in info or not refs:
        log.warning("storage commitment from %s without Transaction UID or references", session.who)
        return MISSING_ATTRIBUTE, None
    transaction = str(info.TransactionUID)
    wanted = [(str(r.get("ReferencedSOPClassUID", "")), str(r.get("ReferencedSOPInstanceUID", ""))) for r in refs]
    log.info("storage commitment %s from %s: %d instance(s)", transaction, session.who, len(wanted))
    threading.Thread(target=_report, name="commitment-report", daemon=True,
                     args=(event.assoc, archive, our_ae_title, session.calling_ae, transaction, wanted)).start()
    return 0x0000, None


def _report(assoc, archive: Archive, our_ae_title: str, caller: str, transaction: str, wanted) -> None:
    verdicts = [verify_instance(archive, cls, uid) for cls, uid in wanted]
    ds = Dataset()
    ds.TransactionUID = transaction
    committed = [v for v in verdicts if v.committed]
    failed = [v for v in verdicts if not v.committed]
    if committed:
        ds.ReferencedSOPSequence = [_ref(v) for v in committed]
    if failed:
        ds.FailedSOPSequence = [_ref(v) for v in failed]
    event_type = FAILURES_EXIST if failed else ALL_COMMITTED
    log.info("storage commitment %s: %d committed, %d failed", transaction, len(committed), len(failed))
    # A modality that will not wait for the report on this association releases it right after our
    # N-ACTION response; give it that moment, so the report does not chase a closing association.
    threading.Event().wait(SAME_ASSOCIATION_GRACE)
    if assoc.is_established and not assoc.is_released:
        # the association's own reactor must not take the report's response (pynetdicom's send_*()
        # race, as in C-MOVE), and a peer that is hanging up must not hold us for the full DIMSE timeout
        guard_responses(assoc)
        timeout = assoc.dimse_timeout
        assoc.dimse_timeout = min(timeout or SAME_ASSOCIATION_TIMEOUT, SAME_ASSOCIATION_TIMEOUT)
        assoc._clinicbox_sending = True
        try:
            status, _ = assoc.send_n_event_report(ds, event_type, SOP_CLASS, WELL_KNOWN_INSTANCE)
            if getattr(status, "Status", None) == 0x0000:
                return
        except Exception as exc:  # the peer went away meanwhile: report on a new association
            log.info("storage commitment %s: same-association report failed (%s)", transaction, exc)
        finally:
            assoc._clinicbox_sending = False
            assoc.dimse_timeout = timeout
    _report_on_new_association(archive, our_ae_title, caller, ds, event_type, transaction)


def _ref(verdict) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = verdict.sop_class_uid
    item.ReferencedSOPInstanceUID = verdict.sop_instance_uid
    if not verdict.committed:
        item.FailureReason = verdict.failure_reason
    return item


def _report_on_new_association(archive: Archive, our_ae_title: str, caller: str, ds: Dataset, event_type: int,
                               transaction: str) -> None:
    device = archive.index.device(caller)
    if device is None or not device.get("port"):
        log.error("storage commitment %s: %s closed the association and is not in the device table; "
                  "cannot report (add it with clinicbox devices add)", transaction, caller)
        return
    ae = AE(ae_title=our_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    for attempt in range(3):
        assoc = ae.associate(device["host"], device["port"], ae_title=caller, ext_neg=[role],
                             evt_handlers=[(evt.EVT_ESTABLISHED, lambda e: tuning.set_nodelay(e.assoc))])
        if assoc.is_established:
            try:
                status, _ = assoc.send_n_event_report(ds, event_type, SOP_CLASS, WELL_KNOWN_INSTANCE)
            finally:
                assoc.release()
            if getattr(status, "Status", None) == 0x0000:
                log.info("storage commitment %s reported to %s on a new association", transaction, caller)
                return
        threading.Event().wait(2 * (attempt + 1))
    log.error("storage commitment %s: could not report to %s at %s:%s", transaction, caller,
              device["host"], device["port"])

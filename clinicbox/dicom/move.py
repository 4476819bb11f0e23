"""C-MOVE SCP: the archive room names the instances, :class:`~clinicbox.dicom.scu.StoreSCU` sends them.

pynetdicom's own C-MOVE service sends every sub-operation through a requestor association
(polling, thread hand-offs: ~5 ms an image).  The association's C-MOVE requests are routed here
instead (:func:`clinicbox.dicom.tuning.route_moves`): this function answers the whole request
itself, in the association's own thread (as pynetdicom's service would): pending responses with
the counts after each sub-operation and the final response, written as ready-made PDUs
(:mod:`clinicbox.dicom.answers`), the images sent by a blocking SCU to the destination from the
device table.  Statuses follow PS3.4 C.4.2.1.5: 0xA801 unknown destination (or one that cannot
be reached), 0xA900 identifier not usable, 0xFE00 cancelled (remaining count and failed UIDs),
0xB000 some sub-operations failed, 0xA702 all failed (FailedSOPInstanceUIDList in both).
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from clinicbox.archive.ingest import Archive
from clinicbox.archive.query import QueryRefused
from clinicbox.archive.retrieve import instances_to_retrieve
from clinicbox.dicom import answers, tuning
from clinicbox.dicom.find import read_identifier
from clinicbox.dicom.scu import UNCOMPRESSED, ScuError, StoreSCU
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

C_MOVE_RSP = 0x8021
PENDING, SUCCESS, CANCEL, WARNING = 0xFF00, 0x0000, 0xFE00, 0xB000
DESTINATION_UNKNOWN, ALL_FAILED, NOT_MATCHING, UNABLE = 0xA801, 0xA702, 0xA900, 0xC000
PENDING_INTERVAL = 0.05  # seconds between pending responses (each sub-operation's, at most this often)


class _Responder:
    def __init__(self, assoc, req, context) -> None:
        self.assoc = assoc
        self.context_id = int(context.context_id)
        self.syntax = str(context.transfer_syntax)
        self.sop_class = str(req.AffectedSOPClassUID)
        self.message_id = int(req.MessageID)
        self.max_pdu = tuning.peer_max_pdu(assoc) or 0

    def send(self, status: int, counts=None, failed: list[str] | None = None) -> bool:
        data = b""
        if failed:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed
            data = encode(ds, self.syntax == ImplicitVRLittleEndian, self.syntax != ExplicitVRBigEndian)
        out = answers.pdus(self.context_id, answers.command_set(self.sop_class, C_MOVE_RSP, self.message_id, status,
                                                                bool(data), counts), True, self.max_pdu)
        if data:
            out += answers.pdus(self.context_id, data, False, self.max_pdu)
        return tuning.raw_send(self.assoc, b"".join(out))


def _cancelled(assoc, message_id: int) -> bool:
    return assoc.dimse.cancel_req.pop(message_id, None) is not None


def _contexts(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """Each SOP class in its stored syntax(es), and uncompressed to fall back on."""
    wanted: dict[str, list[str]] = {}
    for row in rows:
        syntaxes = wanted.setdefault(row["sop_class_uid"], [])
        if row["transfer_syntax_uid"] not in syntaxes:
            syntaxes.append(row["transfer_syntax_uid"])
    contexts = []
    for sop_class, syntaxes in wanted.items():
        contexts += [(sop_class, [ts]) for ts in syntaxes if ts not in UNCOMPRESSED]
        contexts.append((sop_class, list(UNCOMPRESSED)))
    return contexts[:128]


def serve_move(assoc, req, context, *, archive: Archive, our_ae_title: str, timeout: float) -> None:
    """Answer one C-MOVE request completely (responses included); never raises."""
    reply = _Responder(assoc, req, context)
    try:
        _serve(assoc, req, reply, archive, our_ae_title, timeout)
    except Exception:
        log.exception("C-MOVE from %s failed", session_of(assoc).who)
        reply.send(UNABLE)


def _serve(assoc, req, reply: _Responder, archive: Archive, our_ae_title: str, timeout: float) -> None:
    session = session_of(assoc)
    destination = str(req.MoveDestination or "").strip()
    device = archive.index.device(destination)
    if device is None or not device.get("port"):
        log.warning("C-MOVE from %s to unknown destination %r (0xA801)", session.who, destination)
        reply.send(DESTINATION_UNKNOWN)
        return
    try:
        syntax = reply.syntax
        identifier = decode(req.Identifier, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
        level, values = read_identifier(identifier)
        model = {"1.2.840.10008.5.1.4.1.2.1.2": "PATIENT", "1.2.840.10008.5.1.4.1.2.2.2": "STUDY"}.get(reply.sop_class)
        rows = instances_to_retrieve(archive.index, model, level, values)
    except QueryRefused as exc:
        log.warning("C-MOVE from %s refused (0x%04X): %s", session.who, exc.status, exc.reason)
        reply.send(exc.status)
        return
    except Exception:
        log.exception("C-MOVE from %s failed", session.who)
        reply.send(UNABLE)
        return
    if not rows:
        log.info("C-MOVE %s level from %s to %s: nothing matches", level, session.who, destination)
        reply.send(SUCCESS, (None, 0, 0, 0))
        return
    started = time.monotonic()
    scu = StoreSCU(device["host"], int(device["port"]), our_ae_title, destination, timeout=timeout)
    try:
        scu.associate(_contexts(rows))
    except ScuError as exc:
        log.warning("C-MOVE from %s: %s (0xA801)", session.who, exc)
        reply.send(DESTINATION_UNKNOWN)
        return
    log.info("C-MOVE %s level from %s to %s: %d instance(s)", level, session.who, destination, len(rows))
    completed = warning = 0
    failed: list[str] = []
    remaining = len(rows)
    lost = None
    last_pending = 0.0
    try:
        for row in rows:
            if _cancelled(assoc, reply.message_id):
                log.info("C-MOVE from %s cancelled with %d sub-operations left", session.who, remaining)
                reply.send(CANCEL, (remaining, completed, len(failed), warning), failed)
                return
            if not assoc.is_established:
                log.warning("C-MOVE from %s: the requester went away with %d sub-operations left",
                            session.who, remaining)
                return
            uid = row["sop_instance_uid"]
            path = archive.store.abspath(row["path"])
            status = None
            if row["state"] != "ok":
                log.error("C-MOVE: instance %s has no readable file (%s)", uid, row["state"])
            elif lost is None:
                try:
                    status = scu.store(path, row["sop_class_uid"], uid, row["transfer_syntax_uid"],
                                       move_originator=session.calling_ae, move_originator_id=reply.message_id)
                except FileNotFoundError:
                    log.error("C-MOVE: instance %s has no readable file (gone from %s)", uid, row["path"])
                except ScuError as exc:
                    lost = str(exc)
                    log.error("C-MOVE to %s: %s", destination, exc)
                except Exception as exc:  # unreadable header, a syntax pydicom cannot decode, …
                    log.error("C-MOVE to %s: instance %s not sent: %s", destination, uid, exc)
            remaining -= 1
            if status == 0x0000:
                completed += 1
            elif status is not None and (status & 0xF000) == 0xB000:
                warning += 1
            else:
                if status is not None:
                    log.warning("C-MOVE to %s: instance %s refused with 0x%04X", destination, uid, status)
                failed.append(uid)
            now = time.monotonic()
            if remaining and now - last_pending < PENDING_INTERVAL:
                continue  # pending responses are optional: one every PENDING_INTERVAL tells the progress
            last_pending = now
            if remaining and not reply.send(PENDING, (remaining, completed, len(failed), warning)):
                log.warning("C-MOVE from %s: the requester went away with %d sub-operations left",
                            session.who, remaining)
                return
    finally:
        if lost is None:
            scu.release()
        else:
            scu.abort()
    final = SUCCESS if not failed and not warning else (ALL_FAILED if len(failed) == len(rows) else WARNING)
    reply.send(final, (None, completed, len(failed), warning), failed)
    log.info("C-MOVE to %s done: %d completed, %d failed, %d warning in %.2f s", destination, completed,
             len(failed), warning, time.monotonic() - started)

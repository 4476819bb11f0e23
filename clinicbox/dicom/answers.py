"""C-FIND answers written to the association many at a time, encoded by a small DICOM writer.

pynetdicom sends each pending C-FIND response on its own: the identifier is encoded by pydicom,
the command set too, the message is split into PDUs and handed to the DUL thread, which writes it
to the socket, about 1 ms per answer on this hardware, so a 40-item worklist took 90 ms.  Here the
handler encodes each answer (command set: five fixed elements; identifier: the few string and
sequence elements an answer holds) and writes the P-DATA-TF PDUs of up to ~64 KB of answers in one
socket send.  Only the final response (success, cancel, failure) goes through pynetdicom, after
every pending one is on the wire, so the order on the association is unchanged.  A C-CANCEL
is seen between batches, as before between answers.

The answer stream is used only on little endian contexts (implicit or explicit VR, the syntaxes
C-FIND is negotiated on); :func:`open_stream` returns None otherwise and the handler yields its
answers to pynetdicom as usual.
"""

from __future__ import annotations

import struct

import logging

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode

from clinicbox.archive.encode import encode_dataset
from clinicbox.dicom import tuning

log = logging.getLogger(__name__)
_PACK_TAG = struct.Struct("<HH")
FLUSH_BYTES = 64 * 1024


def _element_us(tag: int, value: int) -> bytes:
    return struct.pack("<HHIH", tag >> 16, tag & 0xFFFF, 2, value)


def command_set(sop_class_uid: str, command_field: int, message_id: int, status: int,
                has_data_set: bool = True, counts: tuple[int | None, int, int, int] | None = None) -> bytes:
    """A response command set (always implicit VR little endian), group length included.

    ``counts`` (remaining, completed, failed, warning) are the sub-operation counts of C-MOVE and
    C-GET responses; remaining None leaves it out (final responses).
    """
    uid = sop_class_uid.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    body = (struct.pack("<HHI", 0x0000, 0x0002, len(uid)) + uid
            + _element_us(0x00000100, command_field)
            + _element_us(0x00000120, message_id)
            + _element_us(0x00000800, 0x0001 if has_data_set else 0x0101)
            + _element_us(0x00000900, status))
    if counts is not None:
        for tag, value in zip((0x00001020, 0x00001021, 0x00001022, 0x00001023), counts):
            if value is not None:
                body += _element_us(tag, value)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def pdus(context_id: int, data: bytes, is_command: bool, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying ``data`` as PDV fragments no larger than the peer takes."""
    room = (max_pdu - 6) if max_pdu else len(data) or 1
    room = max(room, 1)
    out = []
    for start in range(0, max(len(data), 1), room):
        chunk = data[start:start + room]
        last = start + room >= len(data)
        header = (0x01 if is_command else 0x00) | (0x02 if last else 0x00)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
        out.append(struct.pack(">BBI", 0x04, 0x00, len(pdv)) + pdv)
    return out


class AnswerStream:
    """Pending C-FIND responses for one request, batched onto the association's socket."""

    def __init__(self, event, implicit: bool, context_id: int, max_pdu: int) -> None:
        self.event = event
        self.assoc = event.assoc
        self.implicit = implicit
        self.context_id = context_id
        self.max_pdu = max_pdu
        self.sop_class = str(event.request.AffectedSOPClassUID)
        self.message_id = int(event.request.MessageID)
        self._pending: dict[int, bytes] = {}
        self._buffer: list[bytes] = []
        self._size = 0
        self._queued = 0
        self.sent = 0
        self.failed = False

    def _command(self, status: int) -> bytes:
        cmd = self._pending.get(status)
        if cmd is None:
            cmd = self._pending[status] = command_set(self.sop_class, 0x8020, self.message_id, status)
        return cmd

    def add(self, status: int, answer: Dataset | bytes) -> bool:
        """Queue one pending answer (a data set, or one already encoded for this context's syntax);
        False when the association is gone (stop answering)."""
        if self.failed:
            return False
        data = answer if isinstance(answer, bytes) else encode_dataset(answer, self.implicit)
        for pdu in (*pdus(self.context_id, self._command(status), True, self.max_pdu),
                    *pdus(self.context_id, data, False, self.max_pdu)):
            self._buffer.append(pdu)
            self._size += len(pdu)
        self._queued += 1
        if self._size >= FLUSH_BYTES:
            return self.flush()
        return True

    def flush(self) -> bool:
        if self._buffer and not self.failed:
            if tuning.raw_send(self.assoc, b"".join(self._buffer)):
                self.sent += self._queued
            else:
                self.failed = True
        self._buffer.clear()
        self._size = self._queued = 0
        return not self.failed


def open_stream(event) -> AnswerStream | None:
    """An answer stream for this C-FIND request, or None where pynetdicom must send the answers.

    A request served by :func:`serve_find` already has one: its handler gets that same stream."""
    existing = getattr(event, "stream", None)
    if existing is not None:
        return existing
    if not tuning.installed():
        return None
    ts = str(event.context.transfer_syntax)
    if ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return None
    max_pdu = tuning.peer_max_pdu(event.assoc)
    if max_pdu is None:
        return None
    return AnswerStream(event, ts == ImplicitVRLittleEndian, int(event.context.context_id), max_pdu)


class _FindEvent:
    """What our C-FIND handlers read of a pynetdicom event, for requests served by :func:`serve_find`."""

    def __init__(self, assoc, req, context) -> None:
        self.assoc = assoc
        self.request = req
        self.context = context.as_tuple
        self._identifier: Dataset | None = None
        self.stream: AnswerStream | None = None  # set by serve_find; the handler writes into it

    @property
    def identifier(self) -> Dataset:
        if self._identifier is None:
            ts = self.context.transfer_syntax
            req = self.request
            req.Identifier.seek(0)
            self._identifier = decode(req.Identifier, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)
        return self._identifier

    @property
    def is_cancelled(self) -> bool:
        return self.assoc.dimse.cancel_req.pop(int(self.request.MessageID), None) is not None


def serve_find(assoc, req, context, handler) -> None:
    """Answer one C-FIND request completely: ``handler(event)`` streams the pending answers itself
    (:func:`open_stream`) and yields the final status, which is written here the same way.

    pynetdicom's own service would encode the final response with pydicom and hand it to the DUL
    thread; nothing of the request's handling is left to it.
    """
    event = _FindEvent(assoc, req, context)
    stream = event.stream = open_stream(event)
    if stream is None:  # big endian: pynetdicom's service, as it would have been
        return tuning.pynetdicom_find(assoc, req, context)
    status = 0xC000
    try:
        for status, answer in handler(event):
            if status in (0xFF00, 0xFF01):
                stream.add(status, answer)  # only when a handler could not stream itself
                continue
            break
        stream.flush()
    except Exception:
        log.exception("C-FIND from %s failed", event.assoc.requestor.ae_title)
        status = 0xC000
    if assoc.is_established:
        tuning.raw_send(assoc, b"".join(pdus(stream.context_id, command_set(
            stream.sop_class, 0x8020, stream.message_id, int(status), False), True, stream.max_pdu)))

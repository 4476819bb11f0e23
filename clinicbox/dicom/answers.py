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

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from clinicbox.archive.encode import encode_dataset
from clinicbox.dicom import tuning

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
    """An answer stream for this C-FIND request, or None where pynetdicom must send the answers."""
    if not tuning.installed():
        return None
    ts = str(event.context.transfer_syntax)
    if ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return None
    max_pdu = tuning.peer_max_pdu(event.assoc)
    if max_pdu is None:
        return None
    return AnswerStream(event, ts == ImplicitVRLittleEndian, int(event.context.context_id), max_pdu)

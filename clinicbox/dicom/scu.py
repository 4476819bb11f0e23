"""A synchronous SCU on one socket: associate, send stored objects (or any DIMSE message), release.

C-MOVE sub-operations used pynetdicom's requestor association: per image a DIMSE message built by
pydicom, a hand-off to the DUL thread, the reactor paused and resumed, and responses noticed by
1 ms polling (about 5 ms an image; Orthanc needs 0.5).  This SCU does the same work in the calling
thread with blocking socket calls: the association PDUs are pynetdicom's own encoders and
decoders, each object's stored bytes go out as P-DATA-TF PDUs read straight from its file (or,
when the peer did not accept the stored transfer syntax, decoded by pydicom/pylibjpeg and sent
uncompressed with its SOP Instance UID kept), and the C-STORE-RSP is read from the socket.
One operation at a time, as the default (no asynchronous operations window) requires.
"""

from __future__ import annotations

import io
from collections import deque
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from clinicbox.archive.parse import dataset_offset

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
OUR_MAX_PDU = 4 * 1024 * 1024
READ_CHUNK = 1024 * 1024
_US = struct.Struct("<HHIH")


class ScuError(Exception):
    """The association could not be made or was lost; ``reason`` says how."""


@dataclass(frozen=True)
class Accepted:
    context_id: int
    sop_class: str
    transfer_syntax: str


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def store_command(sop_class: str, sop_instance: str, message_id: int, move_originator: str = "",
                  move_originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, group length first)."""
    body = (_element(0x00000002, sop_class.encode())
            + _US.pack(0, 0x0100, 2, 0x0001)              # CommandField: C-STORE-RQ
            + _US.pack(0, 0x0110, 2, message_id & 0xFFFF)
            + _US.pack(0, 0x0700, 2, 0x0000)              # Priority: MEDIUM
            + _US.pack(0, 0x0800, 2, 0x0001)              # a data set follows
            + _element(0x00001000, sop_instance.encode()))
    if move_originator:
        body += _element(0x00001030, move_originator.ljust(16).encode()[:16])
        body += _US.pack(0, 0x1031, 2, (move_originator_id or 0) & 0xFFFF)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def command_value(command: bytes, element: int) -> int | None:
    """The US value of element (0000,``element``) of an implicit VR command set, e.g. 0x0900 Status."""
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, pos)
        if (group, elem) == (0, element) and length == 2:
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    return None


def find_command(sop_class: str, message_id: int) -> bytes:
    """A C-FIND-RQ command set (an identifier follows)."""
    body = (_element(0x00000002, sop_class.encode())
            + _US.pack(0, 0x0100, 2, 0x0020)
            + _US.pack(0, 0x0110, 2, message_id & 0xFFFF)
            + _US.pack(0, 0x0700, 2, 0x0000)
            + _US.pack(0, 0x0800, 2, 0x0001))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


class Scu:
    def __init__(self, host: str, port: int, calling_ae: str, called_ae: str, timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.accepted: list[Accepted] = []
        self.peer_max_pdu = 0
        self._message_id = 0
        self._pdvs: deque = deque()

    # --- association -------------------------------------------------------------------------

    def associate(self, contexts: list[tuple[str, list[str]]]) -> None:
        """Open the connection and negotiate ``contexts`` ((SOP class, [transfer syntaxes]) pairs)."""
        prim = A_ASSOCIATE()
        prim.application_context_name = APPLICATION_CONTEXT
        prim.calling_ae_title = self.calling_ae
        prim.called_ae_title = self.called_ae
        proposed = []
        for n, (sop_class, syntaxes) in enumerate(contexts[:128]):
            cx = PresentationContext()
            cx.context_id = 2 * n + 1
            cx.abstract_syntax = sop_class
            cx.transfer_syntax = list(syntaxes)
            proposed.append(cx)
        prim.presentation_context_definition_list = proposed
        length = MaximumLengthNotification()
        length.maximum_length_received = OUR_MAX_PDU
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = "CLINICBOX"
        prim.user_information = [length, impl_uid, impl_name]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(prim)
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(rq.encode())
            kind, body = self._read_pdu()
        except OSError as exc:
            self.close()
            raise ScuError(f"cannot connect to {self.called_ae} at {self.host}:{self.port}: {exc}") from None
        if kind == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(body)
            self.close()
            raise ScuError(f"{self.called_ae} rejected the association (result {rj.result}, "
                           f"source {rj.source}, reason {rj.reason_diagnostic})")
        if kind != 0x02:
            self.close()
            raise ScuError(f"{self.called_ae} answered the association request with PDU type {kind:#x}")
        try:
            ac = A_ASSOCIATE_AC()
            ac.decode(body)
            result = ac.to_primitive()
        except Exception as exc:  # a malformed A-ASSOCIATE-AC: no association, no open socket left
            self.abort()
            raise ScuError(f"{self.called_ae} sent an A-ASSOCIATE-AC we cannot read: {exc}") from None
        by_id = {cx.context_id: cx for cx in proposed}
        for cx in result.presentation_context_definition_results_list:
            if cx.result == 0 and cx.context_id in by_id:
                self.accepted.append(Accepted(cx.context_id, str(by_id[cx.context_id].abstract_syntax),
                                              str(cx.transfer_syntax[0])))
        for item in result.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)

    def context_for(self, sop_class: str, syntax: str) -> Accepted | None:
        """The accepted context for sending ``syntax`` as is, else one taking it uncompressed."""
        same = [a for a in self.accepted if a.sop_class == sop_class]
        for a in same:
            if a.transfer_syntax == syntax:
                return a
        for ts in UNCOMPRESSED:
            for a in same:
                if a.transfer_syntax == ts:
                    return a
        return None

    def release(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendall(b"\x05\x00" + struct.pack(">I", 4) + b"\0\0\0\0")
            self._read_pdu()  # A-RELEASE-RP
        except (OSError, ScuError):
            pass
        self.close()

    def abort(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(b"\x07\x00" + struct.pack(">I", 4) + b"\0\0\0\0")
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    # --- PDUs --------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ScuError("the destination closed the connection")
            buf += chunk
        return bytes(buf)

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        kind, length = header[0], struct.unpack(">I", header[2:6])[0]
        if length > OUR_MAX_PDU + 1024 or (kind != 0x04 and length > 1 << 20):
            raise ScuError(f"the destination sent a PDU of {length} bytes (we take {OUR_MAX_PDU})")
        return kind, header + self._recv_exact(length) if kind in (0x02, 0x03) else self._recv_exact(length)

    def _room(self) -> int:
        """The most data one PDV of ours carries: the peer's limit, and at most READ_CHUNK."""
        room = (self.peer_max_pdu - 6) if self.peer_max_pdu else READ_CHUNK
        return max(min(room, READ_CHUNK), 1)

    @staticmethod
    def _pdu(context_id: int, data: bytes, header: int) -> bytes:
        return struct.pack(">BBIIBB", 0x04, 0, len(data) + 6, len(data) + 2, context_id, header) + data

    def _send_pdvs(self, context_id: int, data, is_command: bool) -> None:
        """Send ``data`` (bytes, or a file positioned at the data set) as PDV fragments."""
        room = self._room()
        flag = 0x01 if is_command else 0x00
        if isinstance(data, (bytes, bytearray)):
            reader = io.BytesIO(data)
        else:
            reader = data
        chunk = reader.read(room)
        while True:
            nxt = reader.read(room)
            last = not nxt
            pdv = struct.pack(">IBB", len(chunk) + 2, context_id, flag | (0x02 if last else 0x00))
            self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv) + len(chunk)) + pdv + chunk)
            if last:
                return
            chunk = nxt

    def read_message(self) -> tuple[bytes, bytes | None]:
        """The next DIMSE message from the peer: (command set, data set or None)."""
        command, data = bytearray(), bytearray()
        while True:
            if not self._pdvs:
                kind, body = self._read_pdu()
                if kind == 0x07:
                    raise ScuError("the peer aborted the association")
                if kind != 0x04:
                    raise ScuError(f"unexpected PDU type {kind:#x} from the peer")
                pos = 0
                while pos + 6 <= len(body):  # a PDU may carry several PDVs, even of two messages
                    length = struct.unpack_from(">I", body, pos)[0]
                    self._pdvs.append((body[pos + 5], body[pos + 6:pos + 4 + length]))
                    pos += 4 + length
                continue
            header, fragment = self._pdvs.popleft()
            if header & 0x01:
                command += fragment
                if header & 0x02 and command_value(bytes(command), 0x0800) == 0x0101:
                    return bytes(command), None
            else:
                data += fragment
                if header & 0x02:
                    return bytes(command), bytes(data)

    def send_message(self, context_id: int, command: bytes, data: bytes | None = None) -> None:
        self._send_pdvs(context_id, command, True)
        if data is not None:
            self._send_pdvs(context_id, data, False)

    def _read_response(self) -> int:
        command, _data = self.read_message()
        status = command_value(command, 0x0900)
        if status is None:
            raise ScuError("response without a status")
        return status

    # --- storing -----------------------------------------------------------------------------

    def store(self, path: Path, sop_class: str, sop_instance: str, syntax: str, *, move_originator: str = "",
              move_originator_id: int | None = None) -> int:
        """Send one stored object; return the destination's C-STORE status.

        Raises :class:`ScuError` when the association is lost, :class:`LookupError` when no
        accepted context can carry it, OSError when its file cannot be read.
        """
        context = self.context_for(sop_class, syntax)
        if context is None:
            raise LookupError(f"the destination accepted no context for {sop_class} in {syntax} or uncompressed")
        self._message_id = self._message_id % 65535 + 1
        command = store_command(sop_class, sop_instance, self._message_id, move_originator, move_originator_id)
        try:
            if context.transfer_syntax == syntax:
                with open(path, "rb") as fh:
                    fh.seek(dataset_offset(fh))
                    room = self._room()
                    data = fh.read(room + 1)
                    if len(data) <= room:  # the usual small object: command and data set in one send
                        self.sock.sendall(self._pdu(context.context_id, command, 0x03)
                                          + self._pdu(context.context_id, data, 0x02))
                    else:
                        self._send_pdvs(context.context_id, command, True)
                        self._send_pdvs(context.context_id, _Chained(data, fh), False)
            else:
                data = _converted(path, context.transfer_syntax)
                self._send_pdvs(context.context_id, command, True)
                self._send_pdvs(context.context_id, data, False)
            return self._read_response()
        except OSError as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            raise ScuError(f"connection to the destination lost: {exc}") from None


StoreSCU = Scu


class _Chained:
    """Bytes already read from a file, then the rest of the file: one reader for _send_pdvs."""

    def __init__(self, first: bytes, fh) -> None:
        self._first = io.BytesIO(first)
        self._fh = fh

    def read(self, n: int) -> bytes:
        data = self._first.read(n)
        if len(data) < n:
            data += self._fh.read(n - len(data))
        return data


def _converted(path: Path, syntax: str) -> bytes:
    """The object decoded (pylibjpeg) and encoded in an uncompressed ``syntax``, same UIDs."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID not in UNCOMPRESSED:
        ds.decompress(generate_instance_uid=False)  # pydicom 3 would give it a new UID otherwise
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    return buf.getvalue()

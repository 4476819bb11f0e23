"""The one place that reaches into pynetdicom internals, and why.

1. **Received objects go straight to ``incoming/``.**  With ``STORE_RECV_CHUNKED_DATASET``
   pynetdicom streams each C-STORE data set into a ``NamedTemporaryFile`` in the system temp
   dir.  We swap that factory (``pynetdicom.dimse_messages.NamedTemporaryFile``) for
   :class:`IncomingFile`, which writes into the receiving AE's ``incoming/`` (same filesystem
   as ``objects/``, so storing is a rename), hashes the data set while it arrives (no second
   read) and turns a full disk into a flag, so the handler can answer 0xA700 instead of the
   association being aborted mid-transfer.
2. **Wake on events instead of polling.**  pynetdicom's DUL and association reactors poll with
   fixed 1 ms sleeps, about 3 ms of pure waiting per stored image.  Their ``time.sleep`` is
   replaced by waits that end as soon as there is work: the DUL thread ``select``s on its socket
   and on a wake-up socketpair written by its outgoing queue; the association thread waits on
   its DIMSE message queue.  The 1 ms timeout stays as the upper bound, so timers are checked
   as often as before and an idle association costs no more CPU than stock pynetdicom; short
   spin-sleeps (tried first) cost 8 threads x 20,000 wake-ups a second with 4 senders.
3. **C-FIND and C-MOVE answered by ClinicBox.**  ``QueryRetrieveServiceClass.SCP`` and
   ``BasicWorklistManagementServiceClass.SCP`` hand an association's C-FIND and C-MOVE requests to
   the functions set with :func:`route` (``clinicbox.dicom.answers.serve_find``,
   ``clinicbox.dicom.move.serve_move``), which answer them completely; C-GET still goes to
   pynetdicom's service.
4. **C-FIND answers in batches.**  :mod:`clinicbox.dicom.answers` writes pending C-FIND
   responses as ready-made P-DATA-TF PDUs straight to the association's socket
   (:func:`raw_send`), many per send, instead of one DIMSE message per answer through the DUL
   thread.  Only the association's own reactor thread does this, while it serves the request,
   so nothing else writes DIMSE data on that association meanwhile.
5. **Receive in large reads.**  ``AssociationSocket.recv`` read PDUs 4 KB at a time (128
   ``recv`` calls per 0.5 MB image); ours reads up to 256 KB per call, and refuses a PDU that
   claims more than the maximum length we announced (a hostile length no longer grows memory).

:func:`install` checks that the internals look as expected and raises :class:`RuntimeError`
naming what changed otherwise; ``tests/test_tuning.py`` runs it against the installed version.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul
from pynetdicom import dimse as _dimse
from pynetdicom import service_class as _service_class
from pynetdicom import transport as _transport
from pynetdicom.dimse_primitives import C_FIND as _C_FIND
from pynetdicom.dimse_primitives import C_MOVE as _C_MOVE

_REACTOR_POLL = 0.001     # the reactors' poll sleep; other sleeps (busy waits, kill/abort loops) stay real
_RECV_CHUNK = 256 * 1024

_original_ntf = _dimse_messages.NamedTemporaryFile
SWITCH_INTERVAL = 0.001
_original_qr_scp = _service_class.QueryRetrieveServiceClass.SCP
_original_mwl_scp = _service_class.BasicWorklistManagementServiceClass.SCP
_sinks: "weakref.WeakKeyDictionary[object, Callable[[], IncomingFile]]" = weakref.WeakKeyDictionary()
_installed = False


class IncomingFile:
    """A write-only file in incoming/ that pynetdicom fills with one received C-STORE object.

    Quacks like the ``NamedTemporaryFile`` pynetdicom expects (``write``, ``file.flush``, ``name``,
    ``close``).  The SHA-256 of the data set part (after the file meta) is computed as bytes arrive.
    A write error (disk full) is kept in :attr:`error`, the partial file is truncated to free
    space, and later writes are dropped, so the association survives and the handler can refuse.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.name = str(path)
        self.path = path
        self.error: OSError | None = None
        self.bytes_received = 0
        self._head = bytearray()
        self._meta_end: int | None = None
        self._hash = hashlib.sha256()
        self.handled = False  # a C-STORE handler took it (pynetdicom then closes and unlinks it)
        self._finalizer = weakref.finalize(self, _close_fd, fd)

    @property
    def file(self) -> "IncomingFile":
        return self

    def flush(self) -> None:
        pass

    def write(self, data: bytes) -> int:
        n = len(data)
        if self.error is not None or self._fd is None:
            return n
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self.error = exc
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            return n
        self._digest(data)
        self.bytes_received += n
        return n

    def _digest(self, data: bytes) -> None:
        """Hash the bytes that lie past the file meta (its end is known once 144 bytes are in)."""
        start = self.bytes_received  # offset of ``data`` in the file
        if self._meta_end is None:
            self._head += data[: max(0, 144 - start)]
            if len(self._head) < 144:
                return
            # 128-byte preamble, "DICM", then (0002,0000) UL group length: value at bytes 140..144
            (group_length,) = struct.unpack_from("<I", self._head, 140)
            self._meta_end = 144 + group_length
            self._head = bytearray()
        skip = self._meta_end - start
        if skip <= 0:
            self._hash.update(data)
        elif skip < len(data):
            self._hash.update(memoryview(data)[skip:])

    @property
    def dataset_sha256(self) -> str | None:
        """SHA-256 of the data set bytes, or None if the file meta never arrived whole."""
        return self._hash.hexdigest() if self._meta_end is not None else None

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            self._finalizer.detach()
            os.close(self._fd)
            self._fd = None


_unfinished: "weakref.WeakKeyDictionary[object, list[IncomingFile]]" = weakref.WeakKeyDictionary()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def register_sink(ae: object, new_file: Callable[[], tuple[int, Path]]) -> None:
    """Route C-STOREs received by ``ae`` into files made by ``new_file()`` -> (fd, path)."""
    _sinks[ae] = lambda: IncomingFile(*new_file())


def discard_unfinished(assoc) -> int:
    """Remove the partial files of objects ``assoc`` was receiving when it ended; return how many."""
    removed = 0
    for f in _unfinished.pop(assoc, []):
        if f.handled:
            continue
        f.close()
        try:
            os.unlink(f.path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _current_association():
    thread = threading.current_thread()
    if isinstance(thread, _association.Association):
        return thread
    return getattr(thread, "assoc", None)


class _Discard:
    """Stands in for a file when a C-STORE names a presentation context that was never accepted:
    pynetdicom fails on that right after creating the file, so nothing must be created."""

    name = os.devnull

    @property
    def file(self):
        return self

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _named_temporary_file(*args, **kwargs):
    assoc = _current_association()
    sink = _sinks.get(getattr(assoc, "ae", None)) if assoc is not None else None
    if sink is None:
        return _original_ntf(*args, **kwargs)
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    if getattr(message, "context_id", None) not in getattr(assoc, "_accepted_cx", {}):
        return _Discard()
    f = sink()
    files = _unfinished.setdefault(assoc, [])
    files[:] = [x for x in files if not x.handled]
    files.append(f)
    return f


def receiving(assoc) -> bool:
    """True while ``assoc`` has an object on the wire (its data set partly received)."""
    return any(not f.handled for f in _unfinished.get(assoc, ()))


def incoming_file(event) -> IncomingFile | None:
    """The :class:`IncomingFile` behind a C-STORE event, if it was received through our sink."""
    f = getattr(event.request, "_dataset_file", None)
    if not isinstance(f, IncomingFile):
        return None
    f.handled = True
    return f


def last_receive_age(assoc) -> float:
    """Seconds since ``assoc`` last received data (large when unknown)."""
    dul = getattr(assoc, "dul", None)
    timer = getattr(dul, "_idle_timer", None)
    start = getattr(timer, "_start_time", None)
    return time.time() - start if start is not None else 1e9


class _WakingQueue(queue.Queue):
    """The DUL's outgoing queue: every put also wakes the DUL thread out of its select."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        try:
            self._wake.send(b"\0")
        except OSError:  # already signalled (buffer full) or closed: either way nothing to do
            pass


def set_nodelay(assoc) -> None:
    """TCP_NODELAY on an association's socket (both our accepted and our requested connections)."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def prepare_association(assoc) -> None:
    """Give a new association (before its threads start) its wake-up channel."""
    dul = assoc.dul
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    dul.to_provider_queue = _WakingQueue(w)
    dul._clinicbox_wake = (r, w)


def release_association(assoc) -> None:
    """The connection closed: free the wake-up channel, and if no A-ASSOCIATE-RQ ever came, end
    the association thread now.  (It would otherwise wait out the ACSE timeout, and enough broken
    or hostile connections waiting so would lock real modalities out.)"""
    pair = getattr(assoc.dul, "_clinicbox_wake", None)
    if pair:
        for s in pair:
            s.close()
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)  # read by run_reactor as "timed out waiting for the request"


def _dul_wait(dul, seconds: float) -> bool:
    pair = getattr(dul, "_clinicbox_wake", None)
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    if pair is None or pair[0].fileno() < 0:
        return False
    watch = [pair[0]]
    if raw is not None and raw.fileno() >= 0:
        watch.append(raw)
    try:
        ready, _, _ = select.select(watch, [], [], seconds)
    except (OSError, ValueError):
        return False
    if pair[0] in ready:
        try:
            while pair[0].recv(4096):
                pass
        except OSError:
            pass
    return True


def _association_wait(assoc, seconds: float) -> bool:
    q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if q is None:
        return False
    with q.not_empty:
        if not q._qsize():
            q.not_empty.wait(seconds)
    return True


class _EventTime:
    """Stands in for the ``time`` module inside pynetdicom's dul and association modules."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == _REACTOR_POLL:
            thread = threading.current_thread()
            if isinstance(thread, _dul.DULServiceProvider):
                if _dul_wait(thread, seconds):
                    return
            elif isinstance(thread, _association.Association) and thread.is_acceptor:
                # Requestor associations (our C-MOVE sub-operations, commitment reports) keep the stock
                # sleep: their send_*() calls race the reactor for responses (pynetdicom check-then-act),
                # and waking the reactor early on a queued message made that race likely.
                if _association_wait(thread, seconds):
                    return
        time.sleep(seconds)


def _recv(self, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: read exactly ``nr_bytes`` (less if the peer closes), in large reads."""
    assoc = getattr(self, "assoc", None)
    limit = getattr(getattr(assoc, "acceptor", None), "maximum_length", 0) if getattr(
        assoc, "is_acceptor", False) else 0
    if limit and nr_bytes > limit + 65536:
        return bytearray()  # longer than we said we accept: read as a broken connection
    sock = self.socket
    out = bytearray()
    while len(out) < nr_bytes:
        data = sock.recv(min(nr_bytes - len(out), _RECV_CHUNK))
        if not data:
            break
        out += data
    return out


def route(assoc, *, find: Callable | None = None, move: Callable | None = None) -> None:
    """Have this association's C-FIND (Q/R and worklist) and C-MOVE requests answered by
    ``find(assoc, req, context)`` / ``move(assoc, req, context)`` instead of pynetdicom's services."""
    assoc._clinicbox_find = find
    assoc._clinicbox_move = move


def _qr_scp(self, req, context):
    if isinstance(req, _C_MOVE) and getattr(self.assoc, "_clinicbox_move", None) is not None:
        return self.assoc._clinicbox_move(self.assoc, req, context)
    if isinstance(req, _C_FIND) and getattr(self.assoc, "_clinicbox_find", None) is not None:
        return self.assoc._clinicbox_find(self.assoc, req, context)
    return _original_qr_scp(self, req, context)


def _mwl_scp(self, req, context):
    if isinstance(req, _C_FIND) and getattr(self.assoc, "_clinicbox_find", None) is not None:
        return self.assoc._clinicbox_find(self.assoc, req, context)
    return _original_mwl_scp(self, req, context)


def pynetdicom_find(assoc, req, context) -> None:
    """pynetdicom's own C-FIND service for this request (the EVT_C_FIND handlers answer it)."""
    service = _service_class.QueryRetrieveServiceClass(assoc)
    service.statuses = _service_class.QR_FIND_SERVICE_CLASS_STATUS
    service._c_find_scp(req, context)


def installed() -> bool:
    return _installed


def peer_max_pdu(assoc) -> int | None:
    """The largest PDU the peer takes (0: no limit), or None when pynetdicom does not say."""
    try:
        return int(assoc.dimse.maximum_pdu_size or 0)
    except (AttributeError, TypeError, ValueError):
        return None


def raw_send(assoc, data: bytes) -> bool:
    """Write ready-made PDUs to the association's socket; False when the connection is gone."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is None or not assoc.is_established:
        return False
    try:
        sock.sendall(data)
    except OSError:
        assoc.dul.event_queue.put("Evt17")  # transport closed, as AssociationSocket.send reports it
        return False
    return True


def _check_internals() -> None:
    problems = []
    if not pynetdicom.__version__.startswith("3."):
        problems.append(f"pynetdicom {pynetdicom.__version__} (tuned for 3.x)")
    if getattr(_dimse_messages, "NamedTemporaryFile", None) not in (_original_ntf, _named_temporary_file):
        problems.append("pynetdicom.dimse_messages.NamedTemporaryFile is gone")
    for mod in (_dul, _association):
        if getattr(mod, "time", None) is not time and not isinstance(getattr(mod, "time", None), _EventTime):
            problems.append(f"{mod.__name__} no longer uses the time module")
    if "to_provider_queue" not in inspect.getsource(_dul.DULServiceProvider.__init__):
        problems.append("DULServiceProvider has no to_provider_queue")
    if "msg_queue" not in inspect.getsource(_dimse.DIMSEServiceProvider.__init__):
        problems.append("DIMSEServiceProvider has no msg_queue")
    recv_src = inspect.getsource(_transport.AssociationSocket.recv) if _transport.AssociationSocket.recv is not _recv else ""
    if recv_src and "nr_bytes" not in recv_src:
        problems.append("AssociationSocket.recv(nr_bytes) changed")
    if "_run_loop_delay" not in inspect.getsource(_dul.DULServiceProvider.run_reactor):
        problems.append("DULServiceProvider.run_reactor no longer polls with _run_loop_delay")
    if "_idle_timer" not in inspect.getsource(_dul.DULServiceProvider.run_reactor):
        problems.append("DULServiceProvider no longer restarts _idle_timer on received data")
    if "_move_scp" not in inspect.getsource(_original_qr_scp):
        problems.append("QueryRetrieveServiceClass.SCP no longer dispatches C-MOVE to _move_scp")
    if "_c_find_scp" not in inspect.getsource(_original_mwl_scp):
        problems.append("BasicWorklistManagementServiceClass.SCP no longer dispatches to _c_find_scp")
    if not hasattr(_service_class, "QR_FIND_SERVICE_CLASS_STATUS"):
        problems.append("service_class.QR_FIND_SERVICE_CLASS_STATUS is gone")
    if not hasattr(_dimse.DIMSEServiceProvider, "__init__") or \
            "cancel_req" not in inspect.getsource(_dimse.DIMSEServiceProvider.__init__):
        problems.append("DIMSEServiceProvider.cancel_req is gone")
    if "maximum_pdu_size" not in dir(_dimse.DIMSEServiceProvider):
        problems.append("DIMSEServiceProvider.maximum_pdu_size is gone")
    if "self.socket" not in inspect.getsource(_transport.AssociationSocket.send) or \
            "event_queue" not in inspect.getsource(_transport.AssociationSocket.send):
        problems.append("AssociationSocket.send no longer writes self.socket / reports Evt17")
    if "_data_set_file" not in inspect.getsource(_dimse_messages.DIMSEMessage.decode_msg):
        problems.append("DIMSEMessage.decode_msg no longer writes into _data_set_file")
    if problems:
        raise RuntimeError("clinicbox.dicom.tuning does not fit this pynetdicom: " + "; ".join(problems))


def install() -> None:
    """Apply both adjustments (idempotent). Raises RuntimeError if pynetdicom changed shape."""
    global _installed
    if _installed:
        return
    _check_internals()
    pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True  # a file path is sent as its stored bytes
    # pynetdicom formats every request/response identifier for its debug log even when nobody logs
    # it (0.05-0.6 ms a message), and identifiers hold patient names: never
    pynetdicom._config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom._config.LOG_RESPONSE_IDENTIFIERS = False
    _dimse_messages.NamedTemporaryFile = _named_temporary_file
    # A DUL thread gives the GIL up at every socket call and then waits a switch interval to get it
    # back from a thread that is busy answering: at CPython's 5 ms a C-CANCEL (four such calls) was
    # taken in only after ~20 ms of answers.  1 ms keeps the protocol threads responsive.
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
    _dul.time = _EventTime()
    _association.time = _EventTime()
    _transport.AssociationSocket.recv = _recv
    _service_class.QueryRetrieveServiceClass.SCP = _qr_scp
    _service_class.BasicWorklistManagementServiceClass.SCP = _mwl_scp
    _installed = True

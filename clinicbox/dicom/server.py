"""The one Application Entity: contexts, association policy, timeouts, handlers, graceful stop."""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from clinicbox.archive.ingest import Archive
from clinicbox.archive.query import QueryOptions
from clinicbox.core.config import PrintSettings, QuerySettings, ServerSettings, WorklistSettings
from clinicbox.dicom import answers, commitment, contexts, find, handlers, move, printscp, retrieve, tuning, worklist
from clinicbox.dicom.session import session_of
from clinicbox.orders.book import OrderBook
from clinicbox.printing import film as pf
from clinicbox.printing.relay import PrintRelay

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, reason) as PS3.8 Table 9-21 names them
_REJECT_REASONS = {
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (3, 2): "local limit exceeded (too many associations)",
    (2, 1): "no reason given",
}


def _log_device(ae_title: str, host: str, fut) -> None:
    if fut.exception() is not None:
        log.warning("could not record device %s: %s", ae_title, fut.exception())
    elif fut.result():
        log.info("new device seen: %s at %s", ae_title, host)


def _n_by_class(event, handlers: dict, default):
    """An N-service request to the door of its SOP class (print, MPPS, storage commitment)."""
    req = event.request
    cls = req.AffectedSOPClassUID if type(req).__name__ == "N_CREATE" else req.RequestedSOPClassUID
    return handlers.get(str(cls), default)(event)


def _not_supported(event):
    return 0x0118, None  # no such SOP class


def _by_sop_class(event, handlers: dict, default):
    """C-FIND of one service or another (worklist, query/retrieve), by the request's SOP class."""
    handler = handlers.get(str(event.request.AffectedSOPClassUID), default)
    yield from handler(event)


class DicomServer:
    """Hosts every SCP on one port. Built by the app's composition root."""

    def __init__(self, settings: ServerSettings, archive: Archive, book: OrderBook,
                 query: QuerySettings = QuerySettings(), worklist_settings: WorklistSettings = WorklistSettings(),
                 relay: PrintRelay | None = None, print_settings: PrintSettings = PrintSettings()) -> None:
        self.settings = settings
        self.query = query
        self.worklist = worklist_settings
        self.archive = archive
        self.book = book
        qr_find = partial(find.handle_find, archive=archive,
                          options=QueryOptions(query.case_insensitive_names, query.max_results))
        mwl_find = partial(worklist.handle_worklist_find, book=book, settings=worklist_settings,
                           case_insensitive_names=query.case_insensitive_names)
        self._find_handlers = {worklist.MWL_FIND: mwl_find}
        self._qr_find = qr_find
        self.ae: AE | None = None
        self._server = None
        self._supported: dict[str, set[str]] = {}
        self._handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_RELEASED, partial(self._on_end, how="released")),
            (evt.EVT_ABORTED, partial(self._on_end, how="aborted")),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, handlers.handle_echo),
            (evt.EVT_C_STORE, handlers.handle_store, [archive]),
            (evt.EVT_C_GET, retrieve.handle_get, [archive]),
            (evt.EVT_C_FIND, _by_sop_class, [self._find_handlers, qr_find]),
        ]
        commit = partial(commitment.handle_n_action, archive=archive, our_ae_title=settings.ae_title)
        n_create, n_set, n_action = {}, {}, {}
        n_get, n_delete = {}, {}
        if relay is not None:
            for cls in printscp.PRINT_SOP_CLASSES:
                n_create[cls], n_set[cls] = printscp.handle_n_create, printscp.handle_n_set
                n_action[cls], n_delete[cls] = partial(printscp.handle_n_action, relay=relay), printscp.handle_n_delete
            n_get[pf.PRINTER] = partial(printscp.handle_n_get, settings=print_settings)
        self._handlers += [
            (evt.EVT_N_CREATE, _n_by_class, [n_create, partial(worklist.handle_n_create, book=book)]),
            (evt.EVT_N_SET, _n_by_class, [n_set, partial(worklist.handle_n_set, book=book)]),
            (evt.EVT_N_ACTION, _n_by_class, [n_action, commit]),
            (evt.EVT_N_GET, _n_by_class, [n_get, _not_supported]),
            (evt.EVT_N_DELETE, _n_by_class, [n_delete, lambda event: 0x0118]),
        ]
        self._print = relay is not None

    # --- life cycle ---------------------------------------------------------------------------

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        # pynetdicom counts every open connection, silent ones included; it only bounds threads here.
        # The association limit itself is ours, in _on_requested, and counts real associations.
        ae.maximum_associations = s.max_associations * 4 + 16
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_called_aet = s.require_called_ae_title
        ae.require_calling_aet = list(s.allowed_calling_ae_titles)
        # Every association gets its own contexts in _on_requested, shaped by what it proposes.
        # The AE's list is only what pynetdicom deep-copies per connection: keep it to one entry
        # (the full 208 x 39 table cost 40-60 ms of CPU and ~1.5 MB per connection).
        ae.add_supported_context(contexts.VERIFICATION)
        syntaxes = frozenset(contexts.transfer_syntaxes())
        self._supported = {uid: syntaxes for uid in (contexts.VERIFICATION, *contexts.storage_sop_classes())}
        native = frozenset(contexts.NATIVE_SYNTAXES)
        self._supported.update({uid: native for uid in (*find.MODELS, *retrieve.MODELS, *retrieve.MOVE_MODELS,
                                                        commitment.SOP_CLASS, worklist.MWL_FIND, worklist.MPPS)})
        if self._print:
            self._supported.update({uid: native for uid in printscp.META_CLASSES})
        return ae

    def start(self) -> None:
        tuning.install()
        self.ae = self._build_ae()
        tuning.register_sink(self.ae, self.archive.new_incoming)
        s = self.settings
        self._server = self.ae.start_server((s.bind, s.port), block=False, evt_handlers=self._handlers)
        log.info("DICOM service %s listening on %s:%d (max PDU %d, up to %d associations)",
                 s.ae_title, s.bind, self.port, s.max_pdu_size, s.max_associations)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.settings.port

    def stop(self, grace: float | None = None) -> None:
        """Stop listening, let stores in flight finish (up to ``grace`` seconds), then abort the rest."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._server.shutdown()
        deadline = time.monotonic() + grace
        while True:
            # Connections not (or no longer) in an association hold no store: they end with us.
            active = [a for a in self._server.active_associations if a.is_established]
            now = time.monotonic()
            if not active or now >= deadline + 5:
                break
            for assoc in active:
                session = session_of(assoc)
                idle = (session.stores_in_progress == 0 and not tuning.receiving(assoc)
                        and tuning.last_receive_age(assoc) > 0.2)
                if idle or now >= deadline:
                    if not idle:
                        log.warning("aborting %s with a store still in progress (grace period over)", session.who)
                    threading.Thread(target=assoc.abort, daemon=True).start()
            time.sleep(0.05)
        self._server = None
        log.info("DICOM service stopped")

    # --- event handlers -----------------------------------------------------------------------

    def _serve_find(self, assoc, req, context) -> None:
        handler = self._find_handlers.get(str(req.AffectedSOPClassUID), self._qr_find)
        answers.serve_find(assoc, req, context, handler)

    def _on_conn_open(self, event) -> None:
        tuning.prepare_association(event.assoc)
        tuning.route(event.assoc, find=self._serve_find,
                     move=partial(move.serve_move, archive=self.archive, our_ae_title=self.settings.ae_title,
                                  timeout=self.settings.dimse_timeout))
        tuning.set_nodelay(event.assoc)
        session = session_of(event.assoc)
        session.host, session.port = event.address[0], event.address[1]

    def _on_requested(self, event) -> None:
        """Before negotiation: enforce the association limit, then shape this association's contexts."""
        assoc = event.assoc
        busy = sum(1 for a in self._server.active_associations if a is not assoc and a.is_established)
        if busy >= self.settings.max_associations:
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, local limit exceeded
            assoc.kill()  # as pynetdicom does after its own rejections: lets the RJ go out first
            return
        proposed = assoc.requestor.primitive.presentation_context_definition_list
        wanted, unknown = self._contexts_for(proposed)
        caller = assoc.requestor.primitive.calling_ae_title
        gates = (((*find.MODELS, *retrieve.MODELS, *retrieve.MOVE_MODELS), self.query.allow_from,
                  "query/retrieve", "query.allow_from"),
                 ((worklist.MWL_FIND, worklist.MPPS), self.worklist.allow_from, "query the worklist or send MPPS",
                  "worklist.allow_from"))
        for models, allow_from, what, key in gates:
            if allow_from == "known" and any(uid in models for uid in wanted) \
                    and self.archive.index.device(caller) is None:
                for uid in models:
                    wanted.pop(uid, None)
                log.warning("%s may not %s: not a known device (clinicbox devices add …, or %s = \"any\")",
                            caller, what, key)
        for uid in unknown:
            if not contexts.register_private_storage_class(uid):
                wanted.pop(uid, None)
                log.warning("not accepting private SOP class %s: not a UID, or too many private classes", uid)
        shaped = []
        for uid, ts in wanted.items():
            if ts:
                cx = build_context(uid, ts)
                cx.scu_role = cx.scp_role = True  # lets a C-GET requestor be the Storage SCP for its images
                shaped.append(cx)
        assoc.acceptor.supported_contexts = shaped
        if unknown:
            log.info("accepting %d private/unknown SOP class(es) as storage: %s", len(unknown), ", ".join(unknown))

    def _contexts_for(self, proposed) -> tuple[dict[str, list[str]], list[str]]:
        """Our transfer syntaxes per proposed abstract syntax, in the *sender's* order of preference.

        pynetdicom picks, for each proposed context, the first syntax of our list that the sender
        proposed; ordering our list by the sender's preference means each object is taken in the
        syntax the sender likes best (usually how it holds it), never converted.  Private/unknown
        SOP classes are taken as storage, with whatever syntaxes the sender proposes, when
        ``server.accept_unknown_sop_classes`` allows it.
        """
        wanted: dict[str, list[str]] = {}
        unknown: list[str] = []
        for cx in proposed:
            uid = str(cx.abstract_syntax)
            if uid in self._supported:
                syntaxes = [str(ts) for ts in cx.transfer_syntax if str(ts) in self._supported[uid]]
            elif self.settings.accept_unknown_sop_classes and not contexts.is_known_uid(uid):
                syntaxes = [str(ts) for ts in cx.transfer_syntax]
                if uid not in wanted:
                    unknown.append(uid)
            else:
                continue
            have = wanted.setdefault(uid, [])
            have.extend(ts for ts in syntaxes if ts not in have)
        return wanted, unknown

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        session = session_of(assoc)
        session.calling_ae = assoc.requestor.ae_title
        session.called_ae = assoc.acceptor.ae_title
        session.contexts = len(assoc.accepted_contexts)
        log.info("association accepted: %s -> %s, %d of %d contexts accepted", session.who,
                 session.called_ae, session.contexts,
                 len(assoc.accepted_contexts) + len(assoc.rejected_contexts))
        fut = self.archive.note_device_seen(session.calling_ae, session.host)
        fut.add_done_callback(partial(_log_device, session.calling_ae, session.host))

    def _on_acse_sent(self, event) -> None:
        prim = event.primitive
        result = getattr(prim, "result", None)
        if type(prim).__name__ == "A_ASSOCIATE" and result not in (None, 0):
            session = session_of(event.assoc)
            rq = event.assoc.requestor
            reason = _REJECT_REASONS.get((prim.result_source, prim.diagnostic), f"diagnostic {prim.diagnostic}")
            asked = getattr(rq.primitive, "called_ae_title", None) if rq.primitive is not None else None
            log.warning("association rejected (%s): %s@%s:%s called %s", reason,
                        rq.ae_title or "?", session.host, session.port, asked or event.assoc.acceptor.ae_title)

    def _on_conn_close(self, event) -> None:
        tuning.release_association(event.assoc)
        removed = tuning.discard_unfinished(event.assoc)
        if removed:
            session = session_of(event.assoc)
            log.warning("%s dropped the connection mid-object: removed %d partial object(s), none acknowledged",
                        session.who, removed)

    def _on_end(self, event, how: str) -> None:
        session = session_of(event.assoc)
        if session.calling_ae:
            log.info(session.summary(how))

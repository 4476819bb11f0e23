"""Modality Worklist C-FIND door and MPPS N-CREATE/N-SET door: thin, into the orders room."""

from __future__ import annotations

import json
import logging
import time

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind

from clinicbox.archive.matching import UnsupportedMatch
from clinicbox.core.config import WorklistSettings
from clinicbox.orders.book import OrderBook
from clinicbox.orders.mpps import MppsRefused
from clinicbox.orders.worklist import LATIN1, UTF8, read_query
from clinicbox.dicom import answers
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

MWL_FIND = str(ModalityWorklistInformationFind)
MPPS = str(ModalityPerformedProcedureStep)
PENDING, PENDING_WARNING, SUCCESS, CANCEL = 0xFF00, 0xFF01, 0x0000, 0xFE00
UNABLE_TO_PROCESS, IDENTIFIER_DOES_NOT_MATCH = 0xC000, 0xA900
PROCESSING_FAILURE = 0x0110


def _charset(device: dict | None, identifier: Dataset, settings: WorklistSettings) -> str:
    if device and device.get("charset"):
        return device["charset"]
    asked = identifier.get("SpecificCharacterSet")
    asked = [asked] if isinstance(asked, str) else list(asked or [])
    if UTF8 in asked:
        return UTF8
    if asked == [LATIN1]:
        return LATIN1
    return settings.charset


def _own_station(device: dict | None, settings: WorklistSettings) -> bool:
    if device and device.get("own_station_only") is not None:
        return bool(device["own_station_only"])
    return settings.own_station_only


def _identifier_json(identifier: Dataset) -> str:
    try:
        return json.dumps(identifier.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: ""))
    except Exception:
        return "{}"


def handle_worklist_find(event, book: OrderBook, settings: WorklistSettings, case_insensitive_names: bool):
    session = session_of(event.assoc)
    identifier = event.identifier
    device = book.archive.index.device(session.calling_ae)
    charset = _charset(device, identifier, settings)
    query = read_query(identifier)
    station = session.calling_ae if _own_station(device, settings) else None
    pending = PENDING_WARNING if query.unsupported else PENDING
    count, status = 0, "success"
    started = time.perf_counter()
    stream = answers.open_stream(event)
    try:
        for answer in book.worklist(query, charset=charset, case_insensitive_names=case_insensitive_names,
                                    station_filter=station, max_results=settings.max_results,
                                    implicit=stream.implicit if stream is not None else None):
            if event.is_cancelled:
                status = "cancelled"
                log.info("worklist query from %s cancelled after %d answers", session.who, count)
                yield CANCEL, None
                return
            count += 1
            if stream is None:
                yield pending, answer
            elif not stream.add(pending, answer):
                status = "connection lost"
                return
        if stream is not None and not stream.flush():
            status = "connection lost"
            return
    except UnsupportedMatch as exc:
        status = f"refused: {exc}"
        log.warning("worklist query from %s refused: %s", session.who, exc)
        yield IDENTIFIER_DOES_NOT_MATCH, None
        return
    except Exception:
        status = "failed"
        log.exception("worklist query from %s failed", session.who)
        yield UNABLE_TO_PROCESS, None
        return
    finally:
        book.record_query(session.calling_ae, session.host, _identifier_json(identifier), count, status)
    if query.unsupported:
        log.info("worklist query from %s: keys matched universally (not supported for matching): %s",
                 session.who, ", ".join(query.unsupported))
    log.info("worklist query from %s%s: %d item(s), %s, %.1f ms", session.who,
             " (own station only)" if station else "", count, charset, (time.perf_counter() - started) * 1000)
    yield SUCCESS, None


def _refusal(exc: MppsRefused) -> Dataset:
    status = Dataset()
    status.Status = exc.status
    status.ErrorComment = exc.comment
    if exc.error_id is not None:
        status.ErrorID = exc.error_id
    return status


def handle_n_create(event, book: OrderBook):
    session = session_of(event.assoc)
    req = event.request
    if str(req.AffectedSOPClassUID) != MPPS:
        return 0x0118, None  # no such SOP class (only MPPS is created here)
    # PS3.4 F.7.2.1.1: the SCP assigns the UID when the SCU gives none
    uid = str(req.AffectedSOPInstanceUID or "") or generate_uid()
    ds = event.attribute_list
    try:
        result = book.mpps_create(uid, ds, session.calling_ae)
    except MppsRefused as exc:
        log.warning("MPPS N-CREATE %s from %s refused (0x%04X): %s", uid, session.who, exc.status, exc.comment)
        return _refusal(exc), None
    except Exception:
        log.exception("MPPS N-CREATE %s from %s failed", uid, session.who)
        return PROCESSING_FAILURE, None
    log.info("MPPS %s from %s: IN PROGRESS, %s", uid, session.who,
             f"order {result.order_accession}" if result.order_accession else "unscheduled (no matching order)")
    reply = Dataset()
    reply.update(ds)
    if not req.AffectedSOPInstanceUID:
        reply.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the N-CREATE-RSP
    return 0x0000, reply


def handle_n_set(event, book: OrderBook):
    session = session_of(event.assoc)
    req = event.request
    if str(req.RequestedSOPClassUID) != MPPS:
        return 0x0118, None
    uid = str(req.RequestedSOPInstanceUID)
    try:
        result = book.mpps_set(uid, event.modification_list, session.calling_ae)
    except MppsRefused as exc:
        log.warning("MPPS N-SET %s from %s refused (0x%04X): %s", uid, session.who, exc.status, exc.comment)
        return _refusal(exc), None
    except Exception:
        log.exception("MPPS N-SET %s from %s failed", uid, session.who)
        return PROCESSING_FAILURE, None
    log.info("MPPS %s from %s: %s%s", uid, session.who, result.status,
             f", order {result.order_accession}" if result.order_accession else ", unscheduled")
    return 0x0000, event.modification_list

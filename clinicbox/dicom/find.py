"""C-FIND SCP door (Patient Root and Study Root): identifier in, answers from the archive room out."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from clinicbox.archive.ingest import Archive
from clinicbox.archive.query import QueryOptions, QueryRefused, answer_charset, find, requested_keywords
from clinicbox.dicom import answers
from clinicbox.dicom.session import session_of

log = logging.getLogger(__name__)

MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
UNABLE_TO_PROCESS = 0xC000


def _plain(value):
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    return "" if value is None else str(value)


def read_identifier(identifier: Dataset) -> tuple[str, dict]:
    """(QueryRetrieveLevel, keyword -> value) of a C-FIND/C-GET/C-MOVE identifier (sequences skipped)."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    values = {e.keyword: _plain(e.value) for e in identifier if e.keyword and e.VR != "SQ"
              and e.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")}
    return level, values


def _charset_for(answer: Dataset, asked: list[str]) -> list[str] | str | None:
    return answer_charset([str(e.value) for e in answer if e.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
                           and e.value], asked)


def handle_find(event, archive: Archive, options: QueryOptions):
    model = MODELS.get(str(event.request.AffectedSOPClassUID))
    session = session_of(event.assoc)
    identifier = event.identifier
    level, values = read_identifier(identifier)
    asked_charset = identifier.get("SpecificCharacterSet")
    asked = [asked_charset] if isinstance(asked_charset, str) and asked_charset else list(asked_charset or [])
    requested = requested_keywords(identifier)
    count = 0
    stream = answers.open_stream(event)
    try:
        for answer in find(archive.index, model, level, values, requested, options,
                           implicit=stream.implicit if stream is not None else None, asked_charset=asked):
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d answers", session.who, count)
                yield CANCEL, None
                return
            if isinstance(answer, Dataset):
                charset = _charset_for(answer, asked)
                if charset:
                    answer.SpecificCharacterSet = charset
            count += 1
            if stream is None:
                yield PENDING, answer
            elif not stream.add(PENDING, answer):
                log.warning("C-FIND from %s: connection lost after %d answers", session.who, stream.sent)
                return
        if stream is not None and not stream.flush():
            log.warning("C-FIND from %s: connection lost after %d answers", session.who, stream.sent)
            return
    except QueryRefused as exc:
        log.warning("C-FIND from %s refused (0x%04X): %s", session.who, exc.status, exc.reason)
        yield exc.status, None
        return
    except Exception:
        log.exception("C-FIND from %s failed", session.who)
        yield UNABLE_TO_PROCESS, None
        return
    log.info("C-FIND %s level from %s: %d answer(s)", level, session.who, count)
    yield SUCCESS, None

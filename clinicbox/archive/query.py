"""C-FIND answers from the index: SQL does the matching, columns and stored headers the answers.

:func:`find` takes the query level, the information model and the identifier (keyword -> value,
already decoded) and yields one answer per match, each a :class:`pydicom.Dataset` holding exactly
the requested keys plus the unique keys of the level and above.  Values come from index columns,
counters kept by the writer, or the stored non-bulk header of a representative instance (for keys
the index has no column for); a key nobody has a value for is returned empty.  No object file is
read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from clinicbox.archive import encode
from clinicbox.archive.index import Index
from clinicbox.archive.matching import FIELDS, LEVELS, UnsupportedMatch, where_clause
from clinicbox.archive.parse import EXPLICIT_VR_BE, IMPLICIT_VR_LE

UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}

# computed attributes: keyword -> (level it belongs to, SQL expression)
COMPUTED = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "p.num_studies"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "(SELECT sum(num_series) FROM studies WHERE patient_pk = p.id)"),
    "NumberOfPatientRelatedInstances": ("PATIENT",
                                        "(SELECT sum(num_instances) FROM studies WHERE patient_pk = p.id)"),
    "NumberOfStudyRelatedSeries": ("STUDY", "s.num_series"),
    "NumberOfStudyRelatedInstances": ("STUDY", "s.num_instances"),
    "SOPClassesInStudy": ("STUDY", "(SELECT group_concat(DISTINCT i2.sop_class_uid) FROM instances i2"
                                   " JOIN series se2 ON se2.id = i2.series_pk WHERE se2.study_pk = s.id)"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "se.num_instances"),
}

_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies s JOIN patients p ON p.id = s.patient_pk",
    "SERIES": "series se JOIN studies s ON s.id = se.study_pk JOIN patients p ON p.id = s.patient_pk",
    "IMAGE": ("instances i JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
              " JOIN patients p ON p.id = s.patient_pk"),
}
# the instance whose stored header answers keys without a column, per level
_REPRESENTATIVE = {
    "PATIENT": "(SELECT i3.id FROM instances i3 JOIN series se3 ON se3.id = i3.series_pk JOIN studies s3"
               " ON s3.id = se3.study_pk WHERE s3.patient_pk = p.id ORDER BY i3.id LIMIT 1)",
    "STUDY": "(SELECT i3.id FROM instances i3 JOIN series se3 ON se3.id = i3.series_pk"
             " WHERE se3.study_pk = s.id ORDER BY i3.id LIMIT 1)",
    "SERIES": "(SELECT i3.id FROM instances i3 WHERE i3.series_pk = se.id ORDER BY i3.id LIMIT 1)",
    "IMAGE": "i.id",
}
_ORDER = {"PATIENT": "p.id", "STUDY": "s.id", "SERIES": "se.id", "IMAGE": "i.id"}


class QueryRefused(Exception):
    """The identifier cannot be answered (e.g. a relational query); ``status`` is the C-FIND status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class QueryOptions:
    case_insensitive_names: bool = True
    max_results: int = 1000


def _level_index(level: str) -> int:
    return LEVELS.index(level)


def hierarchy(model: str, level: str, what: str = "query") -> list[str]:
    """The levels from the model's root down to ``level``; QueryRefused when the pair is invalid."""
    if level not in LEVELS or (model == "STUDY" and level == "PATIENT"):
        raise QueryRefused(0xA900, f"{what} level {level!r} not valid for the {(model or '?').lower()} root model")
    first = 0 if model == "PATIENT" else 1
    return [LEVELS[i] for i in range(first, _level_index(level) + 1)]


def answer_charset(texts: list[str], asked: list[str]) -> list[str] | str | None:
    """The Specific Character Set of an answer holding ``texts``, given what the query asked for.

    The query's own set when every text fits it (none when it named none and all is ASCII),
    else ISO_IR 192, which holds every name.
    """
    if all(t.isascii() for t in texts):
        return asked or None
    if asked and asked != ["ISO_IR 192"]:
        try:
            encodings = convert_encodings(asked)
            if len(encodings) == 1:
                for t in texts:
                    t.encode(encodings[0])
                return asked
        except (UnicodeEncodeError, LookupError, ValueError):
            pass
    return "ISO_IR 192"


def find(index: Index, model: str, level: str, identifier: dict, requested: list[str],
         options: QueryOptions = QueryOptions(), *, implicit: bool | None = None,
         asked_charset: list[str] | None = None) -> Iterator[Dataset | bytes]:
    """Yield the answers to a hierarchical C-FIND (PS3.4 C.4.1.3.1).

    ``model`` is ``PATIENT`` or ``STUDY`` (root); ``identifier`` maps keywords to requested values;
    ``requested`` lists every keyword asked for, in order.  Answers are data sets without a
    Specific Character Set, or, when ``implicit`` is given and every key has a column, already
    encoded little endian with the character set chosen by :func:`answer_charset` for
    ``asked_charset``.
    """
    levels = hierarchy(model, level)
    # hierarchical: above the query level only the unique key, with a single value
    match = {}
    for kw, value in identifier.items():
        owner = FIELDS[kw].level if kw in FIELDS else COMPUTED.get(kw, (None,))[0]
        if owner is None or _level_index(owner) > _level_index(level):
            continue  # not matchable here (a key below the query level is returned empty)
        if owner in levels[:-1] and kw != UNIQUE_KEYS[owner] and value not in ("", None, []):
            raise QueryRefused(0xA900, f"relational query (not supported): {kw} given at {level} level")
        if kw in FIELDS:
            match[kw] = value
    for above in levels[:-1]:
        key = UNIQUE_KEYS[above]
        value = identifier.get(key)
        if not value or isinstance(value, list) and len(value) != 1:
            raise QueryRefused(0xA900, f"{level} level query needs a single {key}")
    try:
        where, params = where_clause(match, case_insensitive_names=options.case_insensitive_names)
    except UnsupportedMatch as exc:
        raise QueryRefused(0xA900, str(exc)) from None

    wanted = list(dict.fromkeys([*requested, *(UNIQUE_KEYS[lv] for lv in levels)]))
    wanted = [kw for kw in wanted if kw not in ("QueryRetrieveLevel", "SpecificCharacterSet")]
    columns = {kw: f.column for kw, f in FIELDS.items() if _level_index(f.level) <= _level_index(level)}
    # computed keys cost a subquery per answer: only those asked for
    columns.update({kw: expr for kw, (lvl, expr) in COMPUTED.items()
                    if kw in wanted and _level_index(lvl) <= _level_index(level)})
    select = [f"{expr} AS \"{kw}\"" for kw, expr in columns.items()]
    needs_header = any(kw not in columns for kw in wanted)
    select.append(f"{_REPRESENTATIVE[level]} AS _rep" if needs_header else "NULL AS _rep")
    sql = (f"SELECT {', '.join(select)} FROM {_FROM[level]} WHERE {where}"
           f" ORDER BY {_ORDER[level]} LIMIT ?")
    plan = _Plan(level, wanted, implicit, asked_charset or []) if implicit is not None and not needs_header else None
    for row in index.conn.execute(sql, [*params, options.max_results]):
        yield plan.encode(row) if plan else _answer(index, level, row, wanted)


def _column_text(kw: str, value) -> str:
    if value is None:
        return ""
    if kw == "SOPClassesInStudy":
        return "\\".join(v for v in value.split(",") if v)
    return str(value)


class _Plan:
    """Answers written straight from index rows (no pydicom), byte for byte what :func:`_answer`
    and the answer writer give (the tests compare them)."""

    def __init__(self, level: str, wanted: list[str], implicit: bool, asked: list[str]) -> None:
        self.level = level
        self.implicit = implicit
        self.asked = asked
        entries = [(tag_for_keyword(kw), dictionary_VR(tag_for_keyword(kw)), kw) for kw in wanted]
        entries.append((0x00080052, "CS", "QueryRetrieveLevel"))
        self.entries = sorted(entries)
        self.text_keys = [kw for _t, vr, kw in self.entries if vr in encode.TEXT_VRS]

    def encode(self, row) -> bytes:
        values = {kw: _column_text(kw, row[kw]) for _t, _vr, kw in self.entries if kw != "QueryRetrieveLevel"}
        values["QueryRetrieveLevel"] = self.level
        charset = answer_charset([values[k] for k in self.text_keys if values[k]], self.asked)
        terms = [charset] if isinstance(charset, str) else list(charset or [])
        codec = convert_encodings(terms)[0] if terms else "iso8859"
        out = []
        if charset:
            text = encode.text_bytes("\\".join(terms), "CS", codec)
            out.append(encode.header(0x00080005, "CS", len(text), self.implicit) + text)
        for tag, vr, kw in self.entries:
            data = encode.text_bytes(values[kw], vr, codec)
            out.append(encode.header(tag, vr, len(data), self.implicit) + data)
        return b"".join(out)


def _answer(index: Index, level: str, row, wanted: list[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    header = None
    keys = row.keys()
    for kw in sorted(wanted, key=lambda k: tag_for_keyword(k) or 0):
        if kw in keys:
            value = row[kw]
            if kw in ("ModalitiesInStudy", "SOPClassesInStudy"):
                sep = "\\" if kw == "ModalitiesInStudy" else ","
                value = [v for v in (value or "").split(sep) if v]
            setattr(ds, kw, "" if value is None else value)
            continue
        if header is None:
            header = _header(index, row["_rep"])
        elem = header.get(kw) if header is not None else None
        if elem is not None and dictionary_VR(tag_for_keyword(kw)) != "SQ":
            setattr(ds, kw, elem)
        else:
            setattr(ds, kw, [] if dictionary_VR(tag_for_keyword(kw)) == "SQ" else "")
    return ds


def _header(index: Index, instance_pk) -> Dataset | None:
    if instance_pk is None:
        return None
    row = index.conn.execute("SELECT header, header_syntax, specific_character_set FROM instances WHERE id=?",
                             (instance_pk,)).fetchone()
    if row is None:
        return None
    syntax = row["header_syntax"]
    ds = read_dataset(DicomBytesIO(row["header"]), is_implicit_VR=syntax == IMPLICIT_VR_LE,
                      is_little_endian=syntax != EXPLICIT_VR_BE)
    ds.decode()
    return ds


def requested_keywords(identifier: Dataset) -> list[str]:
    """The keywords of every top-level element in a C-FIND identifier (private tags ignored)."""
    out = []
    for elem in identifier:
        kw = keyword_for_tag(elem.tag)
        if kw:
            out.append(kw)
    return out

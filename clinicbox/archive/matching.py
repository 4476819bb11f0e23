"""C-FIND matching (PS3.4 C.2.2.2) turned into SQL on the index: pure functions, no I/O.

Each matchable attribute is a real column of the index.  A key's value becomes one SQL condition:

* universal matching: an empty value adds nothing;
* single value matching: ``column = ?`` (person names optionally case-insensitive);
* wildcard matching (``*`` and ``?``, on string VRs only): ``GLOB`` (case-sensitive) or ``LIKE``
  (case-insensitive person names);
* range matching on DA, TM and DT: ``A-B``, ``A-``, ``-B`` as string comparisons (the stored
  values are in DICOM's sortable form);
* list of UID matching: ``uid1\\uid2`` becomes ``IN (…)``;
* multi-valued ModalitiesInStudy: any listed modality present in the study.

This module is the start of the Query/Retrieve issue; the C-FIND service itself builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})


@dataclass(frozen=True)
class Field:
    level: str
    column: str  # qualified with the table alias used by queries: p, s (study), se, i
    vr: str
    multivalued: bool = False  # column holds backslash-separated values; a key matches any of them


FIELDS: dict[str, Field] = {
    "PatientID": Field("PATIENT", "p.patient_id", "LO"),
    "IssuerOfPatientID": Field("PATIENT", "p.issuer_of_patient_id", "LO"),
    "PatientName": Field("PATIENT", "p.patient_name", "PN"),
    "PatientBirthDate": Field("PATIENT", "p.patient_birth_date", "DA"),
    "PatientSex": Field("PATIENT", "p.patient_sex", "CS"),
    "StudyInstanceUID": Field("STUDY", "s.study_instance_uid", "UI"),
    "StudyDate": Field("STUDY", "s.study_date", "DA"),
    "StudyTime": Field("STUDY", "s.study_time", "TM"),
    "AccessionNumber": Field("STUDY", "s.accession_number", "SH"),
    "StudyID": Field("STUDY", "s.study_id", "SH"),
    "StudyDescription": Field("STUDY", "s.study_description", "LO"),
    "ReferringPhysicianName": Field("STUDY", "s.referring_physician_name", "PN"),
    "ModalitiesInStudy": Field("STUDY", "s.modalities_in_study", "CS", multivalued=True),
    "SeriesInstanceUID": Field("SERIES", "se.series_instance_uid", "UI"),
    "Modality": Field("SERIES", "se.modality", "CS"),
    "SeriesNumber": Field("SERIES", "se.series_number", "IS"),
    "SeriesDescription": Field("SERIES", "se.series_description", "LO"),
    "BodyPartExamined": Field("SERIES", "se.body_part_examined", "CS"),
    "SeriesDate": Field("SERIES", "se.series_date", "DA"),
    "SeriesTime": Field("SERIES", "se.series_time", "TM"),
    "StationName": Field("SERIES", "se.station_name", "SH"),
    "SOPInstanceUID": Field("IMAGE", "i.sop_instance_uid", "UI"),
    "SOPClassUID": Field("IMAGE", "i.sop_class_uid", "UI"),
    "InstanceNumber": Field("IMAGE", "i.instance_number", "IS"),
    "ContentDate": Field("IMAGE", "i.content_date", "DA"),
    "ContentTime": Field("IMAGE", "i.content_time", "TM"),
}


class UnsupportedMatch(ValueError):
    """The identifier asks for matching this archive cannot do (the handler answers a failure)."""


def _glob_escape(text: str) -> str:
    # GLOB has no ESCAPE clause: a literal [ is written [[], and * ? are DICOM's wildcards here
    return text.replace("[", "[[]")


def _like_pattern(text: str, escape: str = "\\") -> str:
    out = []
    for ch in text:
        if ch in "%_" + escape:
            out.append(escape + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _range(column: str, value: str) -> tuple[str, list]:
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    if low and high:
        # a time or datetime upper bound covers everything that starts with it ("-1200" includes 120059)
        return f"({column} >= ? AND {column} <= ?)", [low, high + "\uffff"]
    if low:
        return f"({column} != '' AND {column} >= ?)", [low]
    return f"({column} != '' AND {column} <= ?)", [high + "\uffff"]


def condition(keyword: str, value, *, case_insensitive_names: bool = False,
              fields: dict[str, Field] = FIELDS) -> tuple[str, list] | None:
    """The SQL condition for one identifier key, or None for universal matching.

    ``value`` is the key's value as pydicom gives it (str, list of str, or empty); ``fields`` maps
    keywords to columns (the Q/R index by default; the worklist has its own).
    """
    field = fields.get(keyword)
    if field is None:
        raise UnsupportedMatch(f"matching on {keyword} is not supported")
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value or "")]
    values = [v.strip() if field.vr != "PN" else v.strip().rstrip("=") for v in values]
    values = [v for v in values if v]
    if not values or values == ["*"]:
        return None
    col = field.column
    if field.vr == "UI":
        marks = ",".join("?" * len(values))
        return f"{col} IN ({marks})", values
    if field.multivalued:
        # any stored value equals (or wildcard-matches) any asked value; LIKE is case-insensitive
        # for ASCII, which suits the CS/AE values kept this way (modalities, station AE titles)
        parts = [f"('\\' || {col} || '\\') LIKE ? ESCAPE '|'" for _ in values]
        return "(" + " OR ".join(parts) + ")", ["%\\" + _like_pattern(v, "|") + "\\%" for v in values]
    if len(values) > 1:
        raise UnsupportedMatch(f"{keyword}: value multiplicity > 1 is only supported for UIDs and modalities")
    v = values[0]
    if field.vr in _RANGE_VRS and "-" in v:
        return _range(col, v)
    if field.vr == "TM":
        return _range(col, f"{v}-{v}")  # "0800" stands for all of 08:00 (080000 … 080059.999)
    fold = case_insensitive_names and field.vr == "PN"
    if field.vr in _WILDCARD_VRS and ("*" in v or "?" in v):
        if fold:
            return f"{col} LIKE ? ESCAPE '\\'", [_like_pattern(v)]
        return f"{col} GLOB ?", [_glob_escape(v)]
    if field.vr == "IS":
        try:
            return f"{col} = ?", [int(v)]
        except ValueError:
            raise UnsupportedMatch(f"{keyword}: {v!r} is not an integer") from None
    if fold:
        return f"{col} = ? COLLATE NOCASE", [v]
    return f"{col} = ?", [v]


def where_clause(identifier: dict, *, case_insensitive_names: bool = False,
                 fields: dict[str, Field] = FIELDS) -> tuple[str, list]:
    """AND of the conditions for every matchable key in ``identifier`` (keyword -> value)."""
    parts, params = [], []
    for keyword, value in identifier.items():
        if keyword not in fields:
            continue  # returned (empty or from the header) but not matched: treated as universal
        cond = condition(keyword, value, case_insensitive_names=case_insensitive_names, fields=fields)
        if cond:
            parts.append(cond[0])
            params.extend(cond[1])
    return (" AND ".join(parts) if parts else "1"), params

"""What an order is made of, and the checks a front desk entry must pass before it is kept.

Pure: no I/O.  Values are kept in DICOM's own forms (PN ``FAMILY^GIVEN``, DA ``YYYYMMDD``,
TM ``HHMMSS``) so the worklist answers them as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime

from clinicbox.core.config import ConfigError, check_ae_title
from clinicbox.orders.schema import PRIORITIES

_CS = re.compile(r"^[A-Z0-9 _]{1,16}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class OrderError(ValueError):
    """An order (or one of its fields) is not acceptable; ``field`` names which."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


class PatientMismatch(OrderError):
    """The patient ID is known with another name or birth date; staff must confirm the change."""


@dataclass
class Step:
    modality: str
    station_ae_titles: list[str]
    start: datetime
    station_name: str = ""
    performing_physician_name: str = ""
    description: str = ""
    location: str = ""
    step_id: str = ""


@dataclass
class NewOrder:
    patient_id: str
    patient_name: str
    steps: list[Step]
    patient_birth_date: str = ""
    patient_sex: str = ""
    issuer_of_patient_id: str = ""
    other_patient_ids: list[str] = field(default_factory=list)
    medical_alerts: list[str] = field(default_factory=list)
    allergies: list[str] = field(default_factory=list)
    accession_number: str = ""
    requested_procedure_id: str = ""
    requested_procedure_description: str = ""
    procedure_code_value: str = ""
    procedure_code_scheme: str = "99CLINICBOX"
    priority: str = "ROUTINE"
    referring_physician_name: str = ""
    requesting_physician: str = ""
    requested_contrast_agent: str = ""
    study_instance_uid: str = ""


def text_value(name: str, value: str, max_len: int, *, required: bool = False) -> str:
    """A text field staff typed: stripped; refused (naming ``name``) when too long or holding a backslash
    or control characters."""
    value = (value or "").strip()
    if required and not value:
        raise OrderError(name, "is required")
    if len(value) > max_len:
        raise OrderError(name, f"is longer than {max_len} characters")
    if "\\" in value:
        raise OrderError(name, "may not contain a backslash")
    if any(ord(c) < 32 for c in value):
        raise OrderError(name, "may not contain control characters")
    return value


def person_name(name: str, value: str, *, required: bool = False) -> str:
    """A DICOM person name (``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``), trailing empty parts dropped."""
    value = text_value(name, value, 320, required=required)
    parts = value.split("^")
    if len(parts) > 5:
        raise OrderError(name, "has more than five ^-separated components (FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX)")
    if any(len(p) > 64 for p in parts):
        raise OrderError(name, "a name component is longer than 64 characters")
    return "^".join(p.strip() for p in parts).rstrip("^")


def same_person_name(a: str, b: str) -> bool:
    def norm(v: str) -> str:
        return "^".join(p.strip().upper() for p in (v or "").split("=")[0].split("^")).rstrip("^")
    return norm(a) == norm(b)


def dicom_date(name: str, value: str) -> str:
    """``YYYYMMDD`` from ``YYYYMMDD`` or ``YYYY-MM-DD``; '' stays ''."""
    value = (value or "").strip()
    if not value:
        return ""
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            d = datetime.strptime(value, fmt).date()
        except ValueError:
            continue
        if d > date.today():
            raise OrderError(name, f"{value} is in the future")
        return d.strftime("%Y%m%d")
    raise OrderError(name, f"{value!r} is not a date (YYYY-MM-DD)")


def parse_when(name: str, value: str) -> datetime:
    """A scheduled start: ``YYYY-MM-DD HH:MM`` (also ``YYYY-MM-DDTHH:MM[:SS]``, ``YYYYMMDD HHMM``)."""
    value = (value or "").strip()
    for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S",
                "%Y%m%d %H%M", "%Y%m%d%H%M%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    raise OrderError(name, f"{value!r} is not a date and time (YYYY-MM-DD HH:MM)")


def uid(name: str, value: str) -> str:
    value = (value or "").strip()
    if value and (len(value) > 64 or not _UID.match(value)):
        raise OrderError(name, f"{value!r} is not a valid UID")
    return value


def validated(order: NewOrder) -> NewOrder:
    """Check and normalise every field; raise :class:`OrderError` naming the first bad one."""
    o = order
    o.patient_id = text_value("patient_id", o.patient_id, 64, required=True)
    o.issuer_of_patient_id = text_value("issuer_of_patient_id", o.issuer_of_patient_id, 64)
    o.patient_name = person_name("patient_name", o.patient_name, required=True)
    o.patient_birth_date = dicom_date("birth_date", o.patient_birth_date)
    o.patient_sex = (o.patient_sex or "").strip().upper()
    if o.patient_sex not in ("", "M", "F", "O"):
        raise OrderError("sex", f"{o.patient_sex!r} is not one of M, F, O")
    o.other_patient_ids = [text_value("other_ids", v, 64) for v in o.other_patient_ids if v and v.strip()]
    o.medical_alerts = [text_value("alerts", v, 64) for v in o.medical_alerts if v and v.strip()]
    o.allergies = [text_value("allergies", v, 64) for v in o.allergies if v and v.strip()]
    o.accession_number = text_value("accession", o.accession_number, 16)
    o.requested_procedure_id = text_value("procedure_id", o.requested_procedure_id, 16)
    o.requested_procedure_description = text_value("procedure", o.requested_procedure_description, 64)
    o.procedure_code_value = text_value("procedure_code", o.procedure_code_value, 16)
    o.procedure_code_scheme = text_value("code_scheme", o.procedure_code_scheme, 16)
    o.priority = (o.priority or "ROUTINE").strip().upper()
    if o.priority not in PRIORITIES:
        raise OrderError("priority", f"{o.priority!r} is not one of {', '.join(PRIORITIES)}")
    o.referring_physician_name = person_name("referring_physician", o.referring_physician_name)
    o.requesting_physician = person_name("requesting_physician", o.requesting_physician)
    o.requested_contrast_agent = text_value("contrast_agent", o.requested_contrast_agent, 64)
    o.study_instance_uid = uid("study_uid", o.study_instance_uid)
    if not o.steps:
        raise OrderError("steps", "an order needs at least one scheduled procedure step")
    seen_ids = set()
    for i, s in enumerate(o.steps):
        where = "" if len(o.steps) == 1 else f"step {i + 1} "
        s.modality = (s.modality or "").strip().upper()
        if not _CS.match(s.modality):
            raise OrderError(f"{where}modality", f"{s.modality!r} is not a modality code (e.g. US, CR, DX, IO, OP)")
        if not s.station_ae_titles:
            raise OrderError(f"{where}station_ae", "is required (the AE title of the device that will do it)")
        s.station_ae_titles = [a.strip() for a in s.station_ae_titles]
        for aet in s.station_ae_titles:
            try:
                check_ae_title(f"{where}station_ae", aet)
            except ConfigError as exc:
                raise OrderError(exc.key, exc.problem) from None
        if not isinstance(s.start, datetime):
            raise OrderError(f"{where}at", "is required")
        s.station_name = text_value(f"{where}station_name", s.station_name, 16)
        s.performing_physician_name = person_name(f"{where}performing_physician", s.performing_physician_name)
        s.description = text_value(f"{where}step_description", s.description, 64)
        s.location = text_value(f"{where}location", s.location, 16)
        s.step_id = text_value(f"{where}step_id", s.step_id, 16)
        if s.step_id and s.step_id in seen_ids:
            raise OrderError(f"{where}step_id", f"{s.step_id!r} is used twice in this order")
        seen_ids.add(s.step_id)
        if not (s.description or o.requested_procedure_description or o.procedure_code_value):
            # SPS Description or Scheduled Protocol Code Sequence is Type 1C in every worklist answer
            raise OrderError("procedure", "describe the procedure (--procedure or --step-description)")
    return o

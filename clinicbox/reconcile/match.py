"""Does an incoming object belong to the patient (and order) it names?  Pure decisions on SQL reads.

An object is **matched** when its identifiers lead to a known patient whose name and birth date
agree, **conflicting** when they lead somewhere that disagrees (same patient ID with another
name or birth date; an accession or Study Instance UID that belongs to another patient), and
**unknown** when they lead nowhere.  Name and birth date only ever confirm: they never find a
patient by themselves.  Patients are known from the archive (``patients``) and from orders
(``order_patients``).
"""

from __future__ import annotations

import sqlite3
import unicodedata
from dataclasses import dataclass, field

MATCHED, CONFLICTING, UNKNOWN = "matched", "conflicting", "unknown"


def person_key(name: str) -> str:
    """A person name reduced for comparison: alphabetic group only, case and accents folded,
    component padding ignored (``Doe^John^^`` = ``DOE^JOHN`` = ``Dóe^John``)."""
    text = (name or "").split("=")[0]
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    parts = [" ".join(p.split()).upper() for p in text.split("^")]
    return "^".join(parts).rstrip("^")


@dataclass
class Verdict:
    kind: str                                  # matched | conflicting | unknown
    reasons: list[str] = field(default_factory=list)
    patient_id: str = ""                       # who the evidence points to (a suggestion for staff)
    accession: str = ""

    @property
    def held(self) -> bool:
        return self.kind != MATCHED


def _same_id(row, pid: str, issuer: str) -> bool:
    return row["patient_id"] == pid and (row["issuer"] == issuer or not row["issuer"] or not issuer)


def _disagreement(row, name: str, birth_date: str) -> str:
    what = []
    if name and row["name"] and person_key(row["name"]) != person_key(name):
        what.append("another name")
    if birth_date and row["birth_date"] and row["birth_date"] != birth_date:
        what.append("another birth date")
    return " and ".join(what)


_PATIENT_COLS = "patient_id, issuer_of_patient_id AS issuer, patient_name AS name, patient_birth_date AS birth_date"


def known_patients(conn: sqlite3.Connection, pid: str, issuer: str) -> list[sqlite3.Row]:
    """Patients with this ID: as the front desk registered them (orders) first, then as stored images name them."""
    rows = [*conn.execute(f"SELECT {_PATIENT_COLS} FROM order_patients WHERE patient_id=?", (pid,)),
            *conn.execute(f"SELECT {_PATIENT_COLS} FROM patients WHERE patient_id=?", (pid,))]
    return [r for r in rows if _same_id(r, pid, issuer)]


def _anchors(conn: sqlite3.Connection, v: dict, match_on) -> list[tuple[str, sqlite3.Row, str]]:
    """(what, its patient, accession) for every known order or stored study the object points to."""
    out = []
    acc, suid = v.get("AccessionNumber", "").strip(), v.get("StudyInstanceUID", "")
    order_cols = ("SELECT o.accession_number AS accession, p.patient_id, p.issuer_of_patient_id AS issuer,"
                  " p.patient_name AS name, p.patient_birth_date AS birth_date"
                  " FROM orders o JOIN order_patients p ON p.id = o.patient_pk")
    study_cols = ("SELECT s.accession_number AS accession, p.patient_id, p.issuer_of_patient_id AS issuer,"
                  " p.patient_name AS name, p.patient_birth_date AS birth_date"
                  " FROM studies s JOIN patients p ON p.id = s.patient_pk")
    if "accession" in match_on and acc:
        row = conn.execute(order_cols + " WHERE o.accession_number=?", (acc,)).fetchone()
        if row is not None:
            out.append((f"the order with accession {acc}", row, acc))
        else:
            for row in conn.execute(study_cols + " WHERE s.accession_number=?", (acc,)):
                out.append((f"the stored study with accession {acc}", row, acc))
    if "study_uid" in match_on and suid:
        row = conn.execute(order_cols + " WHERE o.study_instance_uid=?", (suid,)).fetchone()
        if row is not None:
            out.append(("the order with this Study Instance UID", row, row["accession"]))
        row = conn.execute(study_cols + " WHERE s.study_instance_uid=?", (suid,)).fetchone()
        if row is not None:
            out.append(("the stored study with this Study Instance UID", row, row["accession"]))
    return out


def classify(conn: sqlite3.Connection, v: dict, *, match_on=("patient_id", "accession", "study_uid"),
             need_known_patient: bool = True) -> Verdict:
    """Judge the object whose indexed values are ``v``.

    ``need_known_patient`` False (intake mode "check") makes a patient nobody knows acceptable:
    only contradictions hold the object.
    """
    pid, issuer = v.get("PatientID", "").strip(), v.get("IssuerOfPatientID", "").strip()
    name, birth_date = v.get("PatientName", ""), v.get("PatientBirthDate", "").strip()
    reasons: list[str] = []
    suggestion = ("", "")
    anchors = _anchors(conn, v, match_on)
    for what, row, acc in anchors:
        suggestion = suggestion if suggestion[0] else (row["patient_id"], acc)
        if not pid:
            reasons.append(f"{what} belongs to patient ID {row['patient_id']}; the object has no patient ID")
        elif not _same_id(row, pid, issuer):
            reasons.append(f"{what} belongs to another patient (patient ID {row['patient_id']})")
        else:
            differs = _disagreement(row, name, birth_date)
            if differs:
                reasons.append(f"{what} belongs to this patient ID with {differs}")
    known = known_patients(conn, pid, issuer) if pid and "patient_id" in match_on else []
    for row in known:
        differs = _disagreement(row, name, birth_date)
        if differs:
            reasons.append(f"patient ID {pid} is known with {differs}")
            suggestion = suggestion if suggestion[0] else (pid, "")
    if reasons:
        kind = UNKNOWN if not pid else CONFLICTING
        return Verdict(kind, list(dict.fromkeys(reasons)), *suggestion)
    if not pid:  # filed as it is, every such object would join one patient "" row with the first one's name
        return Verdict(UNKNOWN, ["the object has no patient ID"])
    if anchors:  # every order/study the object points to is this patient's
        return Verdict(MATCHED, [], pid, anchors[0][2])
    if known:
        if name:
            return Verdict(MATCHED, [], pid, "")
        if need_known_patient:
            return Verdict(UNKNOWN, [f"patient ID {pid} is known, but the object has no patient name to confirm it"],
                           pid, "")
        return Verdict(MATCHED, [], pid, "")
    if not need_known_patient:
        return Verdict(MATCHED, [], pid, "")
    return Verdict(UNKNOWN, [f"no patient with ID {pid} is known"])

"""Orders from a CSV file (a day's schedule exported from a calendar or an old system).

Layout: one header row naming the columns (any order; only ``patient_id``, ``patient_name``,
``modality``, ``station_ae`` and ``at`` are required), then one row per scheduled procedure step.
Rows that share an ``accession`` become one order with several steps; a row without accession is
an order of its own (an accession number is generated).  Lists (``other_ids``, ``alerts``,
``allergies``, several ``station_ae``) are separated by ``;``.  UTF-8 (with or without BOM) is
read as such; anything else is read as Windows-1252, which is what spreadsheets write.
Each order is checked and kept on its own: a bad row is reported with its row number and field
and does not stop the others.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from clinicbox.orders.model import NewOrder, OrderError, Step, parse_when

COLUMNS = {
    "patient_id": "Patient ID (required)",
    "patient_name": "FAMILY^GIVEN (required)",
    "birth_date": "YYYY-MM-DD",
    "sex": "M, F or O",
    "issuer": "Issuer of Patient ID",
    "other_ids": "other patient IDs, ;-separated",
    "alerts": "medical alerts, ;-separated",
    "allergies": "allergies, ;-separated",
    "accession": "accession number (generated when empty); rows sharing one form one order",
    "procedure_id": "Requested Procedure ID (default: the accession number)",
    "procedure": "requested procedure description",
    "procedure_code": "requested procedure code value",
    "code_scheme": "its coding scheme designator (default 99CLINICBOX)",
    "priority": "STAT, HIGH, ROUTINE, MEDIUM or LOW",
    "referring_physician": "FAMILY^GIVEN",
    "requesting_physician": "FAMILY^GIVEN",
    "contrast_agent": "requested contrast agent",
    "study_uid": "Study Instance UID (generated when empty)",
    "modality": "US, CR, DX, IO, OP, ES… (required)",
    "station_ae": "AE title(s) of the device, ;-separated (required)",
    "station_name": "scheduled station name",
    "at": "YYYY-MM-DD HH:MM (required)",
    "performing_physician": "FAMILY^GIVEN",
    "step_id": "Scheduled Procedure Step ID (generated when empty)",
    "step_description": "scheduled step description",
    "location": "scheduled location (room)",
}
REQUIRED = ("patient_id", "patient_name", "modality", "station_ae", "at")
# the order's own fields: rows of one order (one accession) must agree on them
ORDER_COLUMNS = ("patient_id", "patient_name", "birth_date", "sex", "issuer", "other_ids", "alerts", "allergies",
                 "procedure_id", "procedure", "procedure_code", "code_scheme", "priority", "referring_physician",
                 "requesting_physician", "contrast_agent", "study_uid")


@dataclass
class CsvReport:
    orders: int = 0
    steps: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (rows, message)
    accessions: list[str] = field(default_factory=list)


def _list(text: str) -> list[str]:
    return [v.strip() for v in (text or "").split(";") if v.strip()]


def read_text(path: Path) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def parse(text: str) -> tuple[list[tuple[str, NewOrder]], list[tuple[str, str]]]:
    """(rows label, order) for each order in the CSV, and (rows label, error) for the rows that fail."""
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    unknown = [h for h in header if h not in COLUMNS]
    missing = [c for c in REQUIRED if c not in header]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown column(s) {', '.join(unknown)}")
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        return [], [("header", "; ".join(problems) + f" (columns: {', '.join(COLUMNS)})")]
    reader.fieldnames = header
    groups: dict[str, list[tuple[int, dict]]] = {}
    for n, row in enumerate(reader, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k}
        if not any(row.values()):
            continue
        key = row.get("accession") or f"\0row{n}"
        groups.setdefault(key, []).append((n, row))
    orders, errors = [], []
    for rows in groups.values():
        label = ("rows " if len(rows) > 1 else "row ") + ", ".join(str(n) for n, _ in rows)
        first = rows[0][1]
        try:
            for n, row in rows[1:]:
                differ = [c for c in ORDER_COLUMNS if row.get(c, "") != first.get(c, "")]
                if differ:
                    raise OrderError(differ[0], f"row {n} shares accession {first.get('accession')} with row "
                                                f"{rows[0][0]} but has another {differ[0]} (one order, one patient)")
            steps = []
            for n, row in rows:
                for col in REQUIRED:
                    if not row.get(col):
                        raise OrderError(col, "is required")
                steps.append(Step(modality=row["modality"], station_ae_titles=_list(row["station_ae"]),
                                  start=parse_when("at", row["at"]), station_name=row.get("station_name", ""),
                                  performing_physician_name=row.get("performing_physician", ""),
                                  description=row.get("step_description", ""), location=row.get("location", ""),
                                  step_id=row.get("step_id", "")))
            order = NewOrder(
                patient_id=first["patient_id"], patient_name=first["patient_name"], steps=steps,
                patient_birth_date=first.get("birth_date", ""), patient_sex=first.get("sex", ""),
                issuer_of_patient_id=first.get("issuer", ""), other_patient_ids=_list(first.get("other_ids", "")),
                medical_alerts=_list(first.get("alerts", "")), allergies=_list(first.get("allergies", "")),
                accession_number=first.get("accession", ""), requested_procedure_id=first.get("procedure_id", ""),
                requested_procedure_description=first.get("procedure", ""),
                procedure_code_value=first.get("procedure_code", ""),
                procedure_code_scheme=first.get("code_scheme", "") or "99CLINICBOX",
                priority=first.get("priority", "") or "ROUTINE",
                referring_physician_name=first.get("referring_physician", ""),
                requesting_physician=first.get("requesting_physician", ""),
                requested_contrast_agent=first.get("contrast_agent", ""), study_instance_uid=first.get("study_uid", ""))
        except OrderError as exc:
            errors.append((label, str(exc)))
            continue
        orders.append((label, order))
    return orders, errors


def import_csv(book, path: Path, *, who: str, confirm: bool = False) -> CsvReport:
    """Add every good order of the CSV at ``path`` to ``book``; report the rest."""
    report = CsvReport()
    orders, errors = parse(read_text(path))
    report.errors.extend(errors)
    for label, order in orders:
        try:
            added = book.add(order, who=who, confirm=confirm)
        except OrderError as exc:
            report.errors.append((label, str(exc)))
            continue
        report.orders += 1
        report.steps += len(added.step_ids)
        report.accessions.append(added.accession_number)
    return report

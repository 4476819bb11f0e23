"""``clinicbox worklist …``: orders on the modality worklist, MPPS received, devices' last queries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clinicbox.cli.common import EXIT_CONFIG, _common, _open_archive, _who, print_rows
from clinicbox.core import config as cfg


def add_parser(sub) -> None:
    p = sub.add_parser("worklist", help="orders on the modality worklist: add, list, show, cancel, import; MPPS")
    wsub = p.add_subparsers(dest="worklist_command", metavar="SUBCOMMAND", required=True)
    a = wsub.add_parser("add", help="add an order (one scheduled procedure step) to the worklist")
    _common(a)
    g = a.add_argument_group("patient")
    g.add_argument("--patient-id", required=True, help="the clinic's patient ID")
    g.add_argument("--patient-name", required=True, help="FAMILY^GIVEN, e.g. DOE^JANE")
    g.add_argument("--birth-date", default="", help="YYYY-MM-DD")
    g.add_argument("--sex", default="", help="M, F or O")
    g.add_argument("--issuer", default="", help="issuer of the patient ID")
    g.add_argument("--other-id", action="append", default=[], help="another ID of the patient (repeatable)")
    g.add_argument("--alert", action="append", default=[], help="a medical alert (repeatable)")
    g.add_argument("--allergy", action="append", default=[], help="an allergy (repeatable)")
    g.add_argument("--confirm", action="store_true",
                   help="the patient ID is known with another name/birth date: take this one")
    g = a.add_argument_group("order")
    g.add_argument("--accession", default="", help="accession number (generated when not given)")
    g.add_argument("--procedure", default="", help="requested procedure description, e.g. 'US abdomen'")
    g.add_argument("--procedure-id", default="", help="Requested Procedure ID (default: the accession number)")
    g.add_argument("--procedure-code", default="", help="requested procedure code value")
    g.add_argument("--code-scheme", default="99CLINICBOX", help="coding scheme of --procedure-code")
    g.add_argument("--priority", default="ROUTINE", help="STAT, HIGH, ROUTINE, MEDIUM or LOW")
    g.add_argument("--referring", default="", help="referring physician, FAMILY^GIVEN")
    g.add_argument("--requesting", default="", help="requesting physician, FAMILY^GIVEN")
    g.add_argument("--contrast", default="", help="requested contrast agent")
    g.add_argument("--study-uid", default="", help="Study Instance UID (generated when not given)")
    g = a.add_argument_group("scheduled procedure step")
    g.add_argument("--modality", required=True, help="US, CR, DX, IO, OP, ES…")
    g.add_argument("--station-ae", required=True, action="append",
                   help="AE title (or device name) of the device that does it (repeatable)")
    g.add_argument("--station-name", default="", help="scheduled station name")
    g.add_argument("--at", default="", help='start, "YYYY-MM-DD HH:MM" (default: now)')
    g.add_argument("--performing", default="", help="scheduled performing physician, FAMILY^GIVEN")
    g.add_argument("--step-id", default="", help="Scheduled Procedure Step ID (generated when not given)")
    g.add_argument("--step-description", default="", help="step description (default: the procedure)")
    g.add_argument("--location", default="", help="room")
    a.add_argument("--by", default="", help="who adds it (default: the login name)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=cmd_worklist_add)

    a = wsub.add_parser("list", help="list orders (default: today's)")
    _common(a)
    a.add_argument("--date", default="today", help="YYYY-MM-DD, today, or all (default today)")
    a.add_argument("--status", default=None, help="SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED or CANCELLED")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=cmd_worklist_list)

    a = wsub.add_parser("show", help="one order with its steps, MPPS and history")
    _common(a)
    a.add_argument("accession")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_worklist_show)

    a = wsub.add_parser("cancel", help="cancel an order: it leaves the worklist")
    _common(a)
    a.add_argument("accession")
    a.add_argument("--reason", default="", help="why (kept in the order's history)")
    a.add_argument("--by", default="", help="who cancels it (default: the login name)")
    a.set_defaults(func=cmd_worklist_cancel)

    a = wsub.add_parser("import", help="add the orders of a CSV file (see --columns)")
    _common(a)
    a.add_argument("csv", nargs="?", help="the CSV file")
    a.add_argument("--columns", action="store_true", help="print the CSV columns and exit")
    a.add_argument("--confirm", action="store_true", help="accept changed names/birth dates of known patient IDs")
    a.add_argument("--by", default="", help="who imports (default: the login name)")
    a.set_defaults(func=cmd_worklist_import)

    a = wsub.add_parser("performed", help="performed procedure steps (MPPS) received from modalities")
    _common(a)
    a.add_argument("--unscheduled", action="store_true", help="only those matching no order (to reconcile)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_worklist_performed)

    a = wsub.add_parser("queries", help="the last worklist query of each device")
    _common(a)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_worklist_queries)


def _open_book(config: cfg.Config):
    from clinicbox.orders.book import OrderBook

    archive = _open_archive(config)
    book = OrderBook(archive)
    book.open()
    return book


def _dicom_date(text: str) -> str | None:
    from datetime import date, timedelta

    text = text.strip().lower()
    if text in ("all", ""):
        return None
    if text == "today":
        return date.today().strftime("%Y%m%d")
    if text == "tomorrow":
        return (date.today() + timedelta(days=1)).strftime("%Y%m%d")
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            from datetime import datetime

            return datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            pass
    raise cfg.ConfigError("--date", f"{text!r} is not a date (YYYY-MM-DD, today, tomorrow or all)")


def cmd_worklist_add(args, config: cfg.Config) -> int:
    from datetime import datetime

    from clinicbox.orders.model import NewOrder, OrderError, Step, parse_when

    book = _open_book(config)
    try:
        named = {d["name"]: d["ae_title"] for d in book.archive.index.devices() if d["name"]}
        stations = [named.get(s, s) for s in args.station_ae]
        try:
            start = parse_when("--at", args.at) if args.at else datetime.now().replace(second=0, microsecond=0)
            order = NewOrder(
                patient_id=args.patient_id, patient_name=args.patient_name, patient_birth_date=args.birth_date,
                patient_sex=args.sex, issuer_of_patient_id=args.issuer, other_patient_ids=args.other_id,
                medical_alerts=args.alert, allergies=args.allergy, accession_number=args.accession,
                requested_procedure_id=args.procedure_id, requested_procedure_description=args.procedure,
                procedure_code_value=args.procedure_code, procedure_code_scheme=args.code_scheme,
                priority=args.priority, referring_physician_name=args.referring,
                requesting_physician=args.requesting, requested_contrast_agent=args.contrast,
                study_instance_uid=args.study_uid,
                steps=[Step(modality=args.modality, station_ae_titles=stations, start=start,
                            station_name=args.station_name, performing_physician_name=args.performing,
                            description=args.step_description, location=args.location, step_id=args.step_id)])
            added = book.add(order, who=_who(args), confirm=args.confirm)
        except OrderError as exc:
            print(f"clinicbox: {_flag(exc.field)}: {exc.problem}", file=sys.stderr)
            return 1
    finally:
        book.archive.close()
    if args.json:
        print(json.dumps({"accession_number": added.accession_number, "study_instance_uid": added.study_instance_uid,
                          "requested_procedure_id": added.requested_procedure_id,
                          "step_ids": list(added.step_ids), "patient_reused": added.patient_reused}, indent=2))
    else:
        print(f"order {added.accession_number}: {args.modality.upper()} on {'/'.join(stations)} at "
              f"{start:%Y-%m-%d %H:%M}" + (" (known patient)" if added.patient_reused else ""))
    return 0


_FLAGS = {"patient_id": "--patient-id", "patient_name": "--patient-name", "birth_date": "--birth-date",
          "sex": "--sex", "accession": "--accession", "procedure": "--procedure", "procedure_id": "--procedure-id",
          "procedure_code": "--procedure-code", "priority": "--priority", "referring_physician": "--referring",
          "requesting_physician": "--requesting", "station_ae": "--station-ae", "modality": "--modality",
          "study_uid": "--study-uid", "step_id": "--step-id", "station_name": "--station-name",
          "location": "--location", "performing_physician": "--performing", "other_ids": "--other-id",
          "alerts": "--alert", "allergies": "--allergy", "issuer_of_patient_id": "--issuer",
          "contrast_agent": "--contrast", "step_description": "--step-description", "code_scheme": "--code-scheme"}


def _flag(field: str) -> str:
    return _FLAGS.get(field, field)


def _when(step: dict) -> str:
    d, t = step["start_date"], step["start_time"]
    return f"{d[:4]}-{d[4:6]}-{d[6:8]} {t[:2]}:{t[2:4]}"


def cmd_worklist_list(args, config: cfg.Config) -> int:
    from clinicbox.orders.model import OrderError

    date = _dicom_date(args.date)
    book = _open_book(config)
    try:
        rows = book.orders(date=date, status=args.status)
    except OrderError as exc:
        print(f"clinicbox: --status: {exc.problem}", file=sys.stderr)
        return 1
    finally:
        book.archive.close()
    return print_rows(
        rows, as_json=args.json, empty="no orders" + (f" on {args.date}" if date else ""),
        header=f"{'When':16}  {'Mod':4}  {'Station':10}  {'Accession':12}  {'Patient ID':12}  {'Name':22}  "
               f"{'Status':12}  {'Images':6}  Procedure",
        line=lambda r: [f"{_when(s):16}  {s['modality']:4}  {s['station_ae_titles'][:10]:10}  {r['accession_number']:12}  "
                        f"{r['patient_id'][:12]:12}  {r['patient_name'][:22]:22}  {r['status']:12}  {r['images']:<6}  "
                        f"{(s['description'] or r['requested_procedure_description'])[:30]}" for s in r["steps"]])


def cmd_worklist_show(args, config: cfg.Config) -> int:
    book = _open_book(config)
    try:
        order = book.order(args.accession)
        history = book.history(args.accession) if order else []
    finally:
        book.archive.close()
    if order is None:
        print(f"clinicbox: no order {args.accession!r}", file=sys.stderr)
        return 1
    order["history"] = history
    if args.json:
        print(json.dumps(order, indent=2, ensure_ascii=False))
        return 0
    for key in ("accession_number", "status", "patient_id", "patient_name", "patient_birth_date", "patient_sex",
                "requested_procedure_id", "requested_procedure_description", "priority", "referring_physician_name",
                "study_instance_uid", "images", "first_image_at", "last_image_at"):
        print(f"{key.replace('_', ' '):32} {order[key] if order[key] is not None else ''}")
    for s in order["steps"]:
        print(f"step {s['step_id']}: {s['modality']} on {s['station_ae_titles']} at {_when(s)} — {s['status']}")
    for p in order["performed"]:
        print(f"MPPS {p['sop_instance_uid']}: {p['status']}, {p['series_count']} series, {p['image_count']} image(s)"
              + (f", reason: {p['discontinuation_reason']}" if p["discontinuation_reason"] else ""))
    for h in history:
        print(f"{h['at']}  {h['who']:16}  {h['what']}" + (f" — {h['detail']}" if h["detail"] else ""))
    return 0


def cmd_worklist_cancel(args, config: cfg.Config) -> int:
    from clinicbox.orders.model import OrderError

    book = _open_book(config)
    try:
        book.cancel(args.accession, who=_who(args), reason=args.reason)
    except OrderError as exc:
        print(f"clinicbox: {exc.problem}", file=sys.stderr)
        return 1
    finally:
        book.archive.close()
    print(f"order {args.accession} cancelled")
    return 0


def cmd_worklist_import(args, config: cfg.Config) -> int:
    from clinicbox.orders.csvimport import COLUMNS, import_csv

    if args.columns or not args.csv:
        print("CSV columns (header row required; rows sharing an accession form one order):")
        for name, doc in COLUMNS.items():
            print(f"  {name:22} {doc}")
        return 0 if args.columns else EXIT_CONFIG
    if not Path(args.csv).is_file():
        print(f"clinicbox: {args.csv}: no such file", file=sys.stderr)
        return 1
    book = _open_book(config)
    try:
        report = import_csv(book, Path(args.csv), who=_who(args), confirm=args.confirm)
    finally:
        book.archive.close()
    print(f"added {report.orders} order(s) with {report.steps} step(s); {len(report.errors)} refused")
    for label, message in report.errors:
        print(f"  {label}: {message}")
    return 1 if report.errors and not report.orders else 0


def cmd_worklist_performed(args, config: cfg.Config) -> int:
    book = _open_book(config)
    try:
        rows = book.performed(unscheduled_only=args.unscheduled)
    finally:
        book.archive.close()
    def line(r):
        d, t = r["start_date"], r["start_time"]
        started = f"{d[:4]}-{d[4:6]}-{d[6:8]} {t[:2]}:{t[2:4]}" if len(d) == 8 else d
        return (f"{started:16}  {r['performed_station_ae'][:12]:12}  {r['modality']:4}  {r['status']:12}  "
                f"{(r['order_accession'] or 'UNSCHEDULED')[:12]:12}  {r['patient_id'][:12]:12}  {r['image_count']}")

    return print_rows(rows, as_json=args.json, empty="no performed procedure steps", line=line,
                      header=f"{'Started':16}  {'Station':12}  {'Mod':4}  {'Status':12}  {'Order':12}  "
                             f"{'Patient ID':12}  Images")


def cmd_worklist_queries(args, config: cfg.Config) -> int:
    book = _open_book(config)
    try:
        rows = book.last_queries()
    finally:
        book.archive.close()
    return print_rows(rows, as_json=args.json, empty="no worklist queries yet",
                      json_rows=[{**r, "identifier": json.loads(r["identifier"])} for r in rows],
                      line=lambda r: f"{r['at']}  {r['ae_title']:16}  {r['host']:15}  {r['answers']} item(s)  {r['status']}")

"""``clinicbox`` command line: a thin layer over the rooms, built through the composition root."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from clinicbox import __version__
from clinicbox.core import config as cfg
from clinicbox.archive.index import CHARSETS, DEVICE_ROLES
from clinicbox.core.logging import setup_logging

EXIT_CONFIG = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML configuration file (default: ${cfg.ENV_CONFIG}, else built-in defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="data folder (overrides storage.data_dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinicbox", description="ClinicBox: a PACS appliance for small clinics.")
    parser.add_argument("--version", action="version", version=f"clinicbox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the appliance: the DICOM service on one port, in the foreground")
    _common(p)
    p.add_argument("--port", type=int, help="TCP port (overrides server.port; default 11112)")
    p.add_argument("--ae-title", help="our AE title (overrides server.ae_title; default CLINICBOX)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import", help="import DICOM files, folders or media (CD/USB with DICOMDIR)")
    _common(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to import")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("studies", help="list the stored studies")
    _common(p)
    p.add_argument("--patient-id", help="only this patient's studies")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("devices", help="the devices ClinicBox knows: add, list, remove")
    dsub = p.add_subparsers(dest="devices_command", metavar="SUBCOMMAND", required=True)
    d = dsub.add_parser("add", help="add or change a device (a C-MOVE destination, a device allowed to query)")
    _common(d)
    d.add_argument("name", help="a name staff recognise, e.g. US-ROOM-1")
    d.add_argument("--ae", required=True, help="the device's AE title")
    d.add_argument("--host", required=True, help="its IP address or host name")
    d.add_argument("--port", type=int, required=True, help="its DICOM port")
    d.add_argument("--role", default="workstation", choices=DEVICE_ROLES, help="what it is (default workstation)")
    d.add_argument("--charset", choices=CHARSETS, default="",
                   help="character set of its worklist answers (default: worklist.charset, or what it asks for)")
    own = d.add_mutually_exclusive_group()
    own.add_argument("--own-station-only", dest="own_station_only", action="store_true", default=None,
                     help="a worklist query without station AE title gets only this device's steps")
    own.add_argument("--all-stations", dest="own_station_only", action="store_false",
                     help="a worklist query without station AE title gets every station's steps")
    d.set_defaults(func=cmd_devices_add)
    d = dsub.add_parser("list", help="list known and seen devices")
    _common(d)
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=cmd_devices_list)
    d = dsub.add_parser("remove", help="remove a device by name (or AE title)")
    _common(d)
    d.add_argument("name", help="the device's name or AE title")
    d.set_defaults(func=cmd_devices_remove)

    _worklist_parser(sub)
    _jobs_parser(sub)

    p = sub.add_parser("config", help="show or check configuration")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = csub.add_parser("show-default", help="print the default configuration, every key commented")
    c.set_defaults(func=cmd_config_show_default)
    c = csub.add_parser("check", help="validate a configuration file")
    c.add_argument("file", help="the TOML file to check")
    c.set_defaults(func=cmd_config_check)
    return parser


def _worklist_parser(sub) -> None:
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


def _jobs_parser(sub) -> None:
    p = sub.add_parser("jobs", help="scheduled jobs: list, run one now, history")
    jsub = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND", required=True)
    j = jsub.add_parser("list", help="the jobs, their schedules and last runs")
    _common(j)
    j.set_defaults(func=cmd_jobs_list)
    j = jsub.add_parser("run", help="run a job now (also while the service runs; runs never overlap)")
    _common(j)
    j.add_argument("name", help="the job (clinicbox jobs list)")
    j.set_defaults(func=cmd_jobs_run)
    j = jsub.add_parser("history", help="recorded runs: start, end, outcome, figures, errors")
    _common(j)
    j.add_argument("--job", help="only this job")
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs_history)

    p = sub.add_parser("backup", help="back up now, list backups, verify one")
    bsub = p.add_subparsers(dest="backup_command", metavar="SUBCOMMAND", required=True)
    b = bsub.add_parser("run", help="make a backup now (recorded as a job run)")
    _common(b)
    b.add_argument("--to", metavar="DIR", help="backup target (default: backup.target)")
    b.set_defaults(func=cmd_backup_run)
    b = bsub.add_parser("list", help="the finished backups on the target")
    _common(b)
    b.add_argument("--to", metavar="DIR", help="backup target (default: backup.target)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backup_list)
    b = bsub.add_parser("verify", help="check a backup's index snapshot and every object's checksum")
    _common(b)
    b.add_argument("id", nargs="?", default="latest", help="backup ID (default: the latest)")
    b.add_argument("--to", metavar="DIR", help="backup target (default: backup.target)")
    b.set_defaults(func=cmd_backup_verify)

    p = sub.add_parser("restore", help="rebuild a data dir from a backup")
    _common(p)
    p.add_argument("backup", help="backup ID, or latest")
    p.add_argument("--from", dest="source", metavar="DIR", help="backup target holding it (default: backup.target)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("retention", help="what the retention rules would delete, and why (a dry run)")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="list kept studies too")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("hold", help="legal holds: studies or patients retention must keep")
    hsub = p.add_subparsers(dest="hold_command", metavar="SUBCOMMAND", required=True)
    for name, helptext in (("add", "put a patient or study on legal hold"), ("remove", "lift a legal hold")):
        h = hsub.add_parser(name, help=helptext)
        _common(h)
        what = h.add_mutually_exclusive_group(required=True)
        what.add_argument("--patient-id")
        what.add_argument("--study", metavar="STUDY_INSTANCE_UID")
        h.add_argument("--reason", default="", help="why (kept in the audit log)")
        h.add_argument("--by", default="", help="who (default: the login name)")
        h.set_defaults(func=cmd_hold_add if name == "add" else cmd_hold_remove)
    h = hsub.add_parser("list", help="the legal holds")
    _common(h)
    h.set_defaults(func=cmd_hold_list)

    p = sub.add_parser("status", help="counts, disk space, last backup and last verified restore")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def _load_config(args) -> cfg.Config:
    config = cfg.load(getattr(args, "config", None))
    return config.with_overrides(data_dir=getattr(args, "data_dir", None), port=getattr(args, "port", None),
                                 ae_title=getattr(args, "ae_title", None))


def _open_archive(config: cfg.Config):
    from clinicbox.archive.ingest import Archive

    archive = Archive(config.storage)
    archive.open()
    return archive


def cmd_serve(args, config: cfg.Config) -> int:
    from clinicbox.app import DataDirBusy, make_appliance

    appliance = make_appliance(config)
    try:
        appliance.run_forever()
    except DataDirBusy as exc:
        print(f"clinicbox: storage.data_dir: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        if exc.errno == 98:  # EADDRINUSE
            print(f"clinicbox: server.port: port {config.server.port} is already in use", file=sys.stderr)
            return EXIT_CONFIG
        raise
    return 0


def cmd_import(args, config: cfg.Config) -> int:
    from clinicbox.archive.importer import import_paths

    archive = _open_archive(config)
    show = not args.quiet and sys.stderr.isatty()

    def progress(n: int, total: int) -> None:
        if show:
            width = 30
            done = int(width * n / max(total, 1))
            print(f"\r[{'#' * done}{'.' * (width - done)}] {n}/{total}", end="", file=sys.stderr, flush=True)

    try:
        summary = import_paths(archive, [Path(p) for p in args.paths], progress)
    finally:
        archive.close()
    if show:
        print(file=sys.stderr)
    print(f"imported {summary.imported}, duplicates {summary.duplicates}, rejected {len(summary.rejected)}")
    for reason, count in summary.reasons.most_common():
        print(f"  rejected {count}: {reason}")
    for path, reason in summary.rejected[:50]:
        print(f"  {path}: {reason}", file=sys.stderr)
    return 1 if summary.rejected and not (summary.imported or summary.duplicates) else 0


def cmd_studies(args, config: cfg.Config) -> int:
    archive = _open_archive(config)
    try:
        rows = archive.index.studies(patient_id=args.patient_id)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no studies")
        return 0
    cols = [("patient_id", "Patient ID", 14), ("patient_name", "Name", 24), ("study_date", "Date", 8),
            ("modalities_in_study", "Mod", 6), ("num_series", "Ser", 4), ("num_instances", "Inst", 6),
            ("accession_number", "Accession", 12), ("study_description", "Description", 30)]
    print("  ".join(title.ljust(w) for _k, title, w in cols))
    for r in rows:
        print("  ".join(str(r[k] if r[k] is not None else "")[:w].ljust(w) for k, _t, w in cols))
    return 0


def cmd_devices_add(args, config: cfg.Config) -> int:
    cfg.check_ae_title("--ae", args.ae)
    if not 0 < args.port < 65536:
        raise cfg.ConfigError("--port", f"{args.port} is not a TCP port")
    archive = _open_archive(config)
    try:
        archive.add_device(args.name, args.ae, args.host, args.port, args.role, args.charset, args.own_station_only)
    except ValueError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        return 1
    finally:
        archive.close()
    print(f"device {args.name}: {args.ae} at {args.host}:{args.port} ({args.role})")
    return 0


def cmd_devices_list(args, config: cfg.Config) -> int:
    archive = _open_archive(config)
    try:
        rows = archive.index.devices()
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no devices")
        return 0
    print(f"{'Name':16}  {'AE title':16}  {'Host':16}  {'Port':5}  {'Role':11}  Last seen")
    for r in rows:
        print(f"{r['name'] or '-':16}  {r['ae_title']:16}  {r['host']:16}  {r['port'] or '':<5}  "
              f"{r['role']:11}  {r['last_seen']}")
    return 0


def cmd_devices_remove(args, config: cfg.Config) -> int:
    archive = _open_archive(config)
    try:
        removed = archive.remove_device(args.name)
    finally:
        archive.close()
    if not removed:
        print(f"clinicbox: no device {args.name!r}", file=sys.stderr)
        return 1
    print(f"removed {args.name}")
    return 0


def _who(args) -> str:
    import getpass

    if getattr(args, "by", ""):
        return args.by
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except Exception:
        return "cli"


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
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no orders" + (f" on {args.date}" if date else ""))
        return 0
    print(f"{'When':16}  {'Mod':4}  {'Station':10}  {'Accession':12}  {'Patient ID':12}  {'Name':22}  "
          f"{'Status':12}  {'Images':6}  Procedure")
    for r in rows:
        for s in r["steps"]:
            print(f"{_when(s):16}  {s['modality']:4}  {s['station_ae_titles'][:10]:10}  {r['accession_number']:12}  "
                  f"{r['patient_id'][:12]:12}  {r['patient_name'][:22]:22}  {r['status']:12}  {r['images']:<6}  "
                  f"{(s['description'] or r['requested_procedure_description'])[:30]}")
    return 0


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
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no performed procedure steps")
        return 0
    print(f"{'Started':16}  {'Station':12}  {'Mod':4}  {'Status':12}  {'Order':12}  {'Patient ID':12}  Images")
    for r in rows:
        d, t = r["start_date"], r["start_time"]
        started = f"{d[:4]}-{d[4:6]}-{d[6:8]} {t[:2]}:{t[2:4]}" if len(d) == 8 else d
        print(f"{started:16}  {r['performed_station_ae'][:12]:12}  {r['modality']:4}  {r['status']:12}  "
              f"{(r['order_accession'] or 'UNSCHEDULED')[:12]:12}  {r['patient_id'][:12]:12}  {r['image_count']}")
    return 0


def cmd_worklist_queries(args, config: cfg.Config) -> int:
    book = _open_book(config)
    try:
        rows = book.last_queries()
    finally:
        book.archive.close()
    if args.json:
        print(json.dumps([{**r, "identifier": json.loads(r["identifier"])} for r in rows], indent=2))
        return 0
    if not rows:
        print("no worklist queries yet")
        return 0
    for r in rows:
        print(f"{r['at']}  {r['ae_title']:16}  {r['host']:15}  {r['answers']} item(s)  {r['status']}")
    return 0


def _open_jobs(config: cfg.Config):
    from clinicbox.jobs.runner import open_jobs

    archive = _open_archive(config)
    open_jobs(archive)
    return archive


def _with_target(config: cfg.Config, target: str | None) -> cfg.Config:
    from dataclasses import replace

    return replace(config, backup=replace(config.backup, target=str(target))) if target else config


def _backup_target(config: cfg.Config, target: str | None) -> Path:
    config = _with_target(config, target)
    if not config.backup.target:
        raise cfg.ConfigError("backup.target", "no backup target: set it in the config or give --to DIR")
    return Path(config.backup.target)


def cmd_jobs_list(args, config: cfg.Config) -> int:
    from clinicbox.jobs.runner import JOBS, history

    archive = _open_jobs(config)
    try:
        print(f"{'Job':14}  {'Schedule':14}  {'Last run':26}  Outcome")
        for name, job in JOBS.items():
            schedule = getattr(config.jobs, name.replace("-", "_"), "") or "-"
            if name in ("backup", "restore-test") and not config.backup.target:
                schedule = "(no target)"
            last = history(archive, name, 1)
            when = last[0]["started_at"] if last else "never"
            outcome = last[0]["outcome"] if last else ""
            print(f"{name:14}  {schedule:14}  {when:26}  {outcome}   {job.doc}")
    finally:
        archive.close()
    return 0


def cmd_jobs_run(args, config: cfg.Config) -> int:
    from clinicbox.jobs.runner import JOBS, run_job

    if args.name not in JOBS:
        print(f"clinicbox: no job {args.name!r} (jobs: {', '.join(JOBS)})", file=sys.stderr)
        return 1
    archive = _open_jobs(config)
    try:
        run = run_job(args.name, config, archive)
    finally:
        archive.close()
    print(json.dumps(run, indent=2))
    return 0 if run["outcome"] == "ok" else 1


def cmd_jobs_history(args, config: cfg.Config) -> int:
    from clinicbox.jobs.runner import history

    archive = _open_jobs(config)
    try:
        rows = history(archive, args.job)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no job runs yet")
    for r in rows:
        extra = r["error"] or ", ".join(f"{k} {v}" for k, v in r["figures"].items() if k != "pruned")
        print(f"{r['started_at']}  {r['job']:14}  {r['trigger']:8}  {r['outcome']:8}  {extra}")
    return 0


def cmd_backup_run(args, config: cfg.Config) -> int:
    from clinicbox.jobs.runner import run_job

    config = _with_target(config, args.to)
    _backup_target(config, None)
    archive = _open_jobs(config)
    try:
        run = run_job("backup", config, archive)
    finally:
        archive.close()
    if run["outcome"] != "ok":
        print(f"clinicbox: backup {run['outcome']}: {run['error']}", file=sys.stderr)
        return 1
    f = run["figures"]
    print(f"backup {f['backup']}: {f['instances']} instances, {f['copied']} copied "
          f"({f['copied_bytes'] / 1e6:.1f} MB), {f['reused']} already there, {f['seconds']} s")
    return 0


def cmd_backup_list(args, config: cfg.Config) -> int:
    from clinicbox.jobs.backup import list_backups

    rows = list_backups(_backup_target(config, args.to))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no backups")
    for b in rows:
        print(f"{b['id']}  {b['created']}  {b['instances']} instances, {b['studies']} studies, "
              f"{(b['bytes'] or 0) / 1e6:.1f} MB")
    return 0


def cmd_backup_verify(args, config: cfg.Config) -> int:
    from clinicbox.jobs.backup import BackupError, verify_backup

    try:
        result = verify_backup(_backup_target(config, args.to), args.id)
    except BackupError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def cmd_restore(args, config: cfg.Config) -> int:
    from clinicbox.jobs.backup import BackupError, restore

    if not args.data_dir:
        print("clinicbox: restore needs --data-dir NEW (a new, empty folder)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result = restore(_backup_target(config, args.source), args.backup, Path(args.data_dir))
    except BackupError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        return 1
    archive = _open_archive(config)  # migrations and fan-out folders of the restored data dir
    archive.close()
    print(f"restored backup {result['backup']} into {result['data_dir']}: {result['restored']} instances "
          f"in {result['seconds']} s")
    return 0


def cmd_retention(args, config: cfg.Config) -> int:
    from clinicbox.jobs.retention import run_retention

    archive = _open_jobs(config)
    try:
        result = run_retention(config, archive, dry_run=True)
    finally:
        archive.close()
    rows = result["plan"] if args.all else [v for v in result["plan"] if v["action"] == "delete"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    state = "on" if config.retention.enabled else "OFF (retention.enabled = false: nothing is deleted)"
    print(f"retention {state}; {result['studies']} studies, {result['to_delete']} past their keeping time "
          "and deletable")
    for v in rows:
        print(f"  {v['action']:6}  {v['study_instance_uid']}  {v['study_date'] or '-':8}  "
              f"{'/'.join(v['modalities']) or '-':8}  {v['why']}")
    return 0


def _hold(args, config: cfg.Config, add: bool) -> int:
    from clinicbox.archive.index import utcnow
    from clinicbox.jobs.retention import audit

    kind, value = ("patient", args.patient_id) if args.patient_id else ("study", args.study)
    who = _who(args)
    archive = _open_jobs(config)

    def write(conn):
        if add:
            conn.execute("INSERT OR REPLACE INTO legal_holds (kind, value, reason, who, at) VALUES (?,?,?,?,?)",
                         (kind, value, args.reason, who, utcnow()))
        elif not conn.execute("DELETE FROM legal_holds WHERE kind=? AND value=?", (kind, value)).rowcount:
            return False
        audit(conn, who, "legal hold added" if add else "legal hold lifted",
              {"kind": kind, "value": value, "reason": args.reason})
        return True

    try:
        done = archive.writer.call(write)
    finally:
        archive.close()
    if not done:
        print(f"clinicbox: no legal hold on {kind} {value}", file=sys.stderr)
        return 1
    print(f"legal hold {'on' if add else 'lifted from'} {kind} {value}")
    return 0


def cmd_hold_add(args, config: cfg.Config) -> int:
    return _hold(args, config, True)


def cmd_hold_remove(args, config: cfg.Config) -> int:
    return _hold(args, config, False)


def cmd_hold_list(args, config: cfg.Config) -> int:
    archive = _open_jobs(config)
    try:
        rows = archive.index.conn.execute("SELECT kind, value, reason, who, at FROM legal_holds ORDER BY at").fetchall()
    finally:
        archive.close()
    if not rows:
        print("no legal holds")
    for r in rows:
        print(f"{r['at']}  {r['kind']:7}  {r['value']}  {r['who']}  {r['reason']}")
    return 0


def cmd_status(args, config: cfg.Config) -> int:
    from clinicbox.jobs.runner import last_ok

    archive = _open_jobs(config)
    try:
        state, free = archive.disk_state()
        counts = archive.index.counts()
        backup = last_ok(archive, "backup")
        verified = last_ok(archive, "restore-test")
        unhealthy = dict(archive.index.conn.execute(
            "SELECT state, count(*) FROM instances WHERE state != 'ok' GROUP BY state").fetchall())
    finally:
        archive.close()
    status = {"data_dir": str(config.data_dir), "disk": {"state": state, "free_mb": free // (1024 * 1024),
              "warning_below_mb": config.storage.min_free_warning_mb,
              "refusing_below_mb": config.storage.min_free_critical_mb}, **counts,
              "backup_target": config.backup.target or None,
              "last_backup": backup["started_at"] if backup else None,
              "last_verified_restore": verified["started_at"] if verified else None,
              "instances_not_ok": unhealthy}
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"data dir           {status['data_dir']}")
    print(f"disk               {state}, {status['disk']['free_mb']} MB free (warning below "
          f"{config.storage.min_free_warning_mb} MB, stores refused below {config.storage.min_free_critical_mb} MB)")
    print(f"stored             {counts['patients']} patients, {counts['studies']} studies, "
          f"{counts['instances']} instances")
    print(f"backup target      {config.backup.target or 'NONE: this box holds the only copy'}")
    print(f"last backup        {status['last_backup'] or 'never'}")
    print(f"last verified restore {status['last_verified_restore'] or 'never'}")
    if unhealthy:
        print("NOT OK             " + ", ".join(f"{n} {state}" for state, n in unhealthy.items())
              + " (clinicbox jobs run scrub repairs from the backup)")
    return 0


def cmd_config_show_default(args, config: cfg.Config) -> int:
    print(cfg.default_toml())
    return 0


def cmd_config_check(args, config: cfg.Config) -> int:
    cfg.load(args.file)
    print(f"{args.file}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = cfg.Config() if args.func in (cmd_config_show_default, cmd_config_check) else _load_config(args)
        setup_logging(config.logging)
        return args.func(args, config)
    except cfg.ConfigError as exc:
        print(f"clinicbox: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `clinicbox config show-default | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        logging.shutdown()

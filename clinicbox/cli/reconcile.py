"""``clinicbox reconcile …`` (the queue of held objects) and ``clinicbox documents …`` (view what was sent)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clinicbox.cli.common import _common, _open_archive, _who, print_rows
from clinicbox.core import config as cfg
from clinicbox.reconcile import schema


def add_parsers(sub) -> None:
    p = sub.add_parser("reconcile", help="objects held until a person decides whose they are: list, show, assign, "
                                         "new-patient, reject")
    rsub = p.add_subparsers(dest="reconcile_command", metavar="SUBCOMMAND", required=True)
    a = rsub.add_parser("list", help="items waiting (default) or decided")
    _common(a)
    a.add_argument("--status", default=schema.HELD, choices=(*schema.STATUSES, "all"),
                   help="which items (default held: waiting for a decision)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=cmd_list)
    a = rsub.add_parser("show", help="one item: why it is held, what it claims, its objects")
    _common(a)
    a.add_argument("id", type=int, help="item number (from reconcile list)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=cmd_show)
    a = rsub.add_parser("assign", help="file the item under a known patient (and order); the values replaced are "
                                       "kept in Original Attributes Sequence")
    _common(a)
    a.add_argument("id", type=int, help="item number")
    a.add_argument("--patient-id", required=True, help="the patient the objects belong to")
    a.add_argument("--issuer", default=None, help="issuer of that patient ID, when the ID alone is ambiguous")
    a.add_argument("--accession", default=None, help="attach to this order (or stored study) of the patient")
    a.add_argument("--by", default="", help="who decides (default: the login name)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=cmd_assign)
    a = rsub.add_parser("new-patient", help="accept the item as a patient not known before")
    _common(a)
    a.add_argument("id", type=int, help="item number")
    a.add_argument("--patient-id", default=None, help="file under this ID instead of the one the objects carry")
    a.add_argument("--name", default=None, help="correct the patient name, FAMILY^GIVEN")
    a.add_argument("--birth-date", default=None, help="correct the birth date, YYYYMMDD")
    a.add_argument("--sex", default=None, choices=("M", "F", "O"), help="correct the sex")
    a.add_argument("--by", default="", help="who decides (default: the login name)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=cmd_new_patient)
    a = rsub.add_parser("reject", help="move the item to the trash (removed after reconcile.trash_days)")
    _common(a)
    a.add_argument("id", type=int, help="item number")
    a.add_argument("--reason", required=True, help="why, for the audit log")
    a.add_argument("--by", default="", help="who decides (default: the login name)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=cmd_reject)

    p = sub.add_parser("documents", help="documents and photos sent by EMRs and capture stations: list, export")
    dsub = p.add_subparsers(dest="documents_command", metavar="SUBCOMMAND", required=True)
    a = dsub.add_parser("list", help="documents (PDF, CDA, photos, scans) in the archive")
    _common(a)
    a.add_argument("--patient-id", default=None, help="only this patient's")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=cmd_documents_list)
    a = dsub.add_parser("export", help="write the PDF (or image, or CDA) inside a stored or held object to a file")
    _common(a)
    a.add_argument("id", help="SOP Instance UID of the object (from documents list or reconcile show)")
    a.add_argument("--to", required=True, metavar="FILE", help="file to write; a folder gets <UID>.<ext>")
    a.set_defaults(func=cmd_documents_export)


def _reconciler(config: cfg.Config):
    from clinicbox.reconcile.queue import Reconciler

    archive = _open_archive(config)
    rec = Reconciler(archive, config.intake, config.reconcile)
    rec.open()
    return archive, rec


def _run(args, config, action):
    from clinicbox.reconcile.queue import ReconcileError

    archive, rec = _reconciler(config)
    try:
        result = action(rec)
    except ReconcileError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        return None
    finally:
        archive.close()
    return result


def cmd_list(args, config: cfg.Config) -> int:
    items = _run(args, config, lambda rec: rec.items(None if args.status == "all" else args.status))
    if items is None:
        return 1
    return print_rows(
        items, as_json=args.json, empty="nothing waiting" if args.status == schema.HELD else "no items",
        header=f"{'ID':>4}  {'Status':11}  {'Kind':11}  {'Received':16}  {'From':12}  {'Patient ID':12}  {'Name':20}  "
               f"{'Obj':>4}  Why",
        line=lambda it: f"{it['id']:>4}  {it['status']:11}  {it['kind']:11}  {it['created_at'][:16]:16}  "
                        f"{it['calling_ae'][:12]:12}  {it['patient_id'][:12]:12}  {it['patient_name'][:20]:20}  "
                        f"{it['held'] or it['released']:>4}  {it['reasons'][0] if it['reasons'] else ''}")


def cmd_show(args, config: cfg.Config) -> int:
    item = _run(args, config, lambda rec: rec.item(args.id))
    if item is None:
        return 1
    if args.json:
        print(json.dumps(item, indent=2, ensure_ascii=False))
        return 0
    print(f"item {item['id']}: {item['status']} ({item['kind']}), from {item['calling_ae'] or '?'} "
          f"(role {item['device_role']}, intake {item['intake']}), first received {item['created_at']}")
    for reason in item["reasons"]:
        print(f"  why: {reason}")
    print(f"  claims: patient ID {item['patient_id'] or '(none)'}"
          f"{' issuer ' + item['issuer_of_patient_id'] if item['issuer_of_patient_id'] else ''}, "
          f"name {item['patient_name'] or '(none)'}, born {item['patient_birth_date'] or '?'}, "
          f"sex {item['patient_sex'] or '?'}")
    print(f"  study: accession {item['accession_number'] or '(none)'}, date {item['study_date'] or '?'}, "
          f"{item['modality'] or '?'} {item['study_description']}")
    print(f"          Study Instance UID {item['study_instance_uid']}")
    if item["titles"]:
        print(f"  titles: {item['titles']}")
    if item["suggested_patient_id"]:
        print(f"  the evidence points to patient ID {item['suggested_patient_id']}"
              f"{', accession ' + item['suggested_accession'] if item['suggested_accession'] else ''}")
    if item["decided_at"]:
        print(f"  decided by {item['decided_by']} at {item['decided_at']}: {json.dumps(item['decision'])}")
    if item["objects_held"]:
        print(f"  {len(item['objects_held'])} object(s) held (view one: clinicbox documents export UID --to FILE):")
        for o in item["objects_held"]:
            print(f"    {o['sop_instance_uid']}  {o['modality']:3} {o['title'][:40]:40} {o['size']:>9} B")
    return 0


def _print_result(args, result) -> int:
    if result is None:
        return 1
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(", ".join(f"{k} {v}" for k, v in result.items()))
    return 0


def cmd_assign(args, config: cfg.Config) -> int:
    return _print_result(args, _run(args, config, lambda rec: rec.assign(
        args.id, args.patient_id, accession=args.accession, issuer=args.issuer, who=_who(args))))


def cmd_new_patient(args, config: cfg.Config) -> int:
    return _print_result(args, _run(args, config, lambda rec: rec.new_patient(
        args.id, who=_who(args), patient_id=args.patient_id, name=args.name, birth_date=args.birth_date,
        sex=args.sex)))


def cmd_reject(args, config: cfg.Config) -> int:
    return _print_result(args, _run(args, config, lambda rec: rec.reject(args.id, reason=args.reason,
                                                                         who=_who(args))))


def cmd_documents_list(args, config: cfg.Config) -> int:
    from clinicbox.archive.documents import list_documents

    archive = _open_archive(config)
    try:
        rows = list_documents(archive.index.conn, args.patient_id)
    finally:
        archive.close()
    return print_rows(rows, as_json=args.json, empty="no documents",
                      header=f"{'Patient ID':12}  {'Name':20}  {'Date':8}  {'Kind':6}  {'Title':30}  SOP Instance UID",
                      line=lambda r: f"{r['patient_id'][:12]:12}  {r['patient_name'][:20]:20}  {r['date'][:8]:8}  "
                                     f"{r['kind']:6}  {r['title'][:30]:30}  {r['sop_instance_uid']}")


def cmd_documents_export(args, config: cfg.Config) -> int:
    from clinicbox.archive.documents import DocumentError, export

    archive = _open_archive(config)
    try:
        written = export(archive, args.id, Path(args.to))
    except DocumentError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        return 1
    finally:
        archive.close()
    print(f"wrote {written.path} ({written.kind}, {written.size} bytes)")
    return 0

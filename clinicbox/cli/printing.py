"""``clinicbox print …``: the print relay's jobs: list, show, retry, reprint."""

from __future__ import annotations

import json
import sys

from clinicbox.cli.common import _common, _open_archive, _who, print_rows
from clinicbox.core import config as cfg


def add_parsers(sub) -> None:
    p = sub.add_parser("print", help="films modalities printed to ClinicBox: jobs, show, retry, reprint")
    psub = p.add_subparsers(dest="print_command", metavar="SUBCOMMAND", required=True)
    a = psub.add_parser("jobs", help="recent print jobs and where each went")
    _common(a)
    a.add_argument("--limit", type=int, default=50, help="how many (newest first, default 50)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=cmd_jobs)
    a = psub.add_parser("show", help="one job: film layout, archive copies, each output's state")
    _common(a)
    a.add_argument("id", type=int, help="job number")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=cmd_show)
    a = psub.add_parser("retry", help="try a waiting job's failed outputs again now")
    _common(a)
    a.add_argument("id", type=int, help="job number")
    a.add_argument("--by", default="", help="who asks (default: the login name)")
    a.set_defaults(func=cmd_retry)
    a = psub.add_parser("reprint", help="render and deliver a job again to all its destinations")
    _common(a)
    a.add_argument("id", type=int, help="job number")
    a.add_argument("--by", default="", help="who asks (default: the login name)")
    a.set_defaults(func=cmd_reprint)


def _relay(config: cfg.Config):
    from clinicbox.printing.relay import PrintRelay

    archive = _open_archive(config)
    relay = PrintRelay(archive, config.print)
    relay.open()
    return archive, relay


def cmd_jobs(args, config: cfg.Config) -> int:
    archive, relay = _relay(config)
    try:
        jobs = relay.jobs(args.limit)
    finally:
        archive.close()

    def line(j):
        who = (j["patient_name"] or "").replace("^", " ") or "(unknown)"
        return (f"{j['id']:>5}  {j['created_at'][:16]:16}  {j['calling_ae'][:12]:12}  {j['status']:8}  "
                f"{j['attempts']:>5}  {who[:20]:20}  {j['outputs'] or 'PDF only'}"
                f"{'  -- ' + j['last_error'] if j['last_error'] else ''}")

    return print_rows(jobs, as_json=args.json, empty="no print jobs", line=line,
                      header=f"{'ID':>5}  {'Received':16}  {'From':12}  {'Status':8}  {'Tries':>5}  {'Patient':20}  "
                             "Outputs / last error")


def cmd_show(args, config: cfg.Config) -> int:
    archive, relay = _relay(config)
    try:
        job = relay.job(args.id)
    except LookupError as exc:
        print(f"clinicbox: {exc.args[0]}", file=sys.stderr)
        return 1
    finally:
        archive.close()
    if args.json:
        print(json.dumps(job, indent=2, ensure_ascii=False))
        return 0
    print(f"print job {job['id']} from {job['calling_ae']} at {job['created_at']}: {job['status']}, "
          f"{job['copies']} copies, {job['medium']}, priority {job['priority']}")
    print(f"  patient: {job['patient_name'] or '(unknown: archive copies wait in the reconciliation queue)'}"
          f"{' (ID ' + job['patient_id'] + ')' if job['patient_id'] else ''}")
    print(f"  PDF: {job['pdf_path'] or '(not rendered yet, or removed after print.keep_days)'}")
    for i, film in enumerate(job["film"], start=1):
        copies = [b["sop_instance_uid"] for b in film["boxes"] if b["sop_instance_uid"]]
        print(f"  film {i}: {film['display_format']} {film['orientation']} {film['film_size']} "
              f"{film['magnification']}, {len(copies)} image(s) kept as Secondary Capture")
    for out in job["outputs"]:
        print(f"  -> {out['destination']}: {out['status']} after {out['attempts']} attempt(s)"
              f"{', ' + out['last_error'] if out['last_error'] else ''}")
    return 0


def _action(args, config, name) -> int:
    archive, relay = _relay(config)
    try:
        result = getattr(relay, name)(args.id, who=_who(args))
    except LookupError as exc:
        print(f"clinicbox: {exc.args[0]}", file=sys.stderr)
        return 1
    finally:
        archive.close()
    print(f"print job {result['job']}: queued again (the running service delivers it)")
    return 0


def cmd_retry(args, config: cfg.Config) -> int:
    return _action(args, config, "retry")


def cmd_reprint(args, config: cfg.Config) -> int:
    return _action(args, config, "reprint")

"""``clinicbox jobs|backup|restore|retention|hold|status``: the jobs room's commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clinicbox.cli.common import EXIT_CONFIG, _common, _open_archive, _who, print_rows
from clinicbox.core import config as cfg


def add_parsers(sub) -> None:
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


def _open_jobs(config: cfg.Config):
    from clinicbox.jobs.runner import open_archive

    return open_archive(config)


def _with_target(config: cfg.Config, target: str | None) -> cfg.Config:
    from dataclasses import replace

    return replace(config, backup=replace(config.backup, target=str(target))) if target else config


def _backup_target(config: cfg.Config, target: str | None) -> Path:
    config = _with_target(config, target)
    if not config.backup.target:
        raise cfg.ConfigError("backup.target", "no backup target: set it in the config or give --to DIR")
    return Path(config.backup.target)


def cmd_jobs_list(args, config: cfg.Config) -> int:
    from clinicbox.jobs.runner import jobs_table

    archive = _open_jobs(config)
    try:
        rows = jobs_table(config, archive)
    finally:
        archive.close()
    print(f"{'Job':14}  {'Schedule':14}  {'Last run':26}  Outcome")
    for r in rows:
        when = r["last"]["started_at"] if r["last"] else "never"
        outcome = r["last"]["outcome"] if r["last"] else ""
        print(f"{r['job']:14}  {r['schedule']:14}  {when:26}  {outcome}   {r['doc']}")
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
    from clinicbox.jobs.runner import history, last_run

    archive = _open_jobs(config)
    try:
        rows = history(archive, args.job)
        verified = last_run(archive, "restore-test")
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if verified:
        backup_id = json.loads(verified["figures"] or "{}").get("backup", "?")
        print(f"last verified restore: {verified['ended_at'] or verified['started_at']} (backup {backup_id})")
    else:
        print("last verified restore: never (clinicbox jobs run restore-test)")
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
    return print_rows(rows, as_json=args.json, empty="no backups",
                      line=lambda b: f"{b['id']}  {b['created']}  {b['instances']} instances, {b['studies']} studies, "
                                     f"{(b['bytes'] or 0) / 1e6:.1f} MB")


def cmd_backup_verify(args, config: cfg.Config) -> int:
    from clinicbox.jobs.backup import BackupError
    from clinicbox.jobs.restore import verify_backup

    try:
        result = verify_backup(_backup_target(config, args.to), args.id)
    except BackupError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def cmd_restore(args, config: cfg.Config) -> int:
    from clinicbox.jobs.backup import BackupError
    from clinicbox.jobs.restore import restore

    if not args.data_dir:
        print("clinicbox: restore needs --data-dir NEW (a new, empty folder)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result = restore(_backup_target(config, args.source), args.backup, Path(args.data_dir))
    except BackupError as exc:
        print(f"clinicbox: {exc}", file=sys.stderr)
        if "could not be restored" in str(exc):  # what was restored is a working archive all the same
            _open_archive(config).close()
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
    from clinicbox.jobs.runner import overview

    archive = _open_jobs(config)
    try:
        status = overview(config, archive)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    disk = status["disk"]
    print(f"data dir           {status['data_dir']}")
    print(f"disk               {disk['state']}, {disk['free_mb']} MB free (warning below "
          f"{disk['warning_below_mb']} MB, stores refused below {disk['refusing_below_mb']} MB)")
    print(f"stored             {status['patients']} patients, {status['studies']} studies, "
          f"{status['instances']} instances")
    print(f"backup target      {status['backup_target'] or 'NONE: this box holds the only copy'}")
    print(f"last backup        {status['last_backup'] or 'never'}")
    if status["backup_failed"]:
        f = status["backup_failed"]
        print(f"BACKUP FAILED      {f['at']}: {f['error']}")
    print(f"last verified restore {status['last_verified_restore'] or 'never'}")
    if status["restore_test_failed"]:
        f = status["restore_test_failed"]
        print(f"RESTORE TEST FAILED {f['at']}: {f['error']}")
    if status["instances_not_ok"]:
        print("NOT OK             " + ", ".join(f"{n} {state}" for state, n in status["instances_not_ok"].items())
              + " (clinicbox jobs run scrub repairs from the backup)")
    return 0

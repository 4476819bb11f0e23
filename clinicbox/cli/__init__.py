"""``clinicbox`` command line: a thin layer over the rooms, built through the composition root."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clinicbox import __version__
from clinicbox.core import config as cfg
from clinicbox.archive.index import CHARSETS, DEVICE_ROLES, INTAKE_MODES
from clinicbox.core.logging import setup_logging
from clinicbox.cli import jobs, printing, reconcile, worklist
from clinicbox.cli.common import EXIT_CONFIG, _common, _load_config, _open_archive, print_rows


class _Ignored:
    """Stands in for the parsers of commands not being run: every call is accepted and dropped."""

    def __getattr__(self, _name):
        return lambda *_args, **_kwargs: self


class _OnlyCommand:
    """The subcommand action, building only the command being run: setting up the argparse parsers
    of every command costs ~15 ms of each CLI call (help and unknown commands build them all)."""

    def __init__(self, sub, wanted: str) -> None:
        self.sub, self.wanted, self.built = sub, wanted, False

    def add_parser(self, name: str, **kwargs):
        if name != self.wanted:
            return _Ignored()
        self.built = True
        return self.sub.add_parser(name, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``command``, only that command's subparser is built (None: all)."""
    parser = argparse.ArgumentParser(prog="clinicbox", description="ClinicBox: a PACS appliance for small clinics.")
    parser.add_argument("--version", action="version", version=f"clinicbox {__version__}")
    real_sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub = _OnlyCommand(real_sub, command) if command else real_sub
    _add_commands(sub)
    if command and not sub.built:
        return build_parser()
    return parser


def _add_commands(sub) -> None:

    p = sub.add_parser("serve", help="run the appliance: the DICOM service on one port, in the foreground")
    _common(p)
    p.add_argument("--port", type=int, help="TCP port (overrides server.port; default 11112)")
    p.add_argument("--ae-title", help="our AE title (overrides server.ae_title; default CLINICBOX)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("console", help="the office console (terminal UI): status, jobs; the service keeps running")
    _common(p)
    p.set_defaults(func=cmd_console)

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
    d.add_argument("--intake", choices=INTAKE_MODES, default="",
                   help="how its objects are matched to patients/orders: accept (store as sent), check (hold only "
                        "conflicts), match (hold conflicts and unknown patients); default: intake.<role>")
    d.add_argument("--print-to", default="",
                   help="where its printed films go, comma-separated: cups:QUEUE, folder:/path, dicom:DEVICE "
                        "(default: print.destinations)")
    d.set_defaults(func=cmd_devices_add)
    d = dsub.add_parser("list", help="list known and seen devices")
    _common(d)
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=cmd_devices_list)
    d = dsub.add_parser("remove", help="remove a device by name (or AE title)")
    _common(d)
    d.add_argument("name", help="the device's name or AE title")
    d.set_defaults(func=cmd_devices_remove)

    worklist.add_parser(sub)
    reconcile.add_parsers(sub)
    printing.add_parsers(sub)
    jobs.add_parsers(sub)

    p = sub.add_parser("config", help="show or check configuration")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = csub.add_parser("show-default", help="print the default configuration, every key commented")
    c.set_defaults(func=cmd_config_show_default)
    c = csub.add_parser("check", help="validate a configuration file")
    c.add_argument("file", help="the TOML file to check")
    c.set_defaults(func=cmd_config_check)


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
    cols = [("patient_id", "Patient ID", 14), ("patient_name", "Name", 24), ("study_date", "Date", 8),
            ("modalities_in_study", "Mod", 6), ("num_series", "Ser", 4), ("num_instances", "Inst", 6),
            ("accession_number", "Accession", 12), ("study_description", "Description", 30),
            ("documents", "Documents", 40)]
    return print_rows(rows, as_json=args.json, empty="no studies",
                      header="  ".join(title.ljust(w) for _k, title, w in cols),
                      line=lambda r: "  ".join(str(r[k] if r[k] is not None else "")[:w].ljust(w) for k, _t, w in cols))


def cmd_devices_add(args, config: cfg.Config) -> int:
    cfg.check_ae_title("--ae", args.ae)
    if not 0 < args.port < 65536:
        raise cfg.ConfigError("--port", f"{args.port} is not a TCP port")
    archive = _open_archive(config)
    try:
        destinations = [d.strip() for d in args.print_to.split(",") if d.strip()]
        cfg.check_print_destinations("--print-to", destinations)
        archive.add_device(args.name, args.ae, args.host, args.port, args.role, args.charset, args.own_station_only,
                            args.intake, ",".join(destinations))
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
    return print_rows(rows, as_json=args.json, empty="no devices",
                      header=f"{'Name':16}  {'AE title':16}  {'Host':16}  {'Port':5}  {'Role':11}  Last seen",
                      line=lambda r: f"{r['name'] or '-':16}  {r['ae_title']:16}  {r['host']:16}  {r['port'] or '':<5}  "
                                     f"{r['role']:11}  {r['last_seen']}")


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


def cmd_console(args, config: cfg.Config) -> int:
    from clinicbox.console.app import run

    return run(config)


def cmd_config_show_default(args, config: cfg.Config) -> int:
    print(cfg.default_toml())
    return 0


def cmd_config_check(args, config: cfg.Config) -> int:
    cfg.load(args.file)
    print(f"{args.file}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    args = build_parser(command).parse_args(argv)
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

"""Configuration: one TOML file, every key with a default and a one-line explanation.

The file is read with :mod:`tomllib` into frozen dataclasses.  Unknown keys and values of
the wrong type or range are refused with a :class:`ConfigError` that names the key, so a
typo in ``/etc/clinicbox/clinicbox.toml`` is one clear line at start-up, not a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_CONFIG = "CLINICBOX_CONFIG"


class ConfigError(Exception):
    """A configuration value is missing, unknown or invalid; ``key`` names it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def setting(default: Any, doc: str, *, choices: tuple[str, ...] | None = None,
            minimum: float | None = None, maximum: float | None = None) -> Any:
    """Declare a setting: its default, a one-line explanation and optional limits."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash


def check_ae_title(key: str, value: str) -> None:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(key, f"{value!r} is not an AE title (1-16 printable ASCII characters, no backslash)")


@dataclass(frozen=True)
class ServerSettings:
    ae_title: str = setting("CLINICBOX", "The AE title devices send to and query (Called AE Title).")
    bind: str = setting("0.0.0.0", "Address to listen on; 0.0.0.0 for every interface, 127.0.0.1 for this box only.")
    port: int = setting(11112, "TCP port of the DICOM service (104 needs root or CAP_NET_BIND_SERVICE; 0 picks a free one).",
                        minimum=0, maximum=65535)
    max_associations: int = setting(32, "Most associations served at once; more are rejected as transient (busy).",
                                    minimum=1, maximum=1000)
    max_pdu_size: int = setting(4194304, "Largest PDU we accept, in bytes; large PDUs mean few round trips per image.",
                                minimum=4096, maximum=2**32 - 1)
    acse_timeout: float = setting(15.0, "Seconds a connection may take to complete association negotiation.",
                                  minimum=1, maximum=600)
    dimse_timeout: float = setting(60.0, "Seconds to wait for a DIMSE message once one is expected.",
                                   minimum=1, maximum=3600)
    network_timeout: float = setting(60.0, "Seconds a silent association is kept open before it is aborted.",
                                     minimum=1, maximum=3600)
    require_called_ae_title: bool = setting(False, "Reject associations whose Called AE Title is not ours.")
    allowed_calling_ae_titles: list = setting([], "Calling AE titles allowed to connect; empty means any (each new caller is recorded as a seen device).")
    accept_unknown_sop_classes: bool = setting(True, "Store objects of private or unknown SOP classes as they come.")
    shutdown_grace_seconds: float = setting(30.0, "On SIGTERM, how long to let stores in flight finish before exiting.",
                                            minimum=0, maximum=600)

    def validate(self) -> None:
        check_ae_title("server.ae_title", self.ae_title)
        for i, aet in enumerate(self.allowed_calling_ae_titles):
            if not isinstance(aet, str):
                raise ConfigError(f"server.allowed_calling_ae_titles[{i}]", "must be a string")
            check_ae_title(f"server.allowed_calling_ae_titles[{i}]", aet)


@dataclass(frozen=True)
class StorageSettings:
    data_dir: str = setting("./clinicbox-data", "Folder holding the index, the objects and everything else ClinicBox keeps.")
    duplicate_policy: str = setting(
        "keep-first",
        "Same SOP Instance UID, different content: keep-first keeps what we have, replace keeps the newest.",
        choices=("keep-first", "replace"))
    index_synchronous: str = setting(
        "normal",
        "SQLite synchronous mode; objects are fsync'ed either way and start-up repair re-indexes them.",
        choices=("normal", "full"))
    writer_batch_max: int = setting(256, "Most index writes committed together in one transaction (group commit).",
                                    minimum=1, maximum=10000)
    min_free_warning_mb: int = setting(10240, "Free space (MB) on the data dir's disk below which ClinicBox warns (log, clinicbox status).",
                                       minimum=0, maximum=10**9)
    min_free_critical_mb: int = setting(2048, "Free space (MB) below which stores are refused (0xA700) so the disk never fills up.",
                                        minimum=0, maximum=10**9)


@dataclass(frozen=True)
class QuerySettings:
    max_results: int = setting(1000, "Most answers one C-FIND returns; the rest are not sent (the SCU is told to narrow it).",
                               minimum=1, maximum=1000000)
    case_insensitive_names: bool = setting(True, "Match person names regardless of case (DOE* finds Doe^John); ASCII letters only.")
    allow_from: str = setting("known", "Who may query and retrieve: known (devices added with `clinicbox devices add`) or any caller.",
                              choices=("known", "any"))


@dataclass(frozen=True)
class WorklistSettings:
    charset: str = setting("ISO_IR 100", "Character set of worklist answers when neither the device's setting nor its query names one; ISO_IR 100 (Latin-1) transliterates other letters (Ł -> L).",
                           choices=("ISO_IR 100", "ISO_IR 192"))
    own_station_only: bool = setting(False, "A worklist query without Scheduled Station AE Title gets only the calling device's steps (per device: clinicbox devices add --own-station-only).")
    max_results: int = setting(1000, "Most worklist items one query returns.", minimum=1, maximum=100000)
    allow_from: str = setting("known", "Who may query the worklist and send MPPS: known (devices added with `clinicbox devices add`) or any caller.",
                              choices=("known", "any"))


@dataclass(frozen=True)
class BackupSettings:
    target: str = setting("", "Folder the nightly backup goes to (a mounted USB disk or NAS share); empty: no backup.")
    keep: int = setting(14, "Finished backups kept on the target; older ones (and pool files only they name) are removed.",
                        minimum=1, maximum=10000)


@dataclass(frozen=True)
class IntegritySettings:
    files_per_run: int = setting(20000, "Stored files one scrub run re-reads (the least recently checked first), so every file is checked in turn.",
                                 minimum=1, maximum=10**9)
    repair_from_backup: bool = setting(True, "Put back a damaged or missing file from the backup target when the backup holds it intact.")


@dataclass(frozen=True)
class RetentionSettings:
    enabled: bool = setting(False, "Delete studies past their keeping time (off: nothing is ever deleted by ClinicBox).")
    rules: list = setting([], "Keeping times: [{modality = \"US\", years = 10}, {modality = \"*\", years = 30}]; each modality takes the rule naming it, else \"*\"; a study keeps its longest; one no rule covers is kept.")
    minor_age: int = setting(18, "A patient younger than this at the exam is a minor.", minimum=0, maximum=150)
    minor_extra_years: int = setting(10, "A minor's studies are kept at least until age minor_age plus this many years.",
                                     minimum=0, maximum=150)
    without_birth_date: str = setting("keep", "A study whose patient has no birth date: keep (could be a minor's) or adult (the rules alone).",
                                      choices=("keep", "adult"))
    require_verified_backup: bool = setting(True, "Delete only studies held in the backup whose restore was last verified; false is logged loudly.")

    def validate(self) -> None:
        for i, rule in enumerate(self.rules):
            key = f"retention.rules[{i}]"
            if not isinstance(rule, dict) or set(rule) - {"modality", "years"} or "years" not in rule:
                raise ConfigError(key, "must be a table {modality = \"US\", years = 10}")
            if not isinstance(rule["years"], int) or isinstance(rule["years"], bool) or rule["years"] < 0:
                raise ConfigError(f"{key}.years", "must be a whole number of years, 0 or more")
            if not isinstance(rule.get("modality", "*"), str):
                raise ConfigError(f"{key}.modality", "must be a modality code or \"*\"")


@dataclass(frozen=True)
class JobsSettings:
    backup: str = setting("0 2 * * *", "When the backup runs (cron: minute hour day month weekday); empty: never by itself.")
    restore_test: str = setting("30 4 * * 0", "When the latest backup is restored into a scratch folder and checked (cron).")
    scrub: str = setting("15 1 * * *", "When stored files are re-read against their ingest checksums, a share at a time (cron).")
    retention: str = setting("45 1 * * *", "When studies past their keeping time are deleted (only with retention.enabled; cron).")
    timezone: str = setting("", "Time zone of the schedules (e.g. Europe/Berlin); empty: the box's local time.")


_INTAKE = ("accept", "check", "match")
MATCH_IDENTIFIERS = ("patient_id", "accession", "study_uid")


@dataclass(frozen=True)
class IntakeSettings:
    emr: str = setting("match", "Objects from devices with role emr: match (hold conflicts and unknown patients), "
                                "check (hold only conflicts) or accept (store as sent).", choices=_INTAKE)
    capture: str = setting("match", "Objects from capture stations and scanners (role capture).", choices=_INTAKE)
    modality: str = setting("check", "Images from modalities: a new patient is normal there, so only objects that "
                                     "contradict a known patient, order or study are held.", choices=_INTAKE)
    unknown: str = setting("check", "Objects from callers that are not in the device table.", choices=_INTAKE)
    other: str = setting("accept", "Objects from workstations, viewers, archives and printers (already curated).",
                         choices=_INTAKE)
    match_scope: str = setting("all", "In match mode, which objects need a known patient: all, or documents only "
                                      "(PDF, CDA, photos, secondary captures; other images are checked).",
                               choices=("all", "documents"))
    match_on: list = setting(list(MATCH_IDENTIFIERS), "Identifiers an object is matched on (patient_id, accession, "
                                                      "study_uid); name and birth date only ever confirm.")

    def mode_for(self, role: str) -> str:
        if role in ("emr", "capture", "modality", "unknown"):
            return getattr(self, role)
        return self.other

    def validate(self) -> None:
        for i, name in enumerate(self.match_on):
            if name not in MATCH_IDENTIFIERS:
                raise ConfigError(f"intake.match_on[{i}]", f"{name!r} is not one of {', '.join(MATCH_IDENTIFIERS)}")


@dataclass(frozen=True)
class ReconcileSettings:
    trash_days: int = setting(30, "Days a rejected reconciliation item is kept before the retention job removes it.",
                              minimum=0, maximum=3650)


_DESTINATION = re.compile(r"^(cups:[A-Za-z0-9_.@-]+|folder:.+|dicom:.+)$")


def check_print_destinations(key: str, values) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str) or not _DESTINATION.match(value):
            raise ConfigError(f"{key}[{i}]", f"{value!r} is not a print destination "
                                             "(cups:QUEUE, folder:/path or dicom:DEVICE)")


@dataclass(frozen=True)
class PrintSettings:
    destinations: list = setting([], "Where printed films go unless the device says otherwise: cups:QUEUE (office "
                                     "printer via lp), folder:/path (a PDF per film), dicom:DEVICE (a real film printer).")
    dpi: int = setting(150, "Resolution films are rendered at, dots per inch (300 for a laser printer's best).",
                       minimum=50, maximum=600)
    clinic_name: str = setting("", "Printed in each film's header line (with the device and the date).")
    header: bool = setting(True, "Print a header line on each film (patient name only when the device's procedure step names one).")
    lp_command: str = setting("lp", "The CUPS client command used to submit PDFs.")
    cups_server: str = setting("", "CUPS server (host:port) for lp -h; empty: the system default.")
    retry_seconds: float = setting(30.0, "Seconds before a failed output (printer off, CUPS stopped) is tried again.",
                                   minimum=1, maximum=86400)
    keep_days: int = setting(14, "Days rendered PDFs stay in the data dir's prints/ folder after printing.",
                             minimum=0, maximum=3650)
    step_minutes: int = setting(10, "A procedure step completed this many minutes ago still names the patient of a print "
                                    "(longer risks naming the previous patient when the next exam sends no MPPS).",
                                minimum=0, maximum=1440)
    printer_name: str = setting("ClinicBox", "Printer Name a modality sees (N-GET of the Printer).")

    def validate(self) -> None:
        check_print_destinations("print.destinations", self.destinations)


@dataclass(frozen=True)
class LoggingSettings:
    level: str = setting("INFO", "Log level for every room.",
                         choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    debug_rooms: list = setting([], "Rooms logged at DEBUG regardless of level, e.g. [\"dicom\", \"archive\"] (DEBUG may show patient data).")
    pynetdicom_level: str = setting("WARNING", "Log level of the pynetdicom protocol library.",
                                    choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    worklist: WorklistSettings = field(default_factory=WorklistSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    integrity: IntegritySettings = field(default_factory=IntegritySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    print: PrintSettings = field(default_factory=PrintSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    def with_overrides(self, *, data_dir: str | None = None, port: int | None = None,
                       ae_title: str | None = None) -> "Config":
        """Apply the command-line flags that override the file, validating them like the file."""
        server, storage = self.server, self.storage
        if port is not None:
            server = replace(server, port=_coerce("server.port", _field(ServerSettings, "port"), port))
        if ae_title is not None:
            server = replace(server, ae_title=ae_title)
        if data_dir is not None:
            storage = replace(storage, data_dir=str(data_dir))
        cfg = replace(self, server=server, storage=storage)
        cfg.server.validate()
        return cfg


_SECTIONS: dict[str, type] = {"server": ServerSettings, "storage": StorageSettings, "query": QuerySettings,
                              "worklist": WorklistSettings, "backup": BackupSettings, "jobs": JobsSettings,
                              "integrity": IntegritySettings, "retention": RetentionSettings,
                              "intake": IntakeSettings, "reconcile": ReconcileSettings, "print": PrintSettings,
                              "logging": LoggingSettings}


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in fields(cls) if f.name == name)


def _type_of(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool, "list": list}[f.type]


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    want = _type_of(f)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(key, f"expected {want.__name__}, got {type(value).__name__} {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(key, f"{value} is below the minimum {meta['minimum']}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(key, f"{value} is above the maximum {meta['maximum']}")
    return value


def from_mapping(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a parsed TOML mapping."""
    sections = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(name, f"unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(name, "must be a table, e.g. [" + name + "]")
        cls = _SECTIONS[name]
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, v in value.items():
            if key not in known:
                raise ConfigError(f"{name}.{key}", "unknown key (see `clinicbox config show-default`)")
            kwargs[key] = _coerce(f"{name}.{key}", known[key], v)
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    cfg.server.validate()
    _validate_schedules(cfg)
    return cfg


_CRON_NAMES = {
    "month": {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                          "nov", "dec"), start=1)},
    "weekday": {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
_CRON_RANGES = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12),
                ("weekday", 0, 7))


def _cron_problem(expression: str) -> str | None:
    """What is wrong with a cron expression (5 fields, or 6 with seconds first), or None."""
    fields_ = expression.split()
    if len(fields_) not in (5, 6):
        return "needs 5 fields: minute hour day month weekday"
    ranges = _CRON_RANGES if len(fields_) == 6 else _CRON_RANGES[1:]
    for text, (name, low, high) in zip(fields_, ranges):
        names = _CRON_NAMES.get(name, {})
        for part in text.lower().split(","):
            spec, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return f"{name}: step {step!r} is not a positive number"
            if spec in ("*", "?"):
                continue
            for bound in spec.split("-", 1):
                value = names.get(bound, int(bound) if bound.isdigit() else None)
                if value is None or not low <= value <= high:
                    return f"{name}: {bound!r} is not in {low}-{high}"
    return None


def _validate_schedules(cfg: "Config") -> None:
    cfg.retention.validate()
    cfg.intake.validate()
    cfg.print.validate()
    for name in ("backup", "restore_test", "scrub", "retention"):
        expression = getattr(cfg.jobs, name)
        if not expression:
            continue
        problem = _cron_problem(expression)
        if problem:
            raise ConfigError(f"jobs.{name}", f"{expression!r} is not a cron schedule ({problem})")
    if cfg.jobs.timezone:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(cfg.jobs.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError("jobs.timezone", f"{cfg.jobs.timezone!r} is not a time zone (e.g. Europe/Berlin, "
                                               "UTC; empty: the box's local time)") from None


def load(path: str | os.PathLike | None = None) -> Config:
    """Read the config file named by ``path`` or ``$CLINICBOX_CONFIG``; defaults when neither is set."""
    path = path or os.environ.get(ENV_CONFIG)
    if not path:
        return Config()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"is not valid TOML: {exc}") from None
    return from_mapping(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def default_toml() -> str:
    """The commented default configuration, as printed by ``clinicbox config show-default``."""
    out = ["# ClinicBox configuration. Every key is shown with its default; delete what you do not change.",
           f"# Used via `clinicbox serve --config FILE` or ${ENV_CONFIG}; installed as /etc/clinicbox/clinicbox.toml.",
           ""]
    defaults = Config()
    for name in _SECTIONS:
        out.append(f"[{name}]")
        section = getattr(defaults, name)
        for f in fields(section):
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += f" One of: {', '.join(f.metadata['choices'])}."
            out.append(f"# {doc}")
            out.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        out.append("")
    return "\n".join(out)

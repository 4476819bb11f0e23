"""The SQLite index: schema by numbered migrations, the write statements the writer runs, and reads.

WAL mode lets the console, the CLI and the DICOM handlers read while the one writer thread
(:mod:`clinicbox.archive.writer`) commits.  Attributes C-FIND matches on are real columns; the
rest of each object's non-bulk header is kept encoded in ``instances.header`` so answers need no
file read.  Counts per patient/study/series are kept current by the write statements here.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

INDEX_FILE = "index.sqlite3"


class MigrationSet:
    """A room's numbered migrations, applied by sqlite-utils' ``Migrations``.

    Registered here without importing sqlite-utils (~150 ms): :func:`migrate` first asks the
    ``_sqlite_migrations`` table what is applied and loads sqlite-utils only when something is
    pending, so short CLI commands on an up-to-date index start quickly.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: list[tuple[str, object]] = []

    def __call__(self, *, name: str):
        def register(fn):
            self.steps.append((name, fn))
            return fn
        return register

    def pending(self, conn: sqlite3.Connection) -> list[str]:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = '_sqlite_migrations'").fetchone():
            return [n for n, _f in self.steps]
        done = {r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations WHERE migration_set = ?",
                                           (self.name,))}
        return [n for n, _f in self.steps if n not in done]

    def apply(self, conn: sqlite3.Connection) -> None:
        from sqlite_utils import Database
        from sqlite_utils.migrations import Migrations

        real = Migrations(self.name)
        for name, fn in self.steps:
            real(name=name)(fn)
        real.apply(Database(conn))


migrations = MigrationSet("clinicbox.archive")


@migrations(name="0001_archive_core")
def _m0001(db) -> None:
    db.executescript(
        """
        CREATE TABLE patients (
            id INTEGER PRIMARY KEY,
            patient_id TEXT NOT NULL,
            issuer_of_patient_id TEXT NOT NULL DEFAULT '',
            patient_name TEXT NOT NULL DEFAULT '',
            patient_birth_date TEXT NOT NULL DEFAULT '',
            patient_sex TEXT NOT NULL DEFAULT '',
            num_studies INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            UNIQUE (patient_id, issuer_of_patient_id)
        );
        CREATE INDEX patients_name ON patients (patient_name COLLATE NOCASE);

        CREATE TABLE studies (
            id INTEGER PRIMARY KEY,
            study_instance_uid TEXT NOT NULL UNIQUE,
            patient_pk INTEGER NOT NULL REFERENCES patients (id),
            study_date TEXT NOT NULL DEFAULT '',
            study_time TEXT NOT NULL DEFAULT '',
            accession_number TEXT NOT NULL DEFAULT '',
            study_id TEXT NOT NULL DEFAULT '',
            study_description TEXT NOT NULL DEFAULT '',
            referring_physician_name TEXT NOT NULL DEFAULT '',
            modalities_in_study TEXT NOT NULL DEFAULT '',
            num_series INTEGER NOT NULL DEFAULT 0,
            num_instances INTEGER NOT NULL DEFAULT 0,
            size_bytes INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX studies_patient ON studies (patient_pk);
        CREATE INDEX studies_date ON studies (study_date);
        CREATE INDEX studies_accession ON studies (accession_number);

        CREATE TABLE series (
            id INTEGER PRIMARY KEY,
            series_instance_uid TEXT NOT NULL UNIQUE,
            study_pk INTEGER NOT NULL REFERENCES studies (id),
            modality TEXT NOT NULL DEFAULT '',
            series_number INTEGER,
            series_description TEXT NOT NULL DEFAULT '',
            body_part_examined TEXT NOT NULL DEFAULT '',
            series_date TEXT NOT NULL DEFAULT '',
            series_time TEXT NOT NULL DEFAULT '',
            station_name TEXT NOT NULL DEFAULT '',
            manufacturer TEXT NOT NULL DEFAULT '',
            institution_name TEXT NOT NULL DEFAULT '',
            num_instances INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        );
        CREATE INDEX series_study ON series (study_pk);

        CREATE TABLE instances (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            sop_class_uid TEXT NOT NULL,
            series_pk INTEGER NOT NULL REFERENCES series (id),
            instance_number INTEGER,
            number_of_frames INTEGER,
            content_date TEXT NOT NULL DEFAULT '',
            content_time TEXT NOT NULL DEFAULT '',
            document_title TEXT NOT NULL DEFAULT '',
            specific_character_set TEXT NOT NULL DEFAULT '',
            transfer_syntax_uid TEXT NOT NULL,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            header BLOB NOT NULL,
            header_syntax TEXT NOT NULL,
            received_at TEXT NOT NULL,
            calling_ae TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'network',
            state TEXT NOT NULL DEFAULT 'ok'
        );
        CREATE INDEX instances_series ON instances (series_pk);

        CREATE TABLE devices (
            ae_title TEXT PRIMARY KEY,
            host TEXT NOT NULL DEFAULT '',
            port INTEGER,
            role TEXT NOT NULL DEFAULT 'seen',
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            associations INTEGER NOT NULL DEFAULT 0
        );
        """
    )


@migrations(name="0002_device_names")
def _m0002(db) -> None:
    db.executescript(
        """
        ALTER TABLE devices ADD COLUMN name TEXT NOT NULL DEFAULT '';
        ALTER TABLE devices ADD COLUMN added_at TEXT;
        """
    )


@migrations(name="0003_device_worklist")
def _m0003(db) -> None:
    db.executescript(
        """
        ALTER TABLE devices ADD COLUMN charset TEXT NOT NULL DEFAULT '';
        ALTER TABLE devices ADD COLUMN own_station_only INTEGER;
        """
    )


@migrations(name="0004_verified_at")
def _m0004(db) -> None:
    db.executescript(
        """
        ALTER TABLE instances ADD COLUMN verified_at TEXT;
        CREATE INDEX instances_verified ON instances (verified_at);
        """
    )


@migrations(name="0005_held_objects")
def _m0005(db) -> None:
    db.executescript(
        """
        -- objects stored durably but held out of the patient/study hierarchy (invisible to
        -- query/retrieve) until a person decides where they belong; item_id names the
        -- reconciliation item that holds them
        CREATE TABLE held_objects (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            transfer_syntax_uid TEXT NOT NULL,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            "values" TEXT NOT NULL,
            received_at TEXT NOT NULL,
            calling_ae TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'network',
            state TEXT NOT NULL DEFAULT 'ok'
        );
        CREATE INDEX held_objects_uid ON held_objects (sop_instance_uid);
        CREATE INDEX held_objects_item ON held_objects (item_id);
        -- append-only: who did what, when (deletions, holds, reconciliation decisions)
        CREATE TABLE IF NOT EXISTS audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            who TEXT NOT NULL,
            action TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        -- per device: how its objects go through intake matching ('' = the default for its role)
        ALTER TABLE devices ADD COLUMN intake TEXT NOT NULL DEFAULT '';
        -- per device: where its printed films go, comma-separated ('' = print.destinations)
        ALTER TABLE devices ADD COLUMN print_to TEXT NOT NULL DEFAULT '';
        """
    )


@migrations(name="0006_held_trash")
def _m0006(db) -> None:
    db.executescript(
        """
        -- 1: the held object is in the trash (its item was rejected): not a live copy, so a re-send
        -- of the same object is not a duplicate of it
        ALTER TABLE held_objects ADD COLUMN trashed INTEGER NOT NULL DEFAULT 0;
        -- held objects are scrubbed like indexed ones
        ALTER TABLE held_objects ADD COLUMN verified_at TEXT;
        """
    )


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path, *, synchronous: str = "normal") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with a busy timeout."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


def migrate(path: Path, migration_set: MigrationSet = migrations) -> list[str]:
    """Create or upgrade the index at ``path``; return the names of the migrations applied.

    Each room that keeps tables in the index has its own numbered set (the archive's by default).
    Serialised between processes (two `clinicbox import` started together on a new data dir).
    """
    conn = sqlite3.connect(path, timeout=30)
    try:
        if not migration_set.pending(conn):
            return []
    finally:
        conn.close()
    with open(Path(path).with_name("migrate.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _migrate(path, migration_set)


def _migrate(path: Path, migration_set: MigrationSet) -> list[str]:
    conn = sqlite3.connect(path, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        pending = migration_set.pending(conn)
        if pending:
            migration_set.apply(conn)
        return pending
    finally:
        conn.close()


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the writer needs to index one stored object."""

    sop_instance_uid: str
    sop_class_uid: str
    values: dict
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    header: bytes
    header_syntax: str
    calling_ae: str
    source: str


def record_for(parsed, *, path: str, sha256: str, calling_ae: str, source: str) -> InstanceRecord:
    """The index record of a parsed object (:class:`clinicbox.archive.parse.ParsedObject`)."""
    return InstanceRecord(
        sop_instance_uid=parsed.get("SOPInstanceUID"), sop_class_uid=parsed.get("SOPClassUID"),
        values=parsed.values, transfer_syntax_uid=parsed.transfer_syntax, path=path, size=parsed.size,
        sha256=sha256, header=parsed.header, header_syntax=parsed.header_syntax, calling_ae=calling_ae,
        source=source)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


# --- write statements: run by the writer thread inside its batch transaction ---------------

def _patient_pk(conn: sqlite3.Connection, v: dict, now: str) -> int:
    key = (v.get("PatientID", ""), v.get("IssuerOfPatientID", ""))
    row = conn.execute("SELECT id FROM patients WHERE patient_id=? AND issuer_of_patient_id=?", key).fetchone()
    if row:
        return row[0]
    cur = conn.execute(
        "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
        " patient_sex, created_at) VALUES (?,?,?,?,?,?)",
        (*key, v.get("PatientName", ""), v.get("PatientBirthDate", ""), v.get("PatientSex", ""), now))
    return cur.lastrowid


def _study_pk(conn: sqlite3.Connection, v: dict, now: str) -> int:
    row = conn.execute("SELECT id FROM studies WHERE study_instance_uid=?", (v["StudyInstanceUID"],)).fetchone()
    if row:
        return row[0]
    patient_pk = _patient_pk(conn, v, now)
    cur = conn.execute(
        "INSERT INTO studies (study_instance_uid, patient_pk, study_date, study_time, accession_number,"
        " study_id, study_description, referring_physician_name, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?)",
        (v["StudyInstanceUID"], patient_pk, v.get("StudyDate", ""), v.get("StudyTime", ""),
         v.get("AccessionNumber", ""), v.get("StudyID", ""), v.get("StudyDescription", ""),
         v.get("ReferringPhysicianName", ""), now, now))
    conn.execute("UPDATE patients SET num_studies = num_studies + 1 WHERE id=?", (patient_pk,))
    return cur.lastrowid


def _series_pk(conn: sqlite3.Connection, v: dict, now: str) -> int:
    row = conn.execute("SELECT id FROM series WHERE series_instance_uid=?", (v["SeriesInstanceUID"],)).fetchone()
    if row:
        return row[0]
    study_pk = _study_pk(conn, v, now)
    modality = v.get("Modality", "")
    cur = conn.execute(
        "INSERT INTO series (series_instance_uid, study_pk, modality, series_number, series_description,"
        " body_part_examined, series_date, series_time, station_name, manufacturer, institution_name,"
        " created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (v["SeriesInstanceUID"], study_pk, modality, _int_or_none(v.get("SeriesNumber", "")),
         v.get("SeriesDescription", ""), v.get("BodyPartExamined", ""), v.get("SeriesDate", ""),
         v.get("SeriesTime", ""), v.get("StationName", ""), v.get("Manufacturer", ""),
         v.get("InstitutionName", ""), now))
    row = conn.execute("SELECT modalities_in_study FROM studies WHERE id=?", (study_pk,)).fetchone()
    mods = [m for m in row[0].split("\\") if m]
    if modality and modality not in mods:
        mods.append(modality)
    conn.execute("UPDATE studies SET num_series = num_series + 1, modalities_in_study=?, updated_at=? WHERE id=?",
                 ("\\".join(sorted(mods)), now, study_pk))
    return cur.lastrowid


def insert_instance(conn: sqlite3.Connection, rec: InstanceRecord) -> int:
    """Index one stored object, creating its patient/study/series as needed; keep counts current."""
    now = utcnow()
    v = rec.values
    series_pk = _series_pk(conn, v, now)
    cur = conn.execute(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_pk, instance_number,"
        " number_of_frames, content_date, content_time, document_title, specific_character_set,"
        " transfer_syntax_uid, path, size, sha256, header, header_syntax, received_at, calling_ae, source)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (rec.sop_instance_uid, rec.sop_class_uid, series_pk, _int_or_none(v.get("InstanceNumber", "")),
         _int_or_none(v.get("NumberOfFrames", "")), v.get("ContentDate", ""), v.get("ContentTime", ""),
         v.get("DocumentTitle", ""), v.get("SpecificCharacterSet", ""), rec.transfer_syntax_uid,
         rec.path, rec.size, rec.sha256, rec.header, rec.header_syntax, now, rec.calling_ae, rec.source))
    conn.execute("UPDATE series SET num_instances = num_instances + 1 WHERE id=?", (series_pk,))
    conn.execute(
        "UPDATE studies SET num_instances = num_instances + 1, size_bytes = size_bytes + ?, updated_at=?"
        " WHERE id = (SELECT study_pk FROM series WHERE id=?)", (rec.size, now, series_pk))
    return cur.lastrowid


def delete_instance(conn: sqlite3.Connection, sop_instance_uid: str) -> None:
    """Remove one instance row; drop its series/study/patient rows when they become empty."""
    row = conn.execute(
        "SELECT i.id, i.size, i.series_pk, s.study_pk, st.patient_pk FROM instances i"
        " JOIN series s ON s.id = i.series_pk JOIN studies st ON st.id = s.study_pk"
        " WHERE i.sop_instance_uid=?", (sop_instance_uid,)).fetchone()
    if row is None:
        return
    inst_pk, size, series_pk, study_pk, patient_pk = row
    conn.execute("DELETE FROM instances WHERE id=?", (inst_pk,))
    conn.execute("UPDATE series SET num_instances = num_instances - 1 WHERE id=?", (series_pk,))
    conn.execute("UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - ?,"
                 " updated_at=? WHERE id=?", (size, utcnow(), study_pk))
    if conn.execute("SELECT num_instances FROM series WHERE id=?", (series_pk,)).fetchone()[0] <= 0:
        conn.execute("DELETE FROM series WHERE id=?", (series_pk,))
        mods = sorted({r[0] for r in conn.execute(
            "SELECT modality FROM series WHERE study_pk=? AND modality != ''", (study_pk,))})
        conn.execute("UPDATE studies SET num_series = num_series - 1, modalities_in_study=? WHERE id=?",
                     ("\\".join(mods), study_pk))
        if conn.execute("SELECT num_series FROM studies WHERE id=?", (study_pk,)).fetchone()[0] <= 0:
            conn.execute("DELETE FROM studies WHERE id=?", (study_pk,))
            conn.execute("UPDATE patients SET num_studies = num_studies - 1 WHERE id=?", (patient_pk,))
            if conn.execute("SELECT num_studies FROM patients WHERE id=?", (patient_pk,)).fetchone()[0] <= 0:
                conn.execute("DELETE FROM patients WHERE id=?", (patient_pk,))


def set_instance_state(conn: sqlite3.Connection, path: str, state: str) -> None:
    conn.execute("UPDATE instances SET state=? WHERE path=?", (state, path))
    conn.execute("UPDATE held_objects SET state=? WHERE path=?", (state, path))


def insert_held(conn: sqlite3.Connection, rec: InstanceRecord, item_id: int) -> int:
    """Keep a stored object out of the hierarchy, held by reconciliation item ``item_id``."""
    cur = conn.execute(
        'INSERT INTO held_objects (item_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, path, size,'
        ' sha256, "values", received_at, calling_ae, source) VALUES (?,?,?,?,?,?,?,?,?,?,?)',
        (item_id, rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax_uid, rec.path, rec.size,
         rec.sha256, json.dumps(rec.values, ensure_ascii=False), utcnow(), rec.calling_ae, rec.source))
    return cur.lastrowid


def audit(conn: sqlite3.Connection, who: str, action: str, detail: dict) -> None:
    """One line of the append-only audit log (in the caller's transaction)."""
    conn.execute("INSERT INTO audit_log (at, who, action, detail) VALUES (?,?,?,?)",
                 (utcnow(), who, action, json.dumps(detail, ensure_ascii=False, sort_keys=True)))


def record_device_seen(conn: sqlite3.Connection, ae_title: str, host: str) -> bool:
    """Note that ``ae_title`` called from ``host``; return True when this caller is new."""
    now = utcnow()
    cur = conn.execute("UPDATE devices SET last_seen=?, host=?, associations = associations + 1"
                       " WHERE ae_title=?", (now, host, ae_title))
    if cur.rowcount:
        return False
    conn.execute("INSERT INTO devices (ae_title, host, first_seen, last_seen, associations)"
                 " VALUES (?,?,?,?,1)", (ae_title, host, now, now))
    return True


DEVICE_ROLES = ("modality", "workstation", "viewer", "emr", "capture", "archive", "printer")


CHARSETS = ("ISO_IR 100", "ISO_IR 192")


INTAKE_MODES = ("accept", "check", "match")


def upsert_device(conn: sqlite3.Connection, name: str, ae_title: str, host: str, port: int, role: str,
                  charset: str = "", own_station_only: bool | None = None, intake: str = "",
                  print_to: str | None = None) -> None:
    """Staff add (or change) a device; a caller already seen keeps its history.

    ``charset`` ('' = the configured default) is how worklist answers are encoded for it;
    ``own_station_only`` (None = the configured default) limits a worklist query that omits the
    Scheduled Station AE Title to the device's own steps; ``intake`` ('' = the default for its role)
    is how its objects are matched to patients and orders (one of INTAKE_MODES); ``print_to``
    (None = leave as is) where its printed films go.
    """
    now = utcnow()
    if charset and charset not in CHARSETS:
        raise ValueError(f"character set {charset!r} is not one of {', '.join(CHARSETS)}")
    if intake and intake not in INTAKE_MODES:
        raise ValueError(f"intake {intake!r} is not one of {', '.join(INTAKE_MODES)}")
    if conn.execute("SELECT 1 FROM devices WHERE name=? AND ae_title != ?", (name, ae_title)).fetchone():
        raise ValueError(f"a device named {name!r} already has another AE title")
    own = None if own_station_only is None else int(own_station_only)
    cur = conn.execute("UPDATE devices SET name=?, host=?, port=?, role=?, charset=?, own_station_only=?, intake=?,"
                       " added_at=COALESCE(added_at, ?) WHERE ae_title=?",
                       (name, host, port, role, charset, own, intake, now, ae_title))
    if not cur.rowcount:
        conn.execute("INSERT INTO devices (ae_title, name, host, port, role, charset, own_station_only, intake,"
                     " first_seen, last_seen, added_at, associations) VALUES (?,?,?,?,?,?,?,?,?,?,?,0)",
                     (ae_title, name, host, port, role, charset, own, intake, now, now, now))
    if print_to is not None:
        conn.execute("UPDATE devices SET print_to=? WHERE ae_title=?", (print_to, ae_title))


def remove_device(conn: sqlite3.Connection, name_or_ae: str) -> bool:
    cur = conn.execute("DELETE FROM devices WHERE name=? OR (ae_title=? AND name='')", (name_or_ae, name_or_ae))
    return cur.rowcount > 0


# --- reads ------------------------------------------------------------------------------------

class Index:
    """Read access to the index; one connection per thread, used only to read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._owners: dict[threading.Thread, sqlite3.Connection] = {}
        self._free: list[sqlite3.Connection] = []

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's read connection; one of an ended thread's is reused (each DICOM association
        runs in a new thread: a fresh connection costs its schema read and statement cache)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                for thread, owned in list(self._owners.items()):
                    if not thread.is_alive():
                        del self._owners[thread]
                        self._free.append(owned)
                conn = self._free.pop() if self._free else connect(self.path)
                self._owners[threading.current_thread()] = conn
            self._local.conn = conn
        return conn

    def instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        return self.conn.execute(
            "SELECT sop_instance_uid, sop_class_uid, path, size, sha256, transfer_syntax_uid, state"
            " FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()

    def held(self, sop_instance_uid: str) -> list[sqlite3.Row]:
        """Held copies of ``sop_instance_uid`` (objects waiting in the reconciliation queue)."""
        return self.conn.execute("SELECT id, item_id, path, sha256, trashed FROM held_objects"
                                 " WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchall()

    def path_in_use(self, relpath: str) -> bool:
        """Whether an indexed instance or a held object names this file."""
        return self.conn.execute("SELECT 1 FROM instances WHERE path=? UNION ALL SELECT 1 FROM held_objects"
                                 " WHERE path=?", (relpath, relpath)).fetchone() is not None

    def instance_paths(self) -> set[str]:
        """Every object file the index knows: indexed instances and held objects."""
        return {r[0] for r in self.conn.execute("SELECT path FROM instances UNION ALL SELECT path FROM held_objects")}

    def missing_paths(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT path FROM instances WHERE state='missing'"
                                                " UNION ALL SELECT path FROM held_objects WHERE state='missing'")}

    def studies(self, patient_id: str | None = None) -> list[dict]:
        sql = ("SELECT p.patient_id, p.patient_name, p.patient_birth_date, p.patient_sex,"
               " s.study_instance_uid, s.study_date, s.study_time, s.accession_number, s.study_description,"
               " s.modalities_in_study, s.num_series, s.num_instances, s.size_bytes, s.updated_at,"
               " (SELECT group_concat(t, ' | ') FROM (SELECT DISTINCT i.document_title AS t FROM series se"
               "   JOIN instances i ON i.series_pk = se.id WHERE se.study_pk = s.id AND i.document_title != ''))"
               " AS documents"
               " FROM studies s JOIN patients p ON p.id = s.patient_pk")
        args: tuple = ()
        if patient_id is not None:
            sql += " WHERE p.patient_id = ?"
            args = (patient_id,)
        sql += " ORDER BY s.study_date DESC, s.study_time DESC, s.id DESC"
        return [dict(r) for r in self.conn.execute(sql, args)]

    def counts(self) -> dict[str, int]:
        c = self.conn
        return {
            "patients": c.execute("SELECT count(*) FROM patients").fetchone()[0],
            "studies": c.execute("SELECT count(*) FROM studies").fetchone()[0],
            "series": c.execute("SELECT count(*) FROM series").fetchone()[0],
            "instances": c.execute("SELECT count(*) FROM instances").fetchone()[0],
        }

    def devices(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute(
            "SELECT name, ae_title, host, port, role, charset, own_station_only, intake, print_to, first_seen, last_seen,"
            " associations, added_at FROM devices ORDER BY name = '', name, ae_title")]

    def device(self, ae_title: str) -> dict | None:
        """A device staff added (a caller that was only seen is not one)."""
        row = self.conn.execute("SELECT name, ae_title, host, port, role, charset, own_station_only, intake"
                                " FROM devices"
                                " WHERE ae_title=? AND added_at IS NOT NULL", (ae_title,)).fetchone()
        return dict(row) if row else None

    def close(self) -> None:
        """Close every read connection (at shutdown, when no other thread reads any more)."""
        with self._lock:
            conns = [*self._owners.values(), *self._free]
            self._owners.clear()
            self._free.clear()
        for conn in conns:
            conn.close()
        self._local = threading.local()

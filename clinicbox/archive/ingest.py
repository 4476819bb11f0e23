"""The archive room's front door: store one object durably, then index it, then say so.

:class:`Archive` is what the DICOM store handler, ``clinicbox import`` and start-up repair call.
The ingest rule (DESIGN.md section 4) lives here and only here::

    incoming/ file complete -> structure checked -> fsync -> rename into objects/ -> fsync dir
    -> index row committed by the writer -> return (only now may the sender hear Success)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from clinicbox.archive import index as idx
from clinicbox.archive.files import ObjectStore, dataset_sha256, file_sha256, fsync_dir, uid_key
from clinicbox.archive.parse import InvalidObject, ParsedObject, parse_file
from clinicbox.archive.writer import IndexWriter
from clinicbox.core.config import StorageSettings
from clinicbox.core.events import InstanceStored

log = logging.getLogger(__name__)

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_LOCK_STRIPES = 64
#: incoming/ files of a ``clinicbox import`` process are named import-<pid>-…; repair spares live ones
IMPORT_PREFIX = "import-"
REPAIR_LOCK = "repair.lock"


class StoreOutcome(Enum):
    STORED = "stored"           # new instance, file placed and indexed
    DUPLICATE = "duplicate"     # identical instance already stored; nothing added
    KEPT_FIRST = "kept-first"   # same UID, different content; duplicate_policy kept ours
    REPLACED = "replaced"       # same UID, different content; duplicate_policy took the new one
    HELD = "held"               # stored durably, but held for a person to reconcile (not queryable yet)


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    sop_instance_uid: str
    sop_class_uid: str
    size: int
    held_item: int | None = None


#: ``intake(conn, record)`` runs in the index transaction that would index ``record``: it returns
#: the id of the reconciliation item that holds the object (it wrote that item), or None to index
#: the object normally.  Running inside the writer makes the decision and the indexing one step, so
#: two senders cannot both see "no such patient" and file different people under one patient ID.
IntakeHook = Callable[[sqlite3.Connection, "idx.InstanceRecord"], "int | None"]

#: sources the intake hook sees (``clinicbox import`` by staff and releases from the queue do not;
#: "print" is the archive copy of a printed image box)
INTAKE_SOURCES = frozenset({"network", "repair", "print"})


class IngestError(Exception):
    """The object was not stored. ``kind`` is one of: invalid, class-mismatch, no-space, failure."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and all(c in "0123456789." for c in uid)


def is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


class Archive:
    """Owns the object store, the index and its writer for one data dir."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.store = ObjectStore(Path(settings.data_dir))
        self.db_path = self.store.root / idx.INDEX_FILE
        self.index = idx.Index(self.db_path)
        # With duplicate_policy = replace an acknowledged replacement lives only through its index
        # commit (the old file goes once it is committed), so that commit must survive a power cut.
        synchronous = "full" if settings.duplicate_policy == "replace" else settings.index_synchronous
        self.writer = IndexWriter(self.db_path, synchronous=synchronous, batch_max=settings.writer_batch_max)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._lock_fd: int | None = None
        self.listeners: list[Callable[[InstanceStored], None]] = []
        self.intake: IntakeHook | None = None
        self._disk_state = "ok"

    # --- life cycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the data dir and index (running migrations) and start the writer."""
        self.store.create_dirs()
        applied = idx.migrate(self.db_path)
        if applied:
            log.info("index %s: applied migrations %s", self.db_path, ", ".join(applied))
        self._lock_fd = os.open(self.store.root / "uid.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.writer.start()

    def close(self) -> None:
        self.writer.stop()
        self.index.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def importing(self):
        """Held (shared) by ``clinicbox import``, by job runs and by releases from the reconciliation queue
        for their whole run; start-up repair needs it alone (else it would take their files for orphans)."""
        with open(self.store.root / REPAIR_LOCK, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            yield

    @contextmanager
    def _uid_lock(self, uid: str):
        """Serialise stores of one SOP Instance UID across threads and processes (serve + import)."""
        stripe = int(uid_key(uid)[:8], 16) % _LOCK_STRIPES
        with self._locks[stripe]:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, stripe)
            try:
                yield
            finally:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, stripe)

    # --- storing ------------------------------------------------------------------------------

    def new_incoming(self) -> tuple[int, Path]:
        return self.store.new_incoming()

    def store_incoming(self, tmp: Path, *, calling_ae: str = "", source: str = "network",
                       expected_sop_class: str | None = None, expected_sop_instance: str | None = None,
                       sha256: str | None = None, synced: bool = False,
                       releasing: int | None = None) -> StoreResult:
        """Store the complete file ``tmp`` (in incoming/) under the ingest rule.

        ``sha256`` is the hash of the data set part (after the file meta) when the caller already
        computed it while receiving.  ``releasing`` names a held object (``held_objects.id``) this
        file takes the place of: in the same commit the held row goes and the instance is indexed.
        On any failure the file is removed and :class:`IngestError` is raised; on success it has been
        moved into objects/ (or discarded as a duplicate).
        """
        try:
            return self._store(tmp, calling_ae, source, expected_sop_class, expected_sop_instance,
                               sha256, synced, releasing)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def disk_state(self) -> tuple[str, int]:
        """("ok" | "warning" | "critical", free bytes) of the data dir's filesystem; logs changes."""
        st = os.statvfs(self.store.root)
        free = st.f_bavail * st.f_frsize
        mb = free // (1024 * 1024)
        state = ("critical" if mb < self.settings.min_free_critical_mb else
                 "warning" if mb < self.settings.min_free_warning_mb else "ok")
        if state != self._disk_state:
            level = logging.INFO if state == "ok" else logging.WARNING if state == "warning" else logging.ERROR
            log.log(level, "free space on the data disk: %d MB (%s; warning below %d MB, stores refused below %d MB)",
                    mb, state, self.settings.min_free_warning_mb, self.settings.min_free_critical_mb)
            self._disk_state = state
        return state, free

    def _store(self, tmp, calling_ae, source, expected_class, expected_instance, sha256, synced, releasing):
        if self.disk_state()[0] == "critical":
            raise IngestError("no-space", f"free space below storage.min_free_critical_mb "
                                          f"({self.settings.min_free_critical_mb} MB): store refused")
        try:
            parsed = parse_file(tmp)
        except InvalidObject as exc:
            raise IngestError("invalid", str(exc)) from None
        except OSError as exc:
            raise IngestError("no-space" if is_no_space(exc) else "failure", f"cannot read object: {exc}") from None
        uid, cls = self._check_identity(parsed, expected_class, expected_instance)
        if sha256 is None:
            sha256 = file_sha256(tmp, parsed.dataset_offset)
        with self._uid_lock(uid):
            existing = self.index.instance(uid)
            held = [h for h in self.index.held(uid) if h["id"] != releasing]
            live_copy = next((h for h in held if h["sha256"] == sha256 and not h["trashed"]), None)
            if releasing is None and live_copy is not None:
                log.debug("instance %s already held for reconciliation, identical: nothing added", uid)
                return StoreResult(StoreOutcome.DUPLICATE, uid, cls, parsed.size, held_item=live_copy["item_id"])
            replacing = False
            if existing is not None and existing["state"] == "ok":
                if existing["sha256"] == sha256:
                    log.debug("instance %s already stored, identical: nothing added", uid)
                    return StoreResult(StoreOutcome.DUPLICATE, uid, cls, parsed.size)
                if self.settings.duplicate_policy == "keep-first":
                    log.warning("instance %s from %s differs from the stored one; kept the stored one "
                                "(storage.duplicate_policy = keep-first)", uid, calling_ae or source)
                    return StoreResult(StoreOutcome.KEPT_FIRST, uid, cls, parsed.size)
                log.warning("instance %s from %s differs from the stored one; replacing it "
                            "(storage.duplicate_policy = replace)", uid, calling_ae or source)
                replacing = True
            elif existing is not None:
                replacing = True  # row flagged missing: this copy restores it
            relpath = self.store.relpath_for(uid)
            superseded = None
            if existing is not None and existing["state"] == "ok":
                # never overwrite an acknowledged object before its replacement is committed
                relpath = self.store.relpath_for(uid, version=sha256[:16])
                superseded = existing["path"]
            elif existing is not None or held or releasing is not None:
                # the plain name may belong to a held copy, or to a row flagged missing/damaged whose file
                # may still be (or come back) there; the old file goes once this copy is committed
                relpath = self.store.relpath_for(uid, version=sha256[:16])
                superseded = existing["path"] if existing is not None else None
            try:
                self.store.place(tmp, relpath, already_synced=synced)
            except OSError as exc:
                kind = "no-space" if is_no_space(exc) else "failure"
                raise IngestError(kind, f"cannot write object into place: {exc}") from None
            record = idx.record_for(parsed, path=relpath, sha256=sha256, calling_ae=calling_ae, source=source)
            try:
                held_item, released = self.writer.call(lambda conn: self.commit_record(conn, record, replacing,
                                                                                       releasing))
            except Exception as exc:
                # Nothing acknowledged it: take the file back out so disk and index agree.
                try:
                    os.unlink(self.store.abspath(relpath))
                except OSError:
                    pass
                kind = "no-space" if is_no_space(exc) else "failure"
                raise IngestError(kind, f"index write failed: {exc}") from None
            if held_item is not None:
                log.info("instance %s from %s held for reconciliation (item %d)", uid, calling_ae or source,
                         held_item)
                return StoreResult(StoreOutcome.HELD, uid, cls, parsed.size, held_item=held_item)
            if released is not None and released != relpath:
                self._unlink(released)
            if superseded and superseded != relpath and not self.index.path_in_use(superseded):
                self._unlink(superseded)
        if parsed.encoding_mismatch:
            log.warning("instance %s is encoded implicit VR under explicit transfer syntax %s; stored as received",
                        uid, parsed.transfer_syntax)
        event = InstanceStored(uid, cls, parsed.get("StudyInstanceUID"), parsed.get("SeriesInstanceUID"),
                               calling_ae, parsed.size)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener must never undo a stored object
                log.exception("listener %r failed for stored instance %s", listener, uid)
        return StoreResult(StoreOutcome.REPLACED if replacing else StoreOutcome.STORED, uid, cls, parsed.size)

    def commit_record(self, conn, record: idx.InstanceRecord, replacing: bool,
                      releasing: int | None = None) -> tuple[int | None, str | None]:
        """Index ``record`` (in the writer's transaction), or hold it when the intake hook says so.

        Returns (the reconciliation item holding it or None, the path of the held copy released).
        """
        released = None
        if releasing is not None:
            row = conn.execute("SELECT path FROM held_objects WHERE id=?", (releasing,)).fetchone()
            if row is None:
                raise IngestError("failure", f"held object {releasing} is no longer held")
            conn.execute("DELETE FROM held_objects WHERE id=?", (releasing,))
            released = row[0]
        elif self.intake is not None and record.source in INTAKE_SOURCES:
            item = self.intake(conn, record)
            if item is not None:
                idx.insert_held(conn, record, item)
                return item, None
        if replacing:
            idx.delete_instance(conn, record.sop_instance_uid)
        idx.insert_instance(conn, record)
        return None, released

    def object_path(self, sop_instance_uid: str) -> Path | None:
        """The file of an object: the indexed instance, else a held copy; None when there is neither."""
        row = self.index.instance(sop_instance_uid)
        if row is not None:
            return self.store.abspath(row["path"])
        held = self.index.held(sop_instance_uid)
        return self.store.abspath(held[0]["path"]) if held else None

    def _unlink(self, relpath: str) -> None:
        path = self.store.abspath(relpath)
        try:
            os.unlink(path)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", relpath, exc)

    def drop_held(self, held_ids: list[int], write_extra: Callable | None = None) -> int:
        """Remove held objects (rows first, in one commit with ``write_extra(conn)``, then files).

        Each file goes under its UID's lock and only if no row names it any more: a copy of the same
        object that arrived meanwhile may have been placed under the same name.
        """
        def write(conn):
            gone = []
            for hid in held_ids:
                row = conn.execute("SELECT path, sop_instance_uid FROM held_objects WHERE id=?", (hid,)).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM held_objects WHERE id=?", (hid,))
                    gone.append((row[0], row[1]))
            if write_extra is not None:
                write_extra(conn)
            return gone

        gone = self.writer.call(write)
        for path, uid in gone:
            with self._uid_lock(uid):
                if not self.index.path_in_use(path):
                    self._unlink(path)
        return len(gone)

    def trash_held(self, conn: sqlite3.Connection, item_id: int) -> None:
        """In the caller's transaction: the item's held objects are in the trash (not live copies)."""
        conn.execute("UPDATE held_objects SET trashed=1 WHERE item_id=?", (item_id,))

    @staticmethod
    def _check_identity(parsed: ParsedObject, expected_class, expected_instance) -> tuple[str, str]:
        uid, cls = parsed.get("SOPInstanceUID"), parsed.get("SOPClassUID")
        if not uid:
            raise IngestError("invalid", "data set has no SOP Instance UID")
        if not cls:
            raise IngestError("invalid", "data set has no SOP Class UID")
        for name in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = parsed.get(name)
            if not value:
                raise IngestError("invalid", f"data set has no {name}")
            if not _valid_uid(value):
                raise IngestError("invalid", f"{name} {value[:70]!r} is not a valid UID")
        if expected_instance is not None and uid != expected_instance:
            raise IngestError("invalid", f"SOP Instance UID {uid} in the data set differs from "
                                         f"{expected_instance} in the request")
        if expected_class is not None and cls != expected_class:
            raise IngestError("class-mismatch", f"SOP Class UID {cls} in the data set differs from "
                                                f"{expected_class} in the request")
        if parsed.meta_sop_instance_uid and parsed.meta_sop_instance_uid != uid:
            raise IngestError("invalid", "file meta Media Storage SOP Instance UID differs from the data set")
        return uid, cls

    def store_file(self, src: Path, *, source: str = "import") -> StoreResult:
        """Copy a Part 10 file from anywhere into incoming/ and store it like a received one."""
        fd, tmp = self.store.new_incoming(prefix=f"{IMPORT_PREFIX}{os.getpid()}-")
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise IngestError("no-space" if is_no_space(exc) else "failure", f"cannot copy: {exc}") from None
        return self.store_incoming(tmp, source=source)

    def put_back(self, table: str, row_id: int, relpath: str, sha256: str, source: Path) -> bool:
        """Put an intact copy (``source``, e.g. from the backup) back in place of a damaged or missing
        stored file, the way ingest places files (incoming/, fsync, hash checked, rename, directory
        fsync), under the UID's lock and only while the row (``table``: instances or held_objects)
        still names that file with that checksum: True when done.  False when the row changed
        meanwhile (replaced, deleted by retention, released) or the copy does not hash right."""
        if table not in ("instances", "held_objects"):
            raise ValueError(table)
        row = self.index.conn.execute(f"SELECT sop_instance_uid FROM {table} WHERE id=? AND path=? AND sha256=?",
                                      (row_id, relpath, sha256)).fetchone()
        if row is None:
            return False
        with self._uid_lock(row[0]):
            if self.index.conn.execute(f"SELECT 1 FROM {table} WHERE id=? AND path=? AND sha256=?",
                                       (row_id, relpath, sha256)).fetchone() is None:
                return False
            # named like an import's temporary file: start-up repair leaves a live process's files alone
            fd, tmp = self.store.new_incoming(prefix=f"{IMPORT_PREFIX}{os.getpid()}-repair-")
            try:
                with os.fdopen(fd, "wb") as out, open(source, "rb") as fin:
                    shutil.copyfileobj(fin, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                if dataset_sha256(tmp) != sha256:
                    raise InvalidObject("the copy's data set does not match the recorded checksum")
                dest = self.store.abspath(relpath)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return True

    def delete_study(self, study_instance_uid: str, only: dict[str, str] | None = None,
                     keep_if: Callable[[sqlite3.Connection], str | None] | None = None,
                     write_extra: Callable[[sqlite3.Connection, int], None] | None = None) -> int | str:
        """Remove a study's instances: index rows first (one commit), then their files.

        ``only`` (path -> sha256) limits it to instances whose file and checksum are listed (what a
        verified backup holds), checked inside the same transaction: an instance that arrived or
        was replaced meanwhile stays.  ``keep_if(conn)``, also inside it, may refuse at the last
        moment (a legal hold placed meanwhile): its reason is returned and nothing is deleted.
        ``write_extra(conn, n)`` commits with the deletion (the audit record).  Each file goes under
        its UID's lock and only if no row names it any more: the same UID sent again after the rows
        went may already have been placed under the same name, and acknowledged.
        """
        def write(conn):
            if keep_if is not None and (reason := keep_if(conn)):
                return reason
            rows = conn.execute(
                "SELECT i.sop_instance_uid, i.path, i.sha256 FROM instances i JOIN series se ON se.id = i.series_pk"
                " JOIN studies s ON s.id = se.study_pk WHERE s.study_instance_uid = ?", (study_instance_uid,)).fetchall()
            gone = []
            for uid, path, sha in rows:
                if only is None or only.get(path) == sha:
                    idx.delete_instance(conn, uid)
                    gone.append((path, uid))
            if gone and write_extra is not None:
                write_extra(conn, len(gone))
            return gone

        gone = self.writer.call(write)
        if isinstance(gone, str):
            return gone
        for path, uid in gone:
            with self._uid_lock(uid):
                if not self.index.path_in_use(path):
                    self._unlink(path)
        return len(gone)

    def add_device(self, name: str, ae_title: str, host: str, port: int, role: str, charset: str = "",
                   own_station_only: bool | None = None, intake: str = "", print_to: str | None = None) -> None:
        self.writer.call(lambda conn: idx.upsert_device(conn, name, ae_title, host, port, role, charset,
                                                        own_station_only, intake, print_to))

    def remove_device(self, name_or_ae: str) -> bool:
        return self.writer.call(lambda conn: idx.remove_device(conn, name_or_ae))

    def note_device_seen(self, ae_title: str, host: str) -> Future:
        """Record a caller (asynchronously); the future says whether it is a new device."""
        return self.writer.submit(lambda conn: idx.record_device_seen(conn, ae_title, host))



"""The object store on disk: safe paths from UIDs, and the fsync/rename steps of the ingest rule.

A file's place is derived from the SHA-256 of its SOP Instance UID (never the raw UID, which comes
from the network): ``objects/ab/abcd….dcm``.  Files in flight live in ``incoming/`` on the
same filesystem, so moving one into place is a rename.

One level of 256 directories, all made when the data dir is created, rather than DESIGN.md's
``ab/cd/``: with two levels (65,536 directories) almost every store into an archive of fewer than
~100,000 instances created a directory, and each new directory costs a mkdir and an fsync of its
parent on top of the fsync of the directory the file lands in (measured: ~1.5 ms of a ~7 ms
store).  ext4 and XFS index large directories, so 4,000 files per directory at a million
instances is no burden.
"""

from __future__ import annotations

import hashlib
import os
import itertools
import time
from pathlib import Path

OBJECTS = "objects"
INCOMING = "incoming"
HASH_CHUNK = 1 << 20


def uid_key(sop_instance_uid: str) -> str:
    """The hex SHA-256 of a SOP Instance UID: the object's file name stem."""
    return hashlib.sha256(sop_instance_uid.encode("ascii", "surrogateescape")).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path, offset: int = 0) -> str:
    """SHA-256 of a file from ``offset`` on, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a stored (Part 10) file's data set: the checksum ingest records for it."""
    from clinicbox.archive.parse import dataset_offset

    with open(path, "rb") as fh:
        offset = dataset_offset(fh)
    return file_sha256(path, offset)


class ObjectStore:
    """Paths and durable moves for the files under one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.objects = self.root / OBJECTS
        self.incoming = self.root / INCOMING
        self._serial = itertools.count(int(time.time() * 1000))

    def create_dirs(self) -> None:
        for d in (self.root, self.objects, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        made = False
        for i in range(256):
            fan = self.objects / f"{i:02x}"
            if not fan.is_dir():
                fan.mkdir(exist_ok=True)  # another process may be making it at the same moment
                made = True
        if made:
            fsync_dir(self.objects)
        fsync_dir(self.root)

    def relpath_for(self, sop_instance_uid: str, version: str | None = None) -> str:
        """Path of the object for this UID, relative to the data dir (as kept in the index).

        ``version`` names a replacement (duplicate_policy = replace), which is written beside the
        object it replaces rather than over it.
        """
        key = uid_key(sop_instance_uid)
        return f"{OBJECTS}/{key[:2]}/{key}.{version}.dcm" if version else f"{OBJECTS}/{key[:2]}/{key}.dcm"

    def abspath(self, relpath: str) -> Path:
        return self.root / relpath

    def new_incoming(self, prefix: str = "rx-", suffix: str = ".part") -> tuple[int, Path]:
        """A new temporary file in ``incoming/``: (fd open for writing, path)."""
        while True:
            path = self.incoming / f"{prefix}{os.getpid()}-{next(self._serial)}{suffix}"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path
            except FileExistsError:
                continue


    def place(self, tmp: Path, relpath: str, *, already_synced: bool = False) -> Path:
        """Move a file from incoming/ into its final place durably: fsync, rename, fsync dir.

        Replaces whatever is at ``relpath`` atomically.
        """
        dest = self.abspath(relpath)
        if not already_synced:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return dest

    def iter_objects(self):
        """Yield the relative path of every object file on disk."""
        if not self.objects.is_dir():
            return
        for fan in os.scandir(self.objects):
            if not fan.is_dir():
                continue
            for entry in os.scandir(fan.path):
                if entry.is_file() and entry.name.endswith(".dcm"):
                    yield f"{OBJECTS}/{fan.name}/{entry.name}"

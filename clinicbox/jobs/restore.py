"""Checking and restoring backups: ``backup verify``, ``clinicbox restore`` and the scheduled
restore test, which restores the latest backup into a scratch folder and checks it against its
manifest (counts, every checksum, the index's own integrity check): the "last verified restore"
that status, the console and retention rely on.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

from clinicbox.archive.files import dataset_sha256
from clinicbox.archive.index import INDEX_FILE
from clinicbox.archive.parse import InvalidObject
from clinicbox.jobs.backup import (
    BackupError,
    backup_root,
    digest_copy,
    find_backup,
    objects_sql,
    pool_file,
    read_manifest,
    set_states,
)


def verify_backup(target: Path, backup: str | None = None) -> dict:
    """Check a backup: its index snapshot is sound and every object is present with its checksum."""
    bdir = find_backup(target, backup)
    manifest = read_manifest(bdir)
    root = backup_root(target)
    conn = sqlite3.connect(f"file:{bdir / INDEX_FILE}?mode=ro", uri=True)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        n = conn.execute(f"SELECT count(*) FROM ({objects_sql(conn)})").fetchone()[0]
    finally:
        conn.close()
    problems = []
    if check != "ok":
        problems.append(f"index snapshot: {check}")
    listed = [o for o in manifest["objects"] if "carried" not in o]
    if n != len(listed):
        problems.append(f"index snapshot has {n} instances, the manifest {len(listed)}")
    for o in manifest["objects"]:
        f = pool_file(root, o)
        try:
            if dataset_sha256(f) != o["sha256"]:
                problems.append(f"{o['path']}: checksum differs")
        except FileNotFoundError:
            problems.append(f"{o['path']}: missing")
        except (OSError, InvalidObject) as exc:
            problems.append(f"{o['path']}: unreadable ({exc})")
    return {"backup": manifest["id"], "instances": len(manifest["objects"]), "ok": not problems,
            "problems": problems[:50], "problem_count": len(problems)}


def restore(target: Path, backup: str | None, new_data_dir: Path) -> dict:
    """Rebuild a working data dir from a backup (the folder must not exist or be empty)."""
    bdir = find_backup(target, backup)
    manifest = read_manifest(bdir)
    new = Path(new_data_dir)
    if new.exists() and any(new.iterdir()):
        raise BackupError(f"{new} is not empty: restore into a new folder")
    root = backup_root(target)
    started = time.monotonic()
    (new / "objects").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bdir / INDEX_FILE, new / INDEX_FILE)
    bad, carried = [], []
    for o in manifest["objects"]:
        dest = new / o["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            digest, _n = digest_copy(pool_file(root, o), dest)
        except (OSError, InvalidObject) as exc:
            dest.unlink(missing_ok=True)
            bad.append((o["path"], o["sha256"], str(exc)))
            continue
        if digest != o["sha256"]:
            dest.unlink(missing_ok=True)
            bad.append((o["path"], o["sha256"], "checksum differs"))
        elif "carried" in o:
            carried.append((o["path"], o["sha256"]))
    if carried or bad:
        # copies carried from an earlier backup (damaged or missing when it was made) restored intact are
        # ok; the objects it could not restore are marked missing (the scrub reports them, status counts
        # them) rather than pointing at files that are not there or not what was stored
        set_states(new / INDEX_FILE, [("ok", p, h) for p, h in carried] + [("missing", p, h) for p, h, _e in bad])
    os.sync()
    result = {"backup": manifest["id"], "data_dir": str(new), "instances": len(manifest["objects"]),
              "restored": len(manifest["objects"]) - len(bad), "problems": [f"{p}: {e}" for p, _h, e in bad[:50]],
              "seconds": round(time.monotonic() - started, 3)}
    if bad:
        raise BackupError(f"restore of {manifest['id']} into {new}: {len(bad)} object(s) could not be restored "
                          f"(marked missing there), e.g. {bad[0][0]}: {bad[0][2]}")
    return result


def restore_test(data_dir: Path, target: Path, scratch: Path | None = None) -> dict:
    """Restore the latest backup into a scratch folder on the backup target, check it against its
    manifest, remove it."""
    bdir = find_backup(target, None)
    manifest = read_manifest(bdir)
    # on the backup disk, not the data disk: a full restore there could push the live archive
    # below its free-space guard (stores refused) or fill it
    scratch = Path(scratch or backup_root(target) / "restore-test")
    st = os.statvfs(scratch.parent if scratch.parent.exists() else backup_root(target))
    need = sum(o.get("size", 0) for o in manifest["objects"]) + (bdir / INDEX_FILE).stat().st_size
    if st.f_bavail * st.f_frsize < need * 1.1:
        raise BackupError(f"not enough free space on {scratch.parent} for the restore test "
                          f"({need / 1e6:.0f} MB needed)")
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        result = restore(target, manifest["id"], scratch)
        conn = sqlite3.connect(scratch / INDEX_FILE)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                      for t in ("patients", "studies", "series", "instances")}
        finally:
            conn.close()
        if check != "ok":
            raise BackupError(f"the restored index is not sound: {check}")
        expected = {t: manifest[t] for t in counts}
        if counts != expected:
            raise BackupError(f"restored counts {counts} differ from the manifest's {expected}")
        for o in manifest["objects"]:
            if dataset_sha256(scratch / o["path"]) != o["sha256"]:
                raise BackupError(f"restored {o['path']}: checksum differs")
        return {"backup": manifest["id"], "verified": True, **counts, "seconds": result["seconds"]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""The jobs room: backup (full, incremental, while receiving, killed), verify, restore, prune, the job
runner's records and lock, the schedule inside ``clinicbox serve`` (every second; a missed run at start)."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from clinicbox.archive.files import dataset_sha256
from clinicbox.archive.ingest import Archive
from clinicbox.core.config import BackupSettings, Config, StorageSettings
from clinicbox.jobs import backup as bk
from clinicbox.jobs.backup import BackupError, list_backups, prune, run_backup
from clinicbox.jobs.restore import restore, verify_backup
from clinicbox.jobs.runner import history, last_run, open_jobs, run_job
from tests.support.peers import REPO, ClinicBox, dcmtk
from tests.support.synth import ORG_ROOT, ct_dataset, write_ct_series

INDEX = "index.sqlite3"
TABLES = ("patients", "studies", "series", "instances")


# --------------------------------------------------------------------------------------------- helpers


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def index_rows(data_dir: Path) -> dict[str, str]:
    """sop_instance_uid -> path of every ok instance in a data dir's (or snapshot's) index."""
    db = Path(data_dir) / INDEX if Path(data_dir).is_dir() else Path(data_dir)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT sop_instance_uid, path FROM instances WHERE state='ok'").fetchall())
    finally:
        conn.close()


def index_counts(data_dir: Path) -> dict[str, int]:
    db = Path(data_dir) / INDEX if Path(data_dir).is_dir() else Path(data_dir)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()


def file_hashes(data_dir: Path) -> dict[str, str]:
    """sop_instance_uid -> SHA-256 of the whole stored file."""
    return {uid: sha(Path(data_dir) / p) for uid, p in index_rows(data_dir).items()}


def source_hashes(files) -> dict[str, str]:
    out = {}
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        out[uid] = sha(f)
    return out


def run_cli(*args, check=False, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CLINICBOX_CONFIG"}
    return subprocess.run([sys.executable, "-m", "clinicbox", *map(str, args)], capture_output=True, text=True,
                          check=check, env=env, cwd=REPO, timeout=timeout)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def pool_files(target: Path) -> set[str]:
    root = Path(target) / bk.ROOT
    return {str(f.relative_to(root)) for f in (root / "objects").rglob("*") if f.is_file()}


def manifest(target: Path, backup_id: str) -> dict:
    return bk.read_manifest(Path(target) / bk.ROOT / "backups" / backup_id)


@pytest.fixture
def archive(tmp_path):
    a = Archive(StorageSettings(data_dir=str(tmp_path / "data")))
    a.open()
    open_jobs(a)
    yield a
    a.close()


def store_series(archive: Archive, folder: Path, count: int, **kw) -> list[Path]:
    files = write_ct_series(folder, count, rows=16, cols=16, **kw)
    for f in files:
        archive.store_file(f)
    return files


# ----------------------------------------------------------------- 1. the job functions on a small archive


def test_full_then_incremental_backup_verify_and_restore(archive, tmp_path):
    data = archive.store.root
    target = tmp_path / "usb"
    target.mkdir()
    first = store_series(archive, tmp_path / "src1", 20, patient_id="BK1")
    originals = source_hashes(first)

    r1 = run_backup(data, target)
    assert (r1.instances, r1.copied, r1.reused, r1.pruned) == (20, 20, 0, [])
    assert r1.copied_bytes == sum((data / p).stat().st_size for p in index_rows(data).values())
    at_first = {"counts": index_counts(data), "hashes": file_hashes(data)}
    assert at_first["hashes"] == originals, "the archive keeps the received bytes"

    more = store_series(archive, tmp_path / "src2", 5, patient_id="BK2")
    originals2 = originals | source_hashes(more)
    r2 = run_backup(data, target)
    assert (r2.instances, r2.copied, r2.reused) == (25, 5, 20), r2.figures()
    assert set(r2.figures()) >= {"backup", "instances", "copied", "copied_bytes", "reused", "seconds", "pruned"}
    assert [b["id"] for b in list_backups(target)] == [r1.backup_id, r2.backup_id]

    for b in (r1.backup_id, r2.backup_id, None):
        v = verify_backup(target, b)
        assert v["ok"], v
    assert verify_backup(target)["backup"] == r2.backup_id

    # the first backup restores exactly the archive as it was then, byte for byte
    new = tmp_path / "restored1"
    res = restore(target, r1.backup_id, new)
    assert res["restored"] == res["instances"] == 20
    assert index_counts(new) == at_first["counts"]
    assert file_hashes(new) == originals
    # and the second one the archive with the five newer instances
    new2 = tmp_path / "restored2"
    restore(target, "latest", new2)
    assert index_counts(new2) == index_counts(data)
    assert file_hashes(new2) == originals2

    # the restored data dir is a working one
    restored = Archive(StorageSettings(data_dir=str(new2)))
    restored.open()
    try:
        assert restored.index.counts()["instances"] == 25
    finally:
        restored.close()

    # a non-empty folder is never restored into
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(BackupError, match="not empty"):
        restore(target, "latest", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(BackupError, match="not empty"):
        restore(target, "latest", data)
    with pytest.raises(BackupError, match="no backup"):
        restore(target, "19990101", tmp_path / "nope")


def test_prune_keeps_newest_and_removes_pool_files_only_the_pruned_backup_named(tmp_path):
    a = Archive(StorageSettings(data_dir=str(tmp_path / "data"), duplicate_policy="replace"))
    a.open()
    try:
        data = a.store.root
        target = tmp_path / "nas"
        target.mkdir()
        store_series(a, tmp_path / "src", 6, patient_id="PR1")
        # one instance whose first version only the first backup holds: replaced by new content afterwards
        study, series = pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT)
        ds = ct_dataset(study, series, 1, rows=16, cols=16, patient_id="PR2", seed=1)
        v1 = tmp_path / "v1.dcm"
        ds.save_as(v1, enforce_file_format=True)
        a.store_file(v1)
        r1 = run_backup(data, target, keep=2)
        only_first = {o["path"] for o in manifest(target, r1.backup_id)["objects"]}

        ds.PixelData = bytes(len(ds.PixelData))  # same UID, other content
        v2 = tmp_path / "v2.dcm"
        ds.save_as(v2, enforce_file_format=True)
        a.store_file(v2)
        r2 = run_backup(data, target, keep=2)
        store_series(a, tmp_path / "src3", 2, patient_id="PR3")
        named_2 = {o["path"] for o in manifest(target, r2.backup_id)["objects"]}
        only_first -= named_2
        assert len(only_first) == 1, "the replaced instance's old file is named by the first backup only"
        assert only_first <= pool_files(target)

        r3 = run_backup(data, target, keep=2)
        assert r3.pruned == [r1.backup_id]
        assert [b["id"] for b in list_backups(target)] == [r2.backup_id, r3.backup_id]
        assert not (target / bk.ROOT / "backups" / r1.backup_id).exists()
        named_3 = {o["path"] for o in manifest(target, r3.backup_id)["objects"]}
        assert pool_files(target) == named_2 | named_3, "exactly the files the kept backups name"
        assert not only_first & pool_files(target)
        for b in (r2.backup_id, r3.backup_id):
            assert verify_backup(target, b)["ok"]
        # prune() on its own is idempotent
        assert prune(target, 2) == []
        assert len(list_backups(target)) == 2
    finally:
        a.close()


def test_verify_reports_a_corrupted_and_a_missing_pool_file(archive, tmp_path):
    target = tmp_path / "usb"
    target.mkdir()
    store_series(archive, tmp_path / "src", 8)
    r = run_backup(archive.store.root, target)
    objects = manifest(target, r.backup_id)["objects"]
    root = target / bk.ROOT
    bad = root / objects[0]["path"]
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF  # one pixel byte: the size stays the same
    bad.write_bytes(bytes(raw))
    gone = root / objects[1]["path"]
    gone.unlink()

    v = verify_backup(target)
    assert v["ok"] is False
    assert v["problem_count"] == 2
    assert any(objects[0]["path"] in p and "checksum" in p for p in v["problems"]), v["problems"]
    assert any(objects[1]["path"] in p and "missing" in p for p in v["problems"]), v["problems"]

    # the CLI says so with a non-zero exit
    r = run_cli("backup", "verify", "--to", target, "--data-dir", archive.store.root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is False


def test_missing_target_is_a_clear_backup_error(archive, tmp_path):
    store_series(archive, tmp_path / "src", 2)
    absent = tmp_path / "unplugged-usb"
    with pytest.raises(BackupError, match="does not exist or is not mounted") as exc:
        run_backup(archive.store.root, absent)
    assert str(absent) in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not absent.exists(), "a missing mount point is not created (that would fill the root disk)"
    with pytest.raises(BackupError, match="no finished backup"):
        verify_backup(tmp_path)


def test_run_job_records_ok_failed_and_skipped_runs(archive, tmp_path):
    target = tmp_path / "usb"
    target.mkdir()
    store_series(archive, tmp_path / "src", 3)
    config = Config(storage=archive.settings, backup=BackupSettings(target=str(target), keep=3))

    ok = run_job("backup", config, archive)
    assert ok["outcome"] == "ok" and ok["figures"]["instances"] == 3 and ok["figures"]["copied"] == 3, ok

    no_target = Config(storage=archive.settings)
    failed = run_job("backup", no_target, archive, trigger="schedule")
    assert failed["outcome"] == "failed"
    assert "no backup target" in failed["error"]

    # a run while another holds the job's lock is recorded as skipped, and does nothing
    with open(archive.store.root / "job-backup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        skipped = run_job("backup", config, archive, trigger="schedule")
    assert skipped["outcome"] == "skipped", skipped
    assert len(list_backups(target)) == 1

    rt = run_job("restore-test", config, archive)
    assert rt["outcome"] == "ok" and rt["figures"]["verified"] is True, rt

    runs = history(archive, "backup")
    assert [(r["outcome"], r["trigger"]) for r in runs] == [("skipped", "schedule"), ("failed", "schedule"),
                                                           ("ok", "manual")]
    assert runs[1]["error"] == failed["error"]
    assert runs[2]["figures"]["backup"] == ok["figures"]["backup"]
    assert all(r["ended_at"] and r["ended_at"] >= r["started_at"] for r in runs)
    assert last_run(archive, "backup")["started_at"] == ok["started_at"]
    assert last_run(archive, "restore-test") is not None
    assert [r["job"] for r in history(archive)] == ["restore-test", "backup", "backup", "backup"]
    with pytest.raises(KeyError):
        run_job("defrag", config, archive)


# -------------------------------------------------------------- 2. a backup while C-STOREs are arriving


def test_backup_while_receiving_holds_everything_acknowledged_before_it(tmp_path):
    storescu = dcmtk("storescu")
    target = tmp_path / "usb"
    target.mkdir()
    batches = [write_ct_series(tmp_path / f"in{i}", 30, rows=64, cols=64, patient_id=f"LIVE{i}") for i in range(5)]
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_sha256(f)
            for b in batches for f in b}  # the data set part (the SCP writes its own file meta)
    box = ClinicBox(tmp_path / "data")
    box.start()
    errors = []

    def send():
        for b in batches:
            r = subprocess.run([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(box.port), *map(str, b)],
                               check=False, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"})
            if r.returncode != 0:
                errors.append(r.stderr)

    sender = threading.Thread(target=send)
    try:
        sender.start()
        deadline = time.monotonic() + 60
        while len(index_rows(box.data_dir)) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        before = set(index_rows(box.data_dir))  # all acknowledged: committed before the answer is sent
        r = box.cli("backup", "run", "--to", str(target), check=False)
        after = set(index_rows(box.data_dir))
        sender.join(120)
        assert r.returncode == 0, r.stderr + box.log()[-2000:]
        assert not errors, errors
    finally:
        sender.join(120)
        box.stop()

    (b,) = list_backups(target)
    in_backup = set(index_rows(target / bk.ROOT / "backups" / b["id"] / INDEX))
    assert before <= in_backup <= after, (len(before), len(in_backup), len(after))
    assert len(before) <= b["instances"] <= len(after)
    assert b["instances"] == len(in_backup) == len(manifest(target, b["id"])["objects"])
    print(f"backup while receiving: {len(before)} before, {b['instances']} in the backup, {len(after)} after, "
          f"{len(sent)} sent")

    v = run_cli("backup", "verify", "--to", target, "--data-dir", box.data_dir)
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["ok"] is True

    new = tmp_path / "restored"
    r = run_cli("restore", b["id"], "--from", target, "--data-dir", new)
    assert r.returncode == 0, r.stderr
    restored = file_hashes(new)
    assert set(restored) == in_backup
    live = file_hashes(box.data_dir)
    assert all(restored[uid] == live[uid] for uid in restored), "restored files equal the archive's"
    rows = index_rows(new)
    assert all(dataset_sha256(new / rows[uid]) == sent[uid] for uid in restored), "data sets equal what was sent"
    counts = index_counts(new)
    assert counts["instances"] == b["instances"]
    assert counts["studies"] == b["studies"]


# ----------------------------------------------------------------------------- 3. kill -9 during a backup


def test_backup_killed_midway_leaves_no_listed_backup_and_the_next_one_works(tmp_path):
    data = tmp_path / "data"
    target = tmp_path / "usb"
    target.mkdir()
    a = Archive(StorageSettings(data_dir=str(data)))
    a.open()
    try:
        for i in range(3):
            for f in write_ct_series(tmp_path / f"src{i}", 40, rows=512, cols=512, patient_id=f"BIG{i}"):
                a.store_file(f)
                f.unlink()
    finally:
        a.close()
    config = write_config(tmp_path / "box.toml", f'[backup]\ntarget = "{target}"\n')
    env = {k: v for k, v in os.environ.items() if k != "CLINICBOX_CONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "clinicbox", "jobs", "run", "backup", "--config", str(config),
                             "--data-dir", str(data)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    backups = target / bk.ROOT / "backups"
    pool = target / bk.ROOT / "objects"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if backups.is_dir() and any(backups.iterdir()) and pool.is_dir() and any(pool.rglob("*.dcm*")):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the backup finished before it could be killed: make the archive bigger"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    (killed,) = list(backups.iterdir())
    print(f"killed with {len(list(pool.rglob('*.dcm')))} of 120 objects in the pool")
    assert not (killed / bk.MANIFEST).exists(), "killed after the manifest: not mid-way"
    assert run_cli("backup", "list", "--json", "--config", config, "--data-dir", data, check=True).stdout.strip() \
        == "[]"

    r = run_cli("backup", "run", "--config", config, "--data-dir", data)
    assert r.returncode == 0, r.stderr
    listed = json.loads(run_cli("backup", "list", "--json", "--config", config, "--data-dir", data,
                                check=True).stdout)
    assert len(listed) == 1 and listed[0]["id"] != killed.name and listed[0]["instances"] == 120
    v = run_cli("backup", "verify", "--config", config, "--data-dir", data)
    assert v.returncode == 0, v.stdout + v.stderr

    runs = json.loads(run_cli("jobs", "history", "--json", "--config", config, "--data-dir", data,
                              check=True).stdout)
    assert runs[0]["outcome"] == "ok"
    # the killed run was marked when the next process opened the jobs room: not left 'running' forever
    assert (runs[1]["outcome"], runs[1]["error"]) == ("failed", "interrupted (the process ended mid-run)"), runs

    new = tmp_path / "restored"
    r = run_cli("restore", "latest", "--from", target, "--data-dir", new)
    assert r.returncode == 0, r.stderr
    assert index_counts(new) == index_counts(data)
    assert file_hashes(new) == file_hashes(data)
    s = json.loads(run_cli("status", "--json", "--data-dir", new, check=True).stdout)
    assert s["instances"] == 120


# ------------------------------------------------------------------------------- 4./5. the schedule in serve


def test_serve_runs_a_one_second_schedule_without_overlap(tmp_path):
    target = tmp_path / "usb"
    target.mkdir()
    data = tmp_path / "data"
    a = Archive(StorageSettings(data_dir=str(data)))
    a.open()
    try:
        store_series(a, tmp_path / "src", 10)
    finally:
        a.close()
    config = write_config(tmp_path / "box.toml", f'[backup]\ntarget = "{target}"\nkeep = 3\n\n'
                                                 '[jobs]\nbackup = "*/1 * * * * *"\nrestore_test = ""\n')
    box = ClinicBox(data, config=config)
    box.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            runs = json.loads(box.cli("jobs", "history", "--job", "backup", "--json", "--config",
                                      str(config)).stdout)
            if sum(r["trigger"] == "schedule" and r["outcome"] == "ok" for r in runs) >= 3:
                break
            time.sleep(0.5)
    finally:
        rc = box.stop()
    assert rc == 0, box.log()[-3000:]
    everything = json.loads(box.cli("jobs", "history", "--json", "--config", str(config)).stdout)
    assert "restore-test" not in {r["job"] for r in everything}, "restore_test = '' is not scheduled"
    runs = [r for r in everything if r["job"] == "backup"]
    scheduled = [r for r in runs if r["trigger"] == "schedule" and r["outcome"] == "ok"]
    assert len(scheduled) >= 2, runs
    assert not [r for r in runs if r["outcome"] in ("failed", "running")], runs
    worked = sorted((r for r in runs if r["outcome"] == "ok"), key=lambda r: r["started_at"])
    for prev, cur in itertools.pairwise(worked):
        assert cur["started_at"] >= prev["ended_at"], f"overlapping runs: {prev} {cur}"
    assert len(list_backups(target)) <= 3, "keep = 3"
    assert verify_backup(target)["ok"]

    status = json.loads(box.cli("status", "--json", "--config", str(config)).stdout)
    assert status["last_backup"] == worked[-1]["started_at"]
    assert status["backup_target"] == str(target)
    assert status["last_verified_restore"] is None
    assert "last verified restore: never" in box.cli("jobs", "history", "--config", str(config)).stdout
    # a restore test by hand: now both say when the last verified restore was
    assert box.cli("jobs", "run", "restore-test", "--config", str(config)).returncode == 0
    status = json.loads(box.cli("status", "--json", "--config", str(config)).stdout)
    assert status["last_verified_restore"]
    shown = box.cli("jobs", "history", "--config", str(config)).stdout
    assert "last verified restore: " in shown and "never" not in shown.splitlines()[0]


def test_serve_runs_a_missed_backup_once_at_start(tmp_path):
    target = tmp_path / "usb"
    target.mkdir()
    config = write_config(tmp_path / "box.toml", f'[backup]\ntarget = "{target}"\n\n'
                                                 '[jobs]\nbackup = "0 3 * * *"\nrestore_test = ""\n')
    box = ClinicBox(tmp_path / "data", config=config)

    def runs():
        return json.loads(box.cli("jobs", "history", "--job", "backup", "--json", "--config", str(config)).stdout)

    box.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [r for r in runs() if r["outcome"] != "running"]:
            time.sleep(0.3)
    finally:
        box.stop()
    got = runs()
    assert [(r["job"], r["trigger"], r["outcome"]) for r in got] == [("backup", "missed", "ok")], \
        f"{got}\n{box.log()[-3000:]}"
    assert len(list_backups(target)) == 1

    # started again: the last run is newer than the schedule's previous time, nothing is missed; a run
    # that ended with problems (a scrub that found damage) counts as run, not as missed
    def scrubs():
        return json.loads(box.cli("jobs", "history", "--job", "scrub", "--json", "--config", str(config)).stdout)

    assert scrubs() and all(r["trigger"] == "missed" for r in scrubs())
    db = sqlite3.connect(tmp_path / "data" / INDEX)
    with db:
        db.execute("UPDATE job_runs SET outcome='problems' WHERE job='scrub'")
    db.close()
    n_scrubs = len(scrubs())
    box.start()
    try:
        time.sleep(2)
    finally:
        box.stop()
    assert len(runs()) == 1, runs()
    assert len(scrubs()) == n_scrubs, scrubs()

    # the box was off over a scheduled time after a run it did make: that time is missed, run once
    db = sqlite3.connect(tmp_path / "data" / INDEX)
    with db:
        db.execute("UPDATE job_runs SET started_at='2026-01-01T00:00:00.000+00:00' WHERE job='backup'")
    db.close()
    box.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len([r for r in runs() if r["outcome"] == "ok"]) < 2:
            time.sleep(0.3)
    finally:
        box.stop()
    assert [(r["trigger"], r["outcome"]) for r in runs()] == [("missed", "ok"), ("missed", "ok")], runs()


# ------------------------------------------------------------------------------------ 6. config errors


@pytest.mark.parametrize("value", ["not a cron", "0 3 * *", "61 3 * * *", "0 25 * * *", "0 3 * * mon-xyz"])
def test_config_check_rejects_a_bad_schedule_naming_the_key(tmp_path, value):
    path = write_config(tmp_path / "bad.toml", f'[jobs]\nbackup = "{value}"\n')
    r = run_cli("config", "check", path)
    assert r.returncode == 2, (value, r.stdout, r.stderr)
    assert "jobs.backup" in r.stderr
    assert r.stderr.strip().count("\n") == 0, "one clear line, no traceback"


def test_config_check_accepts_good_schedules(tmp_path):
    path = write_config(tmp_path / "good.toml", '[jobs]\nbackup = "*/1 * * * * *"\nrestore_test = ""\n'
                                                 '\n[backup]\ntarget = "/mnt/usb"\nkeep = 2\n')
    r = run_cli("config", "check", path)
    assert r.returncode == 0, r.stderr


def test_backup_survives_an_instance_replaced_between_snapshot_and_copy(tmp_path, monkeypatch):
    """The service keeps receiving during a backup: with duplicate_policy = replace a resent instance's
    old file is removed right after its replacement is committed.  A backup whose snapshot still names
    the old file must not fail because of it (nor hold a snapshot row without its object)."""
    a = Archive(StorageSettings(data_dir=str(tmp_path / "data"), duplicate_policy="replace"))
    a.open()
    try:
        data = a.store.root
        target = tmp_path / "usb"
        target.mkdir()
        store_series(a, tmp_path / "src", 4, patient_id="RACE1")
        study, series = pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT)
        ds = ct_dataset(study, series, 1, rows=16, cols=16, patient_id="RACE2", seed=7)
        v1 = tmp_path / "v1.dcm"
        ds.save_as(v1, enforce_file_format=True)
        a.store_file(v1)
        ds.PixelData = bytes(len(ds.PixelData))
        v2 = tmp_path / "v2.dcm"
        ds.save_as(v2, enforce_file_format=True)

        real_snapshot = bk._snapshot

        def snapshot_then_replace(db_path, dest):
            real_snapshot(db_path, dest)
            a.store_file(v2)  # acknowledged replacement arrives while the backup copies

        monkeypatch.setattr(bk, "_snapshot", snapshot_then_replace)
        result = run_backup(data, target)  # must not raise "missing from the data dir"
        monkeypatch.setattr(bk, "_snapshot", real_snapshot)
        v = verify_backup(target, result.backup_id)
        assert v["ok"], v
        assert result.instances in (4, 5)
    finally:
        a.close()


# ------------------------------------------------------------------ review regressions (jobs, backup)


def test_runs_of_different_jobs_wait_for_each_other(archive, tmp_path):
    """Retention must not delete while the scrub reads (and repairs), nor a backup prune what the restore
    test reads: a second job waits for the first, it is not skipped."""
    config = Config(storage=archive.settings)
    store_series(archive, tmp_path / "src", 2)
    done = {}
    with open(archive.store.root / "jobs.lock", "a") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t = threading.Thread(target=lambda: done.setdefault("run", run_job("scrub", config, archive)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and history(archive, "scrub") == []  # waiting, not started, not skipped
    t.join(30)
    assert done["run"]["outcome"] == "ok" and done["run"]["figures"]["checked"] == 2


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_stored_file_is_left_out_of_the_backup_not_failing_it(archive, tmp_path):
    """A new file that no longer matches its ingest checksum, or has vanished, used to fail every backup
    until the rolling scrub reached it; now it is left out and flagged, and the rest is backed up."""
    from clinicbox.core.config import IntegritySettings

    target = tmp_path / "usb"
    target.mkdir()
    config = Config(storage=archive.settings, backup=BackupSettings(target=str(target), keep=5),
                    integrity=IntegritySettings(repair_from_backup=False))
    store_series(archive, tmp_path / "a", 4, patient_id="D1")
    assert run_job("backup", config, archive)["outcome"] == "ok"
    old = archive.index.conn.execute("SELECT path, sha256 FROM instances ORDER BY id LIMIT 1").fetchone()
    _damage(archive.store.abspath(old["path"]))  # backed up before: the scrub finds it (repair off here)
    assert run_job("scrub", config, archive)["figures"]["damaged"] == 1
    store_series(archive, tmp_path / "b", 3, patient_id="D2")
    new = archive.index.conn.execute("SELECT path, sha256 FROM instances ORDER BY id DESC LIMIT 3").fetchall()
    _damage(archive.store.abspath(new[0]["path"]))
    archive.store.abspath(new[1]["path"]).unlink()

    run = run_job("backup", config, archive)
    assert run["outcome"] == "problems", run
    f = run["figures"]
    assert f["damaged_at_source"] == 2 and f["instances"] == 4 and f["copied"] == 1, f
    assert {(x["path"], x["state"]) for x in f["left_out"]} == {(new[0]["path"], "damaged"),
                                                                 (new[1]["path"], "missing")}
    states = dict(archive.index.conn.execute("SELECT path, state FROM instances").fetchall())
    assert states[new[0]["path"]] == "damaged" and states[new[1]["path"]] == "missing"
    assert verify_backup(target)["ok"]
    # restore: the damaged old file comes back intact from the first backup (carried) and is ok there;
    # the two left out are marked as they were, not pointing at files that are not there
    r = restore(target, None, tmp_path / "restored")
    assert r["restored"] == 5  # 3 + 1 of batch a as they are, 1 carried, batch b's intact one
    restored = tmp_path / "restored"
    assert dataset_sha256(restored / old["path"]) == old["sha256"]
    conn = sqlite3.connect(restored / INDEX)
    try:
        rstates = dict(conn.execute("SELECT path, state FROM instances").fetchall())
    finally:
        conn.close()
    assert rstates[old["path"]] == "ok"
    assert rstates[new[0]["path"]] == "damaged" and rstates[new[1]["path"]] == "missing"
    assert not (restored / new[1]["path"]).exists()
    # with repair on, the scrub puts the old one back; the new ones have no intact copy anywhere
    repair = Config(storage=archive.settings, backup=config.backup)
    scrub = run_job("scrub", repair, archive)
    assert scrub["figures"]["repaired"] == 1 and scrub["outcome"] == "problems", scrub
    assert dataset_sha256(archive.store.abspath(old["path"])) == old["sha256"]


def test_a_target_that_lost_its_backup_folder_is_refused_as_not_mounted(archive, tmp_path, small_fs):
    """An unplugged USB disk leaves its empty mount point: backing up there would fill the system disk."""
    store_series(archive, tmp_path / "src", 2)
    mount_point = small_fs  # another file system, as a USB disk is
    run_backup(archive.store.root, mount_point)
    shutil.rmtree(mount_point / bk.ROOT)  # what an unmounted disk looks like from here
    with pytest.raises(BackupError, match="is the backup disk mounted") as exc:
        run_backup(archive.store.root, mount_point)
    assert "\n" not in str(exc.value)
    assert list(mount_point.iterdir()) == []
    (mount_point / bk.ROOT).mkdir()  # a new, empty disk: staff create the folder, as the message says
    assert run_backup(archive.store.root, mount_point).copied == 2


def test_a_target_on_the_data_disk_is_not_taken_for_the_disk_to_expect(archive, tmp_path):
    """A first backup made while the USB disk was not mounted went to the mount point on the system disk;
    once the disk is mounted there, backups must not be refused as "not mounted"."""
    store_series(archive, tmp_path / "src", 1)
    mount_point = tmp_path / "usb"
    mount_point.mkdir()
    run_backup(archive.store.root, mount_point)  # on the data's own disk: warned, not remembered
    shutil.rmtree(mount_point / bk.ROOT)  # the real disk mounted over it: no clinicbox-backup folder yet
    assert run_backup(archive.store.root, mount_point).copied == 1


def test_a_full_target_fails_clearly_and_leaves_no_partial_copies(archive, tmp_path, small_fs):
    for f in write_ct_series(tmp_path / "src", 6, rows=256, cols=256):  # 128 kB each
        archive.store_file(f)
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    index_size = (archive.store.root / INDEX).stat().st_size
    (small_fs / "ballast").write_bytes(b"\0" * (free - index_size - 256 * 1024))  # the snapshot and 1-2 files
    config = Config(storage=archive.settings, backup=BackupSettings(target=str(small_fs), keep=3))
    run = run_job("backup", config, archive)
    assert run["outcome"] == "failed" and run["error"].startswith("backup target is full"), run
    assert "backup.keep" in run["error"]
    assert list_backups(small_fs) == []
    assert not [p for p in (small_fs / bk.ROOT).rglob("*") if p.is_file()], "partial copies left on the target"
    (small_fs / "ballast").unlink()
    assert run_job("backup", config, archive)["outcome"] == "ok"


def test_verify_and_restore_name_an_unreadable_pool_file(archive, tmp_path):
    store_series(archive, tmp_path / "src", 3)
    target = tmp_path / "usb"
    target.mkdir()
    result = run_backup(archive.store.root, target)
    victim = sorted(pool_files(target))[0]
    (target / bk.ROOT / victim).write_bytes(b"")  # truncated to nothing: not even a DICOM preamble
    report = verify_backup(target)
    assert not report["ok"] and any("unreadable" in p for p in report["problems"]), report
    with pytest.raises(BackupError, match="1 object\\(s\\) could not be restored") as exc:
        restore(target, result.backup_id, tmp_path / "r")
    assert "marked missing" in str(exc.value)
    conn = sqlite3.connect(tmp_path / "r" / INDEX)
    try:
        states = sorted(r[0] for r in conn.execute("SELECT state FROM instances"))
    finally:
        conn.close()
    assert states == ["missing", "ok", "ok"]
    r = run_cli("backup", "verify", "--to", target, "--data-dir", archive.store.root)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # the CLI: exit 1 with the reason, and what it restored is a working archive that says what it lacks
    r = run_cli("restore", "latest", "--from", target, "--data-dir", tmp_path / "r2")
    assert r.returncode == 1 and "marked missing" in r.stderr and "Traceback" not in r.stderr, r.stderr
    status = json.loads(run_cli("status", "--json", "--data-dir", tmp_path / "r2", check=True).stdout)
    assert status["instances"] == 3 and status["instances_not_ok"] == {"missing": 1}


def test_an_ambiguous_backup_id_prefix_is_refused(archive, tmp_path):
    store_series(archive, tmp_path / "src", 1)
    target = tmp_path / "usb"
    target.mkdir()
    first = run_backup(archive.store.root, target)
    second = run_backup(archive.store.root, target)
    common = os.path.commonprefix([first.backup_id, second.backup_id])
    with pytest.raises(BackupError, match="give more of the ID"):
        bk.find_backup(target, common)
    assert bk.find_backup(target, second.backup_id).name == second.backup_id


def test_a_target_too_full_for_the_index_snapshot_says_so(archive, tmp_path, small_fs):
    store_series(archive, tmp_path / "src", 2)
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    (small_fs / "ballast").write_bytes(b"\0" * (free - 8 * 1024))
    with pytest.raises(BackupError, match="^backup target is full: cannot"):
        run_backup(archive.store.root, small_fs)
    assert not any((small_fs / bk.ROOT / "backups").iterdir())


def test_jobs_list_shows_schedules_and_last_runs(archive, tmp_path):
    target = tmp_path / "usb"
    target.mkdir()
    config = write_config(tmp_path / "box.toml", f'[storage]\ndata_dir = "{archive.store.root}"\n'
                                                 f'[backup]\ntarget = "{target}"\n[jobs]\nscrub = ""\n')
    store_series(archive, tmp_path / "src", 1)
    assert run_cli("backup", "run", "--config", config).returncode == 0
    out = run_cli("jobs", "list", "--config", config, check=True).stdout.splitlines()
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {"backup", "restore-test", "retention", "scrub"}
    assert "0 2 * * *" in rows["backup"] and " ok " in rows["backup"]
    assert "never" in rows["restore-test"] and "30 4 * * 0" in rows["restore-test"]
    assert rows["scrub"].split()[1] == "-"  # not scheduled
    no_target = run_cli("jobs", "list", "--data-dir", archive.store.root, check=True).stdout
    assert "(no target)" in no_target


def test_the_scheduler_never_overlaps_a_slow_job_and_records_dropped_fires(archive, tmp_path, monkeypatch):
    """A job slower than its schedule (every second, 2.2 s a run): runs follow each other, and the fires
    that came while one was going are recorded as skipped."""
    from clinicbox.core.config import JobsSettings
    from clinicbox.jobs import runner
    from clinicbox.jobs.scheduler import Scheduler

    spans, lock = [], threading.Lock()

    def slow(config, archive):
        start = time.monotonic()
        time.sleep(2.2)
        with lock:
            spans.append((start, time.monotonic()))
        return {}

    monkeypatch.setitem(runner.JOBS, "scrub", runner.Job("scrub", "slow", slow))
    config = Config(storage=archive.settings, jobs=JobsSettings(backup="", restore_test="", retention="",
                                                                scrub="*/1 * * * * *"))
    sched = Scheduler(config, archive)
    sched.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(spans) < 2 or not [
                r for r in history(archive, "scrub") if r["outcome"] == "skipped"]):
            time.sleep(0.2)
    finally:
        sched.stop()
    runs = history(archive, "scrub")
    assert len(spans) >= 2, runs
    for (_s1, e1), (s2, _e2) in itertools.pairwise(sorted(spans)):
        assert s2 >= e1, f"overlapping runs: {spans}"
    skipped = [r for r in runs if r["outcome"] == "skipped"]
    assert skipped and all(r["error"] == "the previous run is still going" for r in skipped), runs


def test_a_run_waiting_for_another_job_gives_up_when_the_service_stops(archive, tmp_path):
    from clinicbox.core.config import JobsSettings
    from clinicbox.jobs.scheduler import Scheduler

    config = Config(storage=archive.settings, jobs=JobsSettings(backup="", restore_test="", retention="",
                                                                scrub="*/1 * * * * *"))
    with open(archive.store.root / "jobs.lock", "a") as other_job:  # e.g. the console's long backup
        fcntl.flock(other_job, fcntl.LOCK_EX)
        sched = Scheduler(config, archive)
        sched.start()
        time.sleep(1.5)
        stopping = threading.Thread(target=sched.stop, daemon=True)
        stopping.start()
        stopping.join(5)
        hung = stopping.is_alive()
    stopping.join(30)  # the lock is released now: a hung stop ends, so the test fails instead of hanging
    assert not hung, "serve would hang on SIGTERM while another process's job runs"
    runs = history(archive, "scrub")
    assert runs and all(r["outcome"] == "skipped" for r in runs), runs
    assert "the service stopped while another job ran" in {r["error"] for r in runs}


def test_an_instance_deleted_and_sent_again_with_other_content_during_a_backup_is_no_problem(archive, tmp_path,
                                                                                          monkeypatch):
    """Deleted after the snapshot (retention, reconciliation) and received again under the same file name
    with other content: the copy no longer matches the snapshot's checksum, but the file is not damaged;
    the backup takes a new snapshot instead of reporting it."""
    target = tmp_path / "usb"
    target.mkdir()
    study, series = pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT)
    ds = ct_dataset(study, series, 1, rows=16, cols=16, patient_id="AGAIN1", seed=3)
    v1, v2 = tmp_path / "v1.dcm", tmp_path / "v2.dcm"
    ds.save_as(v1, enforce_file_format=True)
    archive.store_file(v1)
    ds.StudyDescription = "sent again, other content"
    ds.save_as(v2, enforce_file_format=True)
    path = archive.index.instance(ds.SOPInstanceUID)["path"]
    real_snapshot, calls = bk._snapshot, []

    def snapshot_then_delete_and_resend(db_path, dest):
        real_snapshot(db_path, dest)
        if not calls:
            calls.append(1)
            archive.delete_study(study)
            archive.store_file(v2)
            assert archive.index.instance(ds.SOPInstanceUID)["path"] == path  # same name, new bytes

    monkeypatch.setattr(bk, "_snapshot", snapshot_then_delete_and_resend)
    config = Config(storage=archive.settings, backup=BackupSettings(target=str(target)))
    run = run_job("backup", config, archive)
    assert run["outcome"] == "ok", run
    assert archive.index.instance(ds.SOPInstanceUID)["state"] == "ok"
    assert verify_backup(target)["ok"]


def test_a_failed_backup_stays_visible_behind_a_skipped_run(archive, tmp_path):
    from clinicbox.jobs.runner import overview

    no_target = Config(storage=archive.settings)
    assert run_job("backup", no_target, archive)["outcome"] == "failed"
    with open(archive.store.root / "job-backup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_job("backup", no_target, archive)["outcome"] == "skipped"
    status = overview(no_target, archive)
    assert status["backup_failed"] and "no backup target" in status["backup_failed"]["error"]

"""Bad input and faults: each answers a real DIMSE status or is survived, and nothing stored is lost."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode

from tests.support.peers import ClinicBox
from tests.support.synth import ORG_ROOT, ct_dataset, dataset_bytes, write_ct_series


def _associate(port: int, contexts, ae_title: str = "FAULTSCU", called: str = "CLINICBOX"):
    ae = AE(ae_title=ae_title)
    ae.requested_contexts = contexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def _send(port: int, ds: Dataset, context_class=CTImageStorage):
    assoc = _associate(port, [build_context(context_class, ExplicitVRLittleEndian)])
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return status


def _ct(n=1, **kw):
    ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), n,
                    rows=16, cols=16, **kw)
    return ds


def _count(box: ClinicBox) -> int:
    return sum(s["num_instances"] for s in json.loads(box.cli("studies", "--json").stdout))


def test_sop_instance_uid_mismatch_refused(server):
    ds = _ct()
    # the C-STORE request names one instance, the data set carries another
    status = _send_raw(server.port, ds, CTImageStorage, "1.2.3.4.5.6.7.8")
    assert status == 0xC000
    assert "differs from" in server.log() and "FAULTSCU" in server.log()
    assert _count(server) == 0


def test_sop_class_mismatch_refused_with_a900(server):
    ds = _ct()
    ds.SOPClassUID = MRImageStorage  # sent under the CT context: does not match
    status = _send_raw(server.port, ds, CTImageStorage, ds.SOPInstanceUID)
    assert status == 0xA900
    assert _count(server) == 0


def _send_raw(port: int, ds: Dataset, cls: str, uid: str, payload: bytes | None = None) -> int:
    """Send a C-STORE whose command says (cls, uid) and whose data set is exactly ``payload``.

    pynetdicom sends a file's bytes after its meta unchanged when STORE_SEND_CHUNKED_DATASET is on,
    so a file written by hand is the way to put malformed data on the wire.
    """
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import _config
    from pynetdicom.dsutils import encode

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cls
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(payload if payload is not None else encode(ds, False, True))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"raw-{os.getpid()}-{time.monotonic_ns()}.dcm"
    path.write_bytes(buf.getvalue())
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = _associate(port, [build_context(cls, ExplicitVRLittleEndian)])
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        path.unlink()
    return status.Status


def test_truncated_data_set_refused_and_service_stays_up(server, echoscu):
    ds = _ct()
    encoded = encode(ds, False, True)
    status = _send_raw(server.port, ds, CTImageStorage, ds.SOPInstanceUID, encoded[:-100])
    assert status == 0xC000
    assert "truncated" in server.log()
    assert subprocess.run([echoscu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port)]).returncode == 0
    assert _count(server) == 0
    assert not any((server.data_dir / "incoming").iterdir()), "nothing half-stored left behind"


def test_garbage_data_set_refused(server):
    ds = _ct()
    status = _send_raw(server.port, ds, CTImageStorage, ds.SOPInstanceUID, b"\x08\x00\x18\x00UI\xff\xffgarbage!")
    assert status == 0xC000
    assert _count(server) == 0


def test_uid_that_tries_to_escape_the_data_dir_refused(server, tmp_path):
    ds = _ct()
    evil = "../../../../tmp/evil"
    status = _send_raw(server.port, _with_uid(ds, evil), CTImageStorage, evil)
    assert status == 0xC000
    assert not Path("/tmp/evil").exists()
    assert "is not a valid UID" in server.log()


def _with_uid(ds: Dataset, uid: str) -> Dataset:
    ds.SOPInstanceUID = uid
    return ds


def test_missing_study_uid_refused(server):
    ds = _ct()
    del ds.StudyInstanceUID
    status = _send_raw(server.port, ds, CTImageStorage, ds.SOPInstanceUID)
    assert status == 0xC000
    assert "no StudyInstanceUID" in server.log()


def test_sender_dropping_connection_mid_object_leaves_nothing(server, tmp_path, storescu):
    # a 40 MB object, and the sender killed while it is on the wire
    big = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                     rows=4096, cols=5120)
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([storescu, "--max-pdu", "16384", "-aec", "CLINICBOX", "127.0.0.1", str(server.port),
                             str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any((server.data_dir / "incoming").iterdir()):
        time.sleep(0.005)
    assert any((server.data_dir / "incoming").iterdir()), "transfer never started"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any((server.data_dir / "incoming").iterdir()):
        time.sleep(0.05)
    assert not any((server.data_dir / "incoming").iterdir()), "partial object left in incoming/"
    assert _count(server) == 0
    # and the service still takes the next image
    assert _send(server.port, _ct()).Status == 0x0000


def test_unknown_calling_ae_rejected_when_not_allowed(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[server]\nallowed_calling_ae_titles = ["US_ROOM1"]\nrequire_called_ae_title = true\n')
    with ClinicBox(tmp_path / "data", config=config) as box:
        stranger = _associate(box.port, [build_context("1.2.840.10008.1.1")], ae_title="STRANGER")
        assert stranger.is_rejected
        assert "calling AE title not recognized" in box.log() and "STRANGER" in box.log()
        wrong_called = _associate(box.port, [build_context("1.2.840.10008.1.1")], ae_title="US_ROOM1",
                                  called="NOTCLINICBOX")
        # the server sends A-ASSOCIATE-RJ and closes; pynetdicom's requestor sometimes sees the close
        # before the RJ (then it reports an abort): what counts is that it was refused, and why
        assert not wrong_called.is_established
        assert wrong_called.is_rejected or wrong_called.is_aborted
        assert "association rejected (called AE title not recognized): US_ROOM1" in box.log()
        assert "called NOTCLINICBOX" in box.log()
        friend = _associate(box.port, [build_context("1.2.840.10008.1.1")], ae_title="US_ROOM1")
        assert friend.is_established
        friend.release()


def test_new_callers_recorded_as_seen_devices(server, echoscu):
    subprocess.run([echoscu, "-aet", "US_ROOM2", "-aec", "CLINICBOX", "127.0.0.1", str(server.port)], check=True)
    time.sleep(0.3)
    import sqlite3
    conn = sqlite3.connect(server.data_dir / "index.sqlite3")
    rows = conn.execute("SELECT ae_title, host FROM devices").fetchall()
    conn.close()
    assert ("US_ROOM2", "127.0.0.1") in rows


def test_too_many_associations_rejected_transient(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_associations = 2\n")
    with ClinicBox(tmp_path / "data", config=config) as box:
        held = [_associate(box.port, [build_context("1.2.840.10008.1.1")]) for _ in range(2)]
        assert all(a.is_established for a in held)
        third = _associate(box.port, [build_context("1.2.840.10008.1.1")])
        assert third.is_rejected
        for a in held:
            a.release()
        assert "local limit exceeded" in box.log()


def test_silent_connections_do_not_lock_out_modalities(tmp_path, echoscu):
    """Connections that never associate are dropped after acse_timeout and do not use up slots."""
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_associations = 3\nacse_timeout = 1\n")
    with ClinicBox(tmp_path / "data", config=config) as box:
        silent = [socket.create_connection(("127.0.0.1", box.port)) for _ in range(5)]
        time.sleep(2.5)
        r = subprocess.run([echoscu, "-aec", "CLINICBOX", "127.0.0.1", str(box.port)], capture_output=True)
        for s in silent:
            s.close()
        assert r.returncode == 0


def test_disk_full_answers_a700_then_recovers(small_fs, tmp_path, storescu):
    config = tmp_path / "no-guard.toml"  # the real ENOSPC path: the disk guard's thresholds off
    config.write_text("[storage]\nmin_free_warning_mb = 0\nmin_free_critical_mb = 0\n")
    box = ClinicBox(small_fs / "data", config=config)
    box.log_path = tmp_path / "serve.log"
    box.start()
    try:
        # leave about 3 MB free, then send 20 x 0.5 MB
        ballast = small_fs / "ballast"
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        ballast.write_bytes(b"\0" * (free - 3 * 1024 * 1024))
        files = write_ct_series(tmp_path / "s", 20)
        r = subprocess.run([storescu, "-v", "-nh", "-aec", "CLINICBOX", "127.0.0.1", str(box.port),
                            *map(str, files)], capture_output=True, text=True)
        statuses = re.findall(r"Received Store Response \(([^)]*)\)", r.stderr + r.stdout)
        assert len(statuses) == 20, r.stderr[-2000:]
        ok = statuses.count("Success")
        assert 0 < ok < 20, statuses
        refused = [s for s in statuses if s != "Success"]
        assert all(s == "Refused: OutOfResources" for s in refused), refused  # DCMTK's name for 0xA7xx
        assert "out of disk space" in box.log()
        assert _count(box) == ok
        assert not any((small_fs / "data" / "incoming").iterdir()), "half-written file left behind"
        # space comes back: the same service accepts the rest, and nothing stored before was harmed
        ballast.unlink()
        r2 = subprocess.run([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(box.port), *map(str, files)],
                            capture_output=True, text=True)
        assert r2.returncode == 0, r2.stderr
        assert _count(box) == 20
    finally:
        box.stop()


@pytest.mark.slow
def test_kill9_during_burst_loses_no_acknowledged_instance(tmp_path, storescu):
    files = write_ct_series(tmp_path / "s", 1200, rows=64, cols=64)
    box = ClinicBox(tmp_path / "data").start()
    sender_log = tmp_path / "storescu.log"
    with open(sender_log, "w") as out:  # a file, not a pipe: a full pipe would stall the sender
        proc = subprocess.Popen([storescu, "-v", "-aec", "CLINICBOX", "127.0.0.1", str(box.port),
                                 *map(str, files)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TCP_NODELAY": "1"})
    # let a few hundred land, then kill -9 the server mid-burst
    deadline = time.monotonic() + 60
    objects = box.data_dir / "objects"
    while time.monotonic() < deadline and sum(1 for _ in objects.rglob("*.dcm")) < 300:
        time.sleep(0.02)
    box.kill9()
    proc.wait(timeout=60)
    acknowledged, current = [], None
    for line in sender_log.read_text().splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(Path(current))
            current = None
    assert 300 <= len(acknowledged) < 1200, f"{len(acknowledged)} acknowledged: the kill did not land mid-burst"
    with ClinicBox(tmp_path / "data", port=box.port) as again:
        log = again.log()
        assert "start-up repair" in log
        from tests.test_storage_scp import stored_path
        for src in acknowledged:
            uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
            stored = stored_path(again, uid)
            assert stored.exists(), f"acknowledged {src.name} missing after kill -9"
            assert dataset_bytes(stored) == dataset_bytes(src), f"{src.name} differs after kill -9"
        count = _count(again)
        assert len(acknowledged) <= count <= len(acknowledged) + 1


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stream_of_malformed_pdus_keeps_memory_flat_and_service_up(server, echoscu):
    import random
    rng = random.Random(7)

    def junk_connection():
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.settimeout(0.05)
            kind = rng.randrange(4)
            if kind == 0:    # random bytes
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))))
            elif kind == 1:  # an A-ASSOCIATE-RQ header claiming a huge length, then silence
                s.sendall(b"\x01\x00" + struct.pack(">I", 0x7FFFFFF0) + b"\x00" * 20)
            elif kind == 2:  # a P-DATA-TF before any association
                s.sendall(b"\x04\x00" + struct.pack(">I", 12) + b"\x00" * 12)
            else:            # an A-ASSOCIATE-RQ truncated mid-item
                s.sendall(b"\x01\x00\x00\x00\x00\x44\x00\x01\x00\x00" + b"CLINICBOX       " + b"JUNK")
            try:
                s.recv(64)  # an A-ABORT/A-ASSOCIATE-RJ or nothing: either way we hang up
            except OSError:
                pass

    for _ in range(50):
        junk_connection()
    time.sleep(0.5)
    before = _rss_kb(server.proc.pid)
    for _ in range(300):
        junk_connection()
    time.sleep(1.0)
    after = _rss_kb(server.proc.pid)
    assert after - before < 20_000, f"RSS grew from {before} kB to {after} kB"
    assert subprocess.run([echoscu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port)]).returncode == 0


def _guarded_box(tmp_path, *, warning_over: int, critical_over: int | None) -> tuple[ClinicBox, Path]:
    """A started ClinicBox whose disk guard thresholds sit this many MB above the disk's free space
    (critical_over None: critical at 1 MB, i.e. not reached)."""
    free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // (1024 * 1024)
    critical = 1 if critical_over is None else free_mb + critical_over
    config = tmp_path / "guard.toml"
    config.write_text(f"[storage]\nmin_free_warning_mb = {free_mb + warning_over}\nmin_free_critical_mb = {critical}\n")
    box = ClinicBox(tmp_path / "data", config=config)
    box.start()
    return box, config


def test_disk_guard_refuses_stores_below_the_critical_threshold(tmp_path, storescu):
    """Below storage.min_free_critical_mb every store is refused with 0xA700 and no file is left behind
    (the object is received into incoming/, then refused and removed, never placed or indexed)."""
    box, config = _guarded_box(tmp_path, warning_over=20000, critical_over=10000)
    try:
        files = write_ct_series(tmp_path / "s", 3, rows=16, cols=16)
        r = subprocess.run([storescu, "-v", "-nh", "-aec", "CLINICBOX", "127.0.0.1", str(box.port),
                            *map(str, files)], capture_output=True, text=True)
        statuses = re.findall(r"Received Store Response \(([^)]*)\)", r.stderr + r.stdout)
        assert statuses == ["Refused: OutOfResources"] * 3, r.stderr[-2000:]
        assert "stores refused below" in box.log() and "min_free_critical_mb" in box.log()
        assert _count(box) == 0
        assert not any((tmp_path / "data" / "incoming").iterdir())
        status = json.loads(box.cli("status", "--json", "--config", str(config)).stdout)
        assert status["disk"]["state"] == "critical"
    finally:
        box.stop()


def test_disk_guard_warning_still_stores_and_says_so(tmp_path, storescu):
    box, config = _guarded_box(tmp_path, warning_over=20000, critical_over=None)
    try:
        files = write_ct_series(tmp_path / "s", 2, rows=16, cols=16)
        r = subprocess.run([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(box.port), *map(str, files)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert _count(box) == 2
        assert "(warning; warning below" in box.log()
        status = json.loads(box.cli("status", "--json", "--config", str(config)).stdout)
        assert status["disk"]["state"] == "warning"
    finally:
        box.stop()

"""Storage SCP over real sockets with DCMTK as the independent sender."""

from __future__ import annotations

import json
import pathlib
import subprocess
import threading

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, build_context

from clinicbox.archive.files import uid_key
from clinicbox.archive.parse import InvalidObject, parse_file
from tests.support.peers import ClinicBox, storescp
from tests.support.synth import dataset_bytes, write_ct_series

TEST_FILES = pathlib.Path(pydicom.data.__file__).parent / "test_files"

# storescu option that proposes a file's transfer syntax (so DCMTK sends it as it is)
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storage_instances():
    """pydicom's bundled files that are valid, complete storage instances (by our own parser)."""
    out = []
    candidates = [*TEST_FILES.rglob("*"), *(TEST_FILES.parent / "charset_files").glob("*.dcm")]
    for path in sorted(p for p in candidates if p.is_file()):
        try:
            parsed = parse_file(path)
        except (InvalidObject, OSError, ValueError):
            continue
        if parsed.get("SOPInstanceUID") and parsed.get("StudyInstanceUID") and parsed.get("SeriesInstanceUID") \
                and parsed.transfer_syntax in STORESCU_TS_FLAG and not parsed.encoding_mismatch \
                and parsed.get("SOPClassUID") != "1.2.840.10008.1.3.10":
            out.append((path, parsed))
    return out


def stored_path(box: ClinicBox, uid: str) -> pathlib.Path:
    """Where the index says the object is (a replacement gets a versioned name beside the first)."""
    import sqlite3
    conn = sqlite3.connect(box.data_dir / "index.sqlite3")
    try:
        row = conn.execute("SELECT path FROM instances WHERE sop_instance_uid=?", (uid,)).fetchone()
    finally:
        conn.close()
    if row is None:
        key = uid_key(uid)
        return box.data_dir / "objects" / key[:2] / f"{key}.dcm"
    return box.data_dir / row[0]


def test_echo(server, echoscu):
    r = subprocess.run([echoscu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def storescp_bitpreserving(tmp_path):
    """DCMTK storescp writing exactly the bytes it receives: the independent record of what was sent."""
    out = tmp_path / "storescp"
    with storescp(out, "REFERENCE") as port:
        yield port, out


def test_every_bundled_instance_round_trips_byte_identical(tmp_path, storescu, storescp_bitpreserving):
    ref_port, ref_dir = storescp_bitpreserving
    files = storage_instances()
    assert len(files) > 60, "expected most of pydicom's bundled files to be storage instances"
    config = tmp_path / "replace.toml"
    # several bundled files share a SOP Instance UID (one image in many syntaxes): check each as it lands
    # pydicom's samples name one patient ID with many names: received as a curated archive sends them
    config.write_text('[storage]\nduplicate_policy = "replace"\n[intake]\nunknown = "accept"\n')
    seen_syntaxes, unsendable = set(), []
    with ClinicBox(tmp_path / "data", config=config) as box:
        for path, parsed in files:
            flag = STORESCU_TS_FLAG[parsed.transfer_syntax]
            send = [storescu, "-R", flag, "-aec", "REFERENCE", "127.0.0.1", str(ref_port), str(path)]
            if subprocess.run(send, capture_output=True).returncode != 0:
                unsendable.append(path.name)  # DCMTK itself will not send this file as it is
                continue
            send[4], send[6] = "CLINICBOX", str(box.port)
            r = subprocess.run(send, capture_output=True, text=True)
            assert r.returncode == 0, f"{path.name}: {r.stderr}\n{box.log()[-2000:]}"
            (sent,) = list(ref_dir.iterdir())
            stored = stored_path(box, parsed.get("SOPInstanceUID"))
            assert stored.exists(), f"{path.name} not stored: {r.stderr}\n{box.log()[-2000:]}"
            assert parse_file(stored).transfer_syntax == parsed.transfer_syntax, path.name
            assert dataset_bytes(stored) == dataset_bytes(sent), f"{path.name}: stored bytes differ from sent"
            sent.unlink()
            seen_syntaxes.add(parsed.transfer_syntax)
    assert len(unsendable) < len(files) // 10, unsendable
    # native, deflate and the compressed families all went through
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5"} <= seen_syntaxes


def test_parallel_associations_all_stored(server, storescu, tmp_path):
    groups = [write_ct_series(tmp_path / f"s{i}", 25, rows=64, cols=64, patient_id=f"PAR{i}") for i in range(4)]
    procs = [subprocess.Popen([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port), *map(str, g)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for g in groups]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    studies = json.loads(server.cli("studies", "--json").stdout)
    assert sorted(s["patient_id"] for s in studies) == ["PAR0", "PAR1", "PAR2", "PAR3"]
    assert all(s["num_instances"] == 25 and s["num_series"] == 1 for s in studies)
    assert server.log().count("association released") >= 4


def test_identical_resend_is_success_and_adds_nothing(server, storescu, tmp_path):
    files = write_ct_series(tmp_path / "s", 3, rows=32, cols=32)
    for _ in range(2):
        r = subprocess.run([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port), *map(str, files)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    studies = json.loads(server.cli("studies", "--json").stdout)
    assert len(studies) == 1 and studies[0]["num_instances"] == 3
    assert "3 duplicate" in server.log()


def _scu(port: int, contexts, ae_title="PYNETSCU"):
    ae = AE(ae_title=ae_title)
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINICBOX")
    return ae, assoc


def test_private_sop_class_accepted_by_default(server, tmp_path):
    private_class = "1.2.826.0.1.3680043.10.1234.99.1"  # unknown to pydicom: a vendor's private class
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = private_class
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.99.2"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1234.99.3"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1234.99.4"
    ds.PatientID = "PRIV1"
    ds.Modality = "OT"
    ae, assoc = _scu(server.port, [build_context(private_class, "1.2.840.10008.1.2.1")])
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    assert stored_path(server, ds.SOPInstanceUID).exists()


def test_private_sop_class_refused_when_setting_off(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\naccept_unknown_sop_classes = false\n")
    with ClinicBox(tmp_path / "data", config=config) as box:
        ae, assoc = _scu(box.port, [build_context("1.2.826.0.1.3680043.10.1234.99.1", "1.2.840.10008.1.2.1"),
                                    build_context("1.2.840.10008.1.1")])
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
        assoc.release()


def test_many_transfer_syntaxes_offered_first_one_chosen(server):
    # the sender's preferred syntax is taken as is: nothing is transcoded
    ae, assoc = _scu(server.port, [build_context("1.2.840.10008.5.1.4.1.1.2",
                                                 ["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1"])])
    assert assoc.accepted_contexts[0].transfer_syntax[0] == "1.2.840.10008.1.2.4.201"  # HTJ2K lossless
    assoc.release()


def test_sigterm_finishes_and_exits_zero(tmp_path, storescu):
    files = write_ct_series(tmp_path / "s", 40, rows=256, cols=256)
    box = ClinicBox(tmp_path / "data").start()
    sender = subprocess.Popen([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(box.port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threading.Event().wait(0.3)
    assert box.stop() == 0
    _out, err = sender.communicate(timeout=60)
    # the association in flight was allowed to finish: every store succeeded and is there
    assert sender.returncode == 0, err
    with ClinicBox(tmp_path / "data") as again:
        studies = json.loads(again.cli("studies", "--json").stdout)
    assert studies[0]["num_instances"] == 40
    assert "stop requested: finishing stores in flight" in box.log()


def test_accepted_sockets_get_tcp_nodelay_and_a_large_pdu(tmp_path):
    import socket as _socket

    from clinicbox.app import make_appliance
    from clinicbox.core.config import Config

    appliance = make_appliance(Config().with_overrides(data_dir=str(tmp_path / "d"), port=0))
    appliance.start()
    try:
        ae, assoc = _scu(appliance.dicom.port, [build_context("1.2.840.10008.1.1")])
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 4194304  # what ClinicBox told the sender
        import time as _time
        deadline = _time.monotonic() + 5  # the acceptor's thread may mark itself established a moment later
        while _time.monotonic() < deadline and not any(
                a.is_established for a in appliance.dicom._server.active_associations):
            _time.sleep(0.01)
        (server_side,) = [a for a in appliance.dicom._server.active_associations if a.is_established]
        sock = server_side.dul.socket.socket
        assert sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY) != 0
        assoc.release()
        import sqlite3
        mode = sqlite3.connect(tmp_path / "d" / "index.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        appliance.stop()


def test_no_patient_names_or_ids_in_the_log_at_info(server, storescu, tmp_path):
    files = write_ct_series(tmp_path / "s", 2, rows=16, cols=16, patient_id="PIDSECRET9",
                            patient_name="Zyxwvut^Secretname")
    subprocess.run([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port), *map(str, files)], check=True)
    server.cli("studies")
    log = server.log()
    assert "2 stored" in log
    assert "Zyxwvut" not in log and "Secretname" not in log and "PIDSECRET9" not in log

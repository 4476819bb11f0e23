"""C-MOVE SCP with DCMTK movescu, into a DCMTK storescp destination known to the device table."""

from __future__ import annotations

import subprocess

import pydicom
import pytest

from tests.support.peers import ClinicBox, dcmtk, storescp
from tests.support.synth import dataset_bytes, write_ct_series


@pytest.fixture
def destination(tmp_path):
    out = tmp_path / "dest"
    with storescp(out, "VIEWER") as port:
        yield port, out


def movescu(box, dest_aet, *keys):
    return subprocess.run([dcmtk("movescu"), "-S", "-v", "-aec", "CLINICBOX", "-aem", dest_aet, "127.0.0.1",
                           str(box.port), *[a for k in keys for a in ("-k", k)]], capture_output=True, text=True)


def test_move_study_to_known_destination(tmp_path, destination):
    port, out = destination
    with ClinicBox(tmp_path / "data") as box:
        box.cli("devices", "add", "MOVER", "--ae", "MOVESCU", "--host", "127.0.0.1", "--port", "11113")
        box.cli("devices", "add", "VIEWER-1", "--ae", "VIEWER", "--host", "127.0.0.1", "--port", str(port))
        files = write_ct_series(tmp_path / "ct", 6, rows=16, cols=16, patient_id="MOV1")
        assert "rejected 0" in box.cli("import", str(tmp_path / "ct")).stdout
        study = pydicom.dcmread(files[0]).StudyInstanceUID
        r = movescu(box, "VIEWER", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        assert r.returncode == 0, r.stderr
        received = sorted(out.iterdir())
        assert len(received) == 6, r.stderr
        sent = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in files}
        for f in received:
            assert dataset_bytes(f) == sent[pydicom.dcmread(f).SOPInstanceUID]
        assert "Received Final Move Response (Success)" in r.stderr, r.stderr
        assert "to VIEWER: 6 instance(s)" in box.log()


def test_move_to_unknown_destination_is_a801(tmp_path):
    with ClinicBox(tmp_path / "data") as box:
        box.cli("devices", "add", "MOVER", "--ae", "MOVESCU", "--host", "127.0.0.1", "--port", "11113")
        r = movescu(box, "NOWHERE", "QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.3")
        assert "MoveDestinationUnknown" in r.stderr or "A801" in r.stderr, r.stderr
        assert "unknown destination 'NOWHERE'" in box.log()


def test_orthanc_retrieves_from_clinicbox_and_clinicbox_moves_into_orthanc(tmp_path):
    """Orthanc from Debian as the real peer archive, both directions."""
    from tests.support.orthanc import Orthanc, wait_until
    with ClinicBox(tmp_path / "data") as box:
        with Orthanc(tmp_path / "orthanc", modalities={"clinicbox": ["CLINICBOX", "127.0.0.1", box.port]}) as orthanc:
            box.cli("devices", "add", "ORTHANC-PEER", "--ae", "ORTHANC", "--host", "127.0.0.1",
                    "--port", str(orthanc.dicom_port), "--role", "archive")
            box.cli("devices", "add", "MOVER", "--ae", "MOVESCU", "--host", "127.0.0.1", "--port", "11113")
            first = write_ct_series(tmp_path / "a", 4, rows=16, cols=16, patient_id="ORT1")
            second = write_ct_series(tmp_path / "b", 3, rows=16, cols=16, patient_id="ORT2")
            assert "rejected 0" in box.cli("import", str(tmp_path / "a"), str(tmp_path / "b")).stdout

            # Orthanc queries ClinicBox and retrieves the first study into itself (C-FIND + C-MOVE)
            study1 = pydicom.dcmread(first[0]).StudyInstanceUID
            q = orthanc.rest("POST", "/modalities/clinicbox/query",
                             {"Level": "Study", "Query": {"StudyInstanceUID": study1}})
            orthanc.rest("POST", f"/queries/{q['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
            assert wait_until(lambda: orthanc.rest("GET", "/statistics")["CountInstances"] == 4)

            # ClinicBox moves the second study into Orthanc on a third party's request (movescu)
            study2 = pydicom.dcmread(second[0]).StudyInstanceUID
            r = movescu(box, "ORTHANC", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study2}")
            assert r.returncode == 0 and "Received Final Move Response (Success)" in r.stderr, r.stderr
            assert wait_until(lambda: orthanc.rest("GET", "/statistics")["CountInstances"] == 7)
            ids = orthanc.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"PatientID": "ORT2"}})
            got = {orthanc.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in ids}
            assert got == {pydicom.dcmread(p).SOPInstanceUID for p in second}


def test_move_series_level_counts_and_failed_instance(tmp_path, destination):
    """Series level; an indexed instance whose file is gone is a failed sub-operation, the rest arrive."""
    port, out = destination
    with ClinicBox(tmp_path / "data") as box:
        box.cli("devices", "add", "MOVER", "--ae", "MOVESCU", "--host", "127.0.0.1", "--port", "11113")
        box.cli("devices", "add", "VIEWER-1", "--ae", "VIEWER", "--host", "127.0.0.1", "--port", str(port))
        files = write_ct_series(tmp_path / "ct", 4, rows=16, cols=16, patient_id="MOV2")
        assert "rejected 0" in box.cli("import", str(tmp_path / "ct")).stdout
        first = pydicom.dcmread(files[0])
        for stored in (box.data_dir / "objects").rglob("*.dcm"):
            if pydicom.dcmread(stored, stop_before_pixels=True).SOPInstanceUID == first.SOPInstanceUID:
                stored.unlink()  # lost behind the archive's back
        r = movescu(box, "VIEWER", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={first.StudyInstanceUID}",
                    f"SeriesInstanceUID={first.SeriesInstanceUID}")
        assert len(list(out.iterdir())) == 3, r.stderr
        assert "Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in r.stderr, r.stderr
        assert "has no readable file" in box.log()


def test_move_decompresses_for_a_destination_taking_only_uncompressed(tmp_path):
    """A JPEG object goes to a storescp that accepts only uncompressed syntaxes: decoded, same UID."""
    from tests.support.peers import free_port, wait_for_port

    src = pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    original = pydicom.dcmread(src)
    out = tmp_path / "plain"
    out.mkdir()
    port = free_port()
    dest = subprocess.Popen([dcmtk("storescp"), "-aet", "PLAIN", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=dest)
        with ClinicBox(tmp_path / "data") as box:
            box.cli("devices", "add", "MOVER", "--ae", "MOVESCU", "--host", "127.0.0.1", "--port", "11113")
            box.cli("devices", "add", "PLAIN", "--ae", "PLAIN", "--host", "127.0.0.1", "--port", str(port))
            assert "imported 1" in box.cli("import", src).stdout
            r = movescu(box, "PLAIN", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={original.StudyInstanceUID}")
            assert "Received Final Move Response (Success)" in r.stderr, r.stderr
    finally:
        dest.terminate()
        dest.wait(10)
    [got] = list(out.iterdir())
    moved = pydicom.dcmread(got)
    assert moved.SOPInstanceUID == original.SOPInstanceUID
    assert not moved.file_meta.TransferSyntaxUID.is_compressed
    assert moved.pixel_array.shape == original.pixel_array.shape


def test_unreachable_destination_and_cancel(tmp_path):
    """A known destination that does not answer: 0xA801. A C-CANCEL stops a move between images."""
    import threading
    import time

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

    from tests.support.peers import free_port

    received = []

    def slow_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        time.sleep(0.05)
        return 0x0000

    dest_ae = AE(ae_title="SLOW")
    dest_ae.add_supported_context(CTImageStorage)
    slow_port = free_port()
    server = dest_ae.start_server(("127.0.0.1", slow_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        with ClinicBox(tmp_path / "data") as box:
            box.cli("devices", "add", "MOVER", "--ae", "MOVESCU", "--host", "127.0.0.1", "--port", "11113")
            box.cli("devices", "add", "GONE", "--ae", "GONE", "--host", "127.0.0.1", "--port", str(free_port()))
            box.cli("devices", "add", "SLOW", "--ae", "SLOW", "--host", "127.0.0.1", "--port", str(slow_port))
            files = write_ct_series(tmp_path / "ct", 40, rows=8, cols=8, patient_id="MOV3")
            assert "imported 40" in box.cli("import", str(tmp_path / "ct")).stdout
            study = pydicom.dcmread(files[0]).StudyInstanceUID
            ae = AE(ae_title="MOVESCU")
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate("127.0.0.1", box.port, ae_title="CLINICBOX")
            assert assoc.is_established
            ident = pydicom.Dataset()
            ident.QueryRetrieveLevel, ident.StudyInstanceUID = "STUDY", study
            [(status, _)] = list(assoc.send_c_move(ident, "GONE", StudyRootQueryRetrieveInformationModelMove))
            assert status.Status == 0xA801
            statuses = []
            cx = assoc._get_valid_context(StudyRootQueryRetrieveInformationModelMove, "", "scu")
            for status, _ in assoc.send_c_move(ident, "SLOW", StudyRootQueryRetrieveInformationModelMove, msg_id=7):
                statuses.append(status)
                if len(statuses) == 2:
                    threading.Thread(target=assoc.send_c_cancel, args=(7, cx.context_id)).start()
            assoc.release()
            final = statuses[-1]
            assert final.Status == 0xFE00, [hex(s.Status) for s in statuses]
            assert 0 < final.NumberOfRemainingSuboperations < 40
            assert final.NumberOfCompletedSuboperations + final.NumberOfRemainingSuboperations == 40
            assert len(received) < 40
    finally:
        server.shutdown()

"""Storage Commitment Push Model SCP with a pynetdicom SCU (DCMTK has no commitment SCU)."""

from __future__ import annotations

import threading

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from tests.support.peers import ClinicBox, free_port
from tests.support.synth import ORG_ROOT, write_ct_series

INSTANCE = "1.2.840.10008.1.20.1.1"


def _request(files, missing_uid):
    ds = Dataset()
    ds.TransactionUID = generate_uid(prefix=ORG_ROOT)
    refs = []
    for p in files:
        src = pydicom.dcmread(p, stop_before_pixels=True)
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
        refs.append(item)
    never = Dataset()
    never.ReferencedSOPClassUID, never.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", missing_uid
    refs.append(never)
    ds.ReferencedSOPSequence = refs
    return ds


def _check(report: Dataset, files, missing_uid):
    committed = {i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence}
    assert committed == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    (failed,) = report.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == missing_uid and failed.FailureReason == 0x0112


def _report_collector():
    """(reports, event set on the first one, EVT_N_EVENT_REPORT handler) for a modality stand-in."""
    reports: list = []
    got = threading.Event()

    def on_report(event):
        reports.append((event.event_type, event.event_information))
        got.set()
        return 0x0000, None

    return reports, got, on_report


def test_commitment_reported_on_the_same_association(tmp_path):
    reports, got, on_report = _report_collector()

    with ClinicBox(tmp_path / "data") as box:
        files = write_ct_series(tmp_path / "ct", 3, rows=8, cols=8)
        assert "rejected 0" in box.cli("import", str(tmp_path / "ct")).stdout
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", box.port, ae_title="CLINICBOX",
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        assert assoc.is_established
        missing = generate_uid(prefix=ORG_ROOT)
        status, _ = assoc.send_n_action(_request(files, missing), 1, StorageCommitmentPushModel, INSTANCE)
        assert status.Status == 0x0000
        assert got.wait(10), "no N-EVENT-REPORT"
        assoc.release()
        event_type, report = reports[0]
        assert event_type == 2  # failures exist
        _check(report, files, missing)


def test_commitment_reported_on_a_new_association_after_release(tmp_path):
    reports, got, on_report = _report_collector()

    port = free_port()
    modality = AE(ae_title="MODALITY")
    modality.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = modality.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        with ClinicBox(tmp_path / "data") as box:
            box.cli("devices", "add", "US-1", "--ae", "MODALITY", "--host", "127.0.0.1", "--port", str(port),
                    "--role", "modality")
            files = write_ct_series(tmp_path / "ct", 2, rows=8, cols=8)
            assert "rejected 0" in box.cli("import", str(tmp_path / "ct")).stdout
            scu = AE(ae_title="MODALITY")
            scu.add_requested_context(StorageCommitmentPushModel)
            assoc = scu.associate("127.0.0.1", box.port, ae_title="CLINICBOX")
            missing = generate_uid(prefix=ORG_ROOT)
            status, _ = assoc.send_n_action(_request(files, missing), 1, StorageCommitmentPushModel, INSTANCE)
            assoc.release()  # as many modalities do: hang up, wait for the report on a new association
            assert status.Status == 0x0000
            assert got.wait(15), "no N-EVENT-REPORT on a new association:\n" + box.log()[-1500:]
            _check(reports[0][1], files, missing)
    finally:
        server.shutdown()

"""The scheduled workflow end to end, with independent peers wherever one exists.

Front desk `worklist add` → the modality's worklist query (DCMTK findscu -W) → MPPS IN PROGRESS
(pynetdicom; DCMTK has no MPPS SCU) → images (DCMTK storescu) carrying the worklist's Study
Instance UID, accession number and patient → MPPS COMPLETED → the order is COMPLETED with its
images counted, its history says who did what when → a viewer finds the study by accession
(DCMTK findscu -S).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

from tests.support.mpps import in_progress
from tests.support.peers import ClinicBox, dcmtk
from tests.support.synth import ORG_ROOT, ct_dataset

pytestmark = pytest.mark.xdist_group("workflow")

MODALITY_AE, VIEWER_AE = "CT_ROOM1", "READING1"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    box = ClinicBox(tmp / "data").start()
    try:
        box.cli("devices", "add", "CT-ROOM-1", "--ae", MODALITY_AE, "--host", "127.0.0.1", "--port", "104",
                "--role", "modality")
        box.cli("devices", "add", "READING-1", "--ae", VIEWER_AE, "--host", "127.0.0.1", "--port", "104")
        box.tmp = tmp
        yield box
    finally:
        box.stop()


TODAY = datetime.now().strftime("%Y-%m-%d")  # orders and worklist queries agree on the day, even at midnight


def add_order(box: ClinicBox, patient_id: str, patient_name: str) -> dict:
    r = box.cli("worklist", "add", "--patient-id", patient_id, "--patient-name", patient_name,
                "--birth-date", "1975-06-30", "--sex", "M", "--modality", "CT", "--station-ae", "CT-ROOM-1",
                "--at", f"{TODAY} 08:00", "--procedure", "CT chest", "--by", "desk.anna", "--json")
    return json.loads(r.stdout)


def show(box: ClinicBox, accession: str) -> dict:
    return json.loads(box.cli("worklist", "show", accession, "--json").stdout)


def findscu(box: ClinicBox, model: str, aet: str, keys: list[str], out: Path) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    r = subprocess.run([dcmtk("findscu"), model, "-aet", aet, "-aec", "CLINICBOX", "-X", "-od", str(out),
                        "127.0.0.1", str(box.port), *[a for k in keys for a in ("-k", k)]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr + box.log()[-1500:]
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def modality_worklist(box: ClinicBox, out: Path) -> list[Dataset]:
    """What the CT's 'today's worklist' button asks: its own station, today, CT."""
    sps = "ScheduledProcedureStepSequence[0]."
    return findscu(box, "-W", MODALITY_AE, [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
        "RequestedProcedureID", "RequestedProcedureDescription", f"{sps}Modality=CT",
        f"{sps}ScheduledStationAETitle={MODALITY_AE}",
        f"{sps}ScheduledProcedureStepStartDate={TODAY.replace('-', '')}", f"{sps}ScheduledProcedureStepStartTime",
        f"{sps}ScheduledProcedureStepID", f"{sps}ScheduledProcedureStepDescription",
        f"{sps}ScheduledProcedureStepStatus"], out)


def send(box: ClinicBox, files: list[Path]) -> None:
    r = subprocess.run([dcmtk("storescu"), "-aet", MODALITY_AE, "-aec", "CLINICBOX", "127.0.0.1", str(box.port),
                        *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr + box.log()[-1500:]


def images(folder: Path, per_series: list[int], *, study_uid: str, accession: str, patient: Dataset) -> dict:
    """Synthetic CT images of one study, as the modality writes them from its worklist item."""
    folder.mkdir(parents=True, exist_ok=True)
    series = {}
    for s, count in enumerate(per_series, start=1):
        series_uid = generate_uid(prefix=ORG_ROOT)
        series[series_uid] = []
        for n in range(1, count + 1):
            ds = ct_dataset(study_uid, series_uid, n, rows=8, cols=8, patient_id=patient.PatientID,
                            patient_name=str(patient.PatientName))
            ds.AccessionNumber = accession
            ds.PatientBirthDate, ds.PatientSex = patient.PatientBirthDate, patient.PatientSex
            ds.SeriesNumber = s
            path = folder / f"s{s}-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            series[series_uid].append((path, ds.SOPInstanceUID))
    return series


def mpps_from_worklist(item: Dataset) -> Dataset:
    """N-CREATE as the CT fills it from the worklist item it picked."""
    return in_progress(item, station_ae=MODALITY_AE, modality="CT", description="CT chest", station_name="CT ROOM 1",
                       location="Room 1")


def mpps_completed(series: dict) -> Dataset:
    mod = Dataset()
    mod.PerformedProcedureStepStatus = "COMPLETED"
    now = datetime.now()
    mod.PerformedProcedureStepEndDate, mod.PerformedProcedureStepEndTime = f"{now:%Y%m%d}", f"{now:%H%M%S}"
    items = []
    for series_uid, instances in series.items():
        s = Dataset()
        s.PerformingPhysicianName = ""
        s.ProtocolName = "Chest"
        s.OperatorsName = ""
        s.SeriesInstanceUID = series_uid
        s.SeriesDescription = "Axial"
        s.RetrieveAETitle = ""
        refs = []
        for _path, sop_uid in instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, sop_uid
            refs.append(ref)
        s.ReferencedImageSequence = refs
        s.ReferencedNonImageCompositeSOPInstanceSequence = []
        items.append(s)
    mod.PerformedSeriesSequence = items
    return mod


def mpps(box: ClinicBox, op: str, ds: Dataset, uid: str) -> int:
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="CLINICBOX")
    assert assoc.is_established, box.log()[-1500:]
    try:
        status, _ = (assoc.send_n_create(ds, MPPS, uid) if op == "create" else assoc.send_n_set(ds, MPPS, uid))
    finally:
        assoc.release()
    return status.Status


def wait_for_images(box: ClinicBox, accession: str, count: int, timeout: float = 15.0) -> dict:
    """The order once its image count reaches ``count`` (counted asynchronously after each store)."""
    deadline = time.monotonic() + timeout
    while True:
        order = show(box, accession)
        if order["images"] >= count or time.monotonic() > deadline:
            return order
        time.sleep(0.1)


def test_scheduled_workflow_end_to_end(box):
    t0 = datetime.now(timezone.utc)
    added = add_order(box, "WF0001", "Flow^Walter")
    acc = added["accession_number"]

    # the modality's worklist query
    answers = modality_worklist(box, box.tmp / "mwl1")
    mine = [a for a in answers if a.PatientID == "WF0001"]
    assert len(mine) == 1, [a.PatientID for a in answers]
    item = mine[0]
    sps = item.ScheduledProcedureStepSequence[0]
    assert item.AccessionNumber == acc
    assert item.StudyInstanceUID == added["study_instance_uid"]
    assert item.RequestedProcedureID == added["requested_procedure_id"]
    assert [sps.ScheduledProcedureStepID] == added["step_ids"]
    assert (str(item.PatientName), item.PatientBirthDate, item.PatientSex) == ("Flow^Walter", "19750630", "M")
    assert (sps.Modality, sps.ScheduledStationAETitle, sps.ScheduledProcedureStepStatus) == \
        ("CT", MODALITY_AE, "SCHEDULED")

    # the exam starts
    uid = generate_uid(prefix=ORG_ROOT)
    assert mpps(box, "create", mpps_from_worklist(item), uid) == 0x0000
    started = show(box, acc)
    assert started["status"] == "IN PROGRESS" and started["steps"][0]["status"] == "IN PROGRESS"

    # images with the worklist's identifiers
    series = images(box.tmp / "ct1", [3, 2], study_uid=item.StudyInstanceUID, accession=item.AccessionNumber,
                    patient=item)
    send(box, [p for instances in series.values() for p, _uid in instances])

    # the exam ends
    assert mpps(box, "set", mpps_completed(series), uid) == 0x0000

    order = wait_for_images(box, acc, 5)
    assert order["images"] == 5
    assert order["status"] == "COMPLETED"
    assert [s["status"] for s in order["steps"]] == ["COMPLETED"]
    (p,) = order["performed"]
    assert (p["sop_instance_uid"], p["status"], p["series_count"], p["image_count"]) == (uid, "COMPLETED", 2, 5)
    assert order["first_image_at"] and order["last_image_at"]

    # who did what, and when
    history = order["history"]
    assert (history[0]["who"], history[0]["what"]) == ("desk.anna", "created")
    changes = [(h["who"], h["what"]) for h in history]
    assert ("MPPS CT_ROOM1", "SCHEDULED -> IN PROGRESS") in changes
    assert ("MPPS CT_ROOM1", "IN PROGRESS -> COMPLETED") in changes
    assert changes.index(("MPPS CT_ROOM1", "SCHEDULED -> IN PROGRESS")) < \
        changes.index(("MPPS CT_ROOM1", "IN PROGRESS -> COMPLETED"))
    times = [datetime.fromisoformat(h["at"]) for h in history]
    assert times == sorted(times)
    assert all(t0.replace(microsecond=0) <= t <= datetime.now(timezone.utc) for t in times), times

    # done: off the worklist
    assert [a for a in modality_worklist(box, box.tmp / "mwl2") if a.PatientID == "WF0001"] == []
    assert show(box, acc)["images"] == 5  # and no late count beyond what was sent

    # a reading station finds the study by its accession number
    found = findscu(box, "-S", VIEWER_AE, ["QueryRetrieveLevel=STUDY", f"AccessionNumber={acc}", "StudyInstanceUID",
                                           "PatientID", "NumberOfStudyRelatedInstances",
                                           "NumberOfStudyRelatedSeries"], box.tmp / "qr")
    assert len(found) == 1
    study = found[0]
    assert (study.StudyInstanceUID, study.PatientID, study.AccessionNumber) == (added["study_instance_uid"],
                                                                                "WF0001", acc)
    assert (int(study.NumberOfStudyRelatedSeries), int(study.NumberOfStudyRelatedInstances)) == (2, 5)


def test_images_counted_by_accession_when_the_study_uid_differs(box):
    """A modality that makes its own Study Instance UID but keeps the accession: still the order's images."""
    added = add_order(box, "WF0002", "Flow^Wanda")
    acc = added["accession_number"]
    patient = Dataset()
    patient.PatientID, patient.PatientName, patient.PatientBirthDate, patient.PatientSex = \
        "WF0002", "Flow^Wanda", "19750630", "M"
    # same patient, another study and accession: not this order's (sent first, so counted first if at all)
    other = images(box.tmp / "other", [1], study_uid=generate_uid(prefix=ORG_ROOT), accession="OTHERACC",
                   patient=patient)
    own_uid = generate_uid(prefix=ORG_ROOT)
    assert own_uid != added["study_instance_uid"]
    mine = images(box.tmp / "own-uid", [2], study_uid=own_uid, accession=acc, patient=patient)
    send(box, [p for s in (other, mine) for instances in s.values() for p, _uid in instances])
    order = wait_for_images(box, acc, 2)
    assert order["images"] == 2
    time.sleep(0.3)  # nothing else comes in late
    assert show(box, acc)["images"] == 2


def _send_twice_then_one_more(box: ClinicBox, patient_id: str, folder: Path) -> int:
    """Three images, then all three again (a retry) and one of them with a corrected header, then one new
    image; the order's image count once the new one is counted (and whatever was queued behind it)."""
    added = add_order(box, patient_id, "Flow^Wilma")
    acc = added["accession_number"]
    patient = Dataset()
    patient.PatientID, patient.PatientName, patient.PatientBirthDate, patient.PatientSex = \
        patient_id, "Flow^Wilma", "19750630", "M"
    series = images(folder / "first", [3], study_uid=added["study_instance_uid"], accession=acc, patient=patient)
    files = [p for instances in series.values() for p, _uid in instances]
    send(box, files)
    assert wait_for_images(box, acc, 3)["images"] == 3

    send(box, files)  # identical: a retry
    ds = pydicom.dcmread(files[0])
    ds.SeriesDescription = "Axial (corrected)"  # same SOP Instance UID, changed header
    ds.save_as(files[0], enforce_file_format=True)
    send(box, [files[0]])
    extra = images(folder / "extra", [1], study_uid=added["study_instance_uid"], accession=acc,
                   patient=patient)  # one genuinely new image, counted after the re-sends
    send(box, [p for instances in extra.values() for p, _uid in instances])
    wait_for_images(box, acc, 4)
    time.sleep(0.3)  # let any count queued behind it land
    return show(box, acc)["images"]


def test_images_sent_again_are_not_counted_twice(box):
    """A modality re-sends a study (retry, or a corrected header): the order still has as many images."""
    assert _send_twice_then_one_more(box, "WF0003", box.tmp / "again") == 4


def test_replaced_images_are_not_counted_twice(tmp_path):
    """With storage.duplicate_policy = replace, a corrected image replaces the stored one: still one image."""
    config = tmp_path / "replace.toml"
    config.write_text('[storage]\nduplicate_policy = "replace"\n')
    with ClinicBox(tmp_path / "data", config=config) as box:
        assert _send_twice_then_one_more(box, "WF0004", tmp_path) == 4, "a replaced instance was counted again"

"""MPPS N-CREATE/N-SET (PS3.4 F.7) with a pynetdicom SCU standing in for an ultrasound unit.

Each state change is checked twice: in the DIMSE response (status, Error Comment, Error ID) and in
what staff see (`clinicbox worklist show/performed --json`, the worklist itself).  Every refusal is
also checked to have changed nothing: the instance it named does not exist afterwards (N-SET on it
answers 0x0112) or is exactly as before, and the order and its history are as they were.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (ModalityPerformedProcedureStep, ModalityWorklistInformationFind,
                                  UltrasoundImageStorage, Verification)

from tests.support.peers import ClinicBox
from tests.support.synth import ORG_ROOT

pytestmark = pytest.mark.xdist_group("mpps")

MODALITY_AE = "US_ROOM1"
MPPS = ModalityPerformedProcedureStep
SUCCESS, PROCESSING_FAILURE, DUPLICATE, NO_SUCH_INSTANCE = 0x0000, 0x0110, 0x0111, 0x0112
INVALID_VALUE, MISSING_ATTRIBUTE, MISSING_VALUE = 0x0106, 0x0120, 0x0121
NO_LONGER_UPDATABLE = 0xA710


POOL = 24  # orders made up front by one CSV import: a CLI call per order would cost 0.3 s each


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpps")
    box = ClinicBox(tmp / "data").start()
    try:
        box.cli("devices", "add", "US-ROOM-1", "--ae", MODALITY_AE, "--host", "127.0.0.1", "--port", "104",
                "--role", "modality")
        at = datetime.now().strftime("%Y-%m-%d %H:%M")
        rows = ["patient_id,patient_name,birth_date,sex,procedure,modality,station_ae,at"]
        rows += [f"POOL{n:03d},Sono^Pool{n},1980-02-03,F,US abdomen,US,{MODALITY_AE},{at}" for n in range(POOL)]
        csv = tmp / "orders.csv"
        csv.write_text("\n".join(rows) + "\n")
        r = box.cli("worklist", "import", str(csv), "--by", "desk")
        assert f"added {POOL} order(s)" in r.stdout, r.stdout + r.stderr
        box.pool = [{"accession_number": o["accession_number"], "study_instance_uid": o["study_instance_uid"],
                     "requested_procedure_id": o["requested_procedure_id"],
                     "step_ids": [s["step_id"] for s in o["steps"]], "patient_id": o["patient_id"],
                     "patient_name": o["patient_name"]}
                    for o in json.loads(box.cli("worklist", "list", "--date", "all", "--json").stdout)]
        assert len(box.pool) == POOL and all(len(o["step_ids"]) == 1 for o in box.pool)
        yield box
    finally:
        box.stop()


def add_order(box: ClinicBox) -> dict:
    """A new scheduled order (one US step on our modality, now) for a patient of its own."""
    assert box.pool, "order pool used up: raise POOL"
    return box.pool.pop()


def show(box: ClinicBox, accession: str) -> dict:
    return json.loads(box.cli("worklist", "show", accession, "--json").stdout)


def performed(box: ClinicBox, *, unscheduled: bool = False) -> list[dict]:
    return json.loads(box.cli("worklist", "performed", *(["--unscheduled"] if unscheduled else []),
                              "--json").stdout)


def new_uid() -> str:
    return generate_uid(prefix=ORG_ROOT)


def _now() -> tuple[str, str]:
    now = datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def create_dataset(order: dict | None = None, *, study_uid: str | None = None, accession: str = "",
                   rp_id: str = "", sps_id: str = "", patient_id: str = "UNSCHED1",
                   patient_name: str = "Walkin^Pat") -> Dataset:
    """The N-CREATE attribute list an ultrasound unit sends when the sonographer starts the exam."""
    if order is not None:
        study_uid, accession = order["study_instance_uid"], order["accession_number"]
        rp_id, sps_id = order["requested_procedure_id"], order["step_ids"][0]
        patient_id, patient_name = order["patient_id"], order["patient_name"]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    item = Dataset()
    item.StudyInstanceUID = study_uid or new_uid()
    item.ReferencedStudySequence = []
    item.AccessionNumber = accession
    item.RequestedProcedureID = rp_id
    item.RequestedProcedureDescription = "US abdomen"
    item.ScheduledProcedureStepID = sps_id
    item.ScheduledProcedureStepDescription = "US abdomen"
    item.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19800203"
    ds.PatientSex = "F"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS" + new_uid()[-8:]
    ds.PerformedStationAETitle = MODALITY_AE
    ds.PerformedStationName = "US ROOM 1"
    ds.PerformedLocation = "Room 1"
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = _now()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "US abdomen"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = "US"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def series_item(n_images: int) -> Dataset:
    s = Dataset()
    s.PerformingPhysicianName = ""
    s.ProtocolName = "Abdomen"
    s.OperatorsName = "Sono^Grapher"
    s.SeriesInstanceUID = new_uid()
    s.SeriesDescription = "Abdomen"
    s.RetrieveAETitle = ""
    refs = []
    for _ in range(n_images):
        ref = Dataset()
        ref.ReferencedSOPClassUID = UltrasoundImageStorage
        ref.ReferencedSOPInstanceUID = new_uid()
        refs.append(ref)
    s.ReferencedImageSequence = refs
    s.ReferencedNonImageCompositeSOPInstanceSequence = []
    return s


def completed(*images_per_series: int) -> Dataset:
    mod = Dataset()
    mod.PerformedProcedureStepStatus = "COMPLETED"
    mod.PerformedProcedureStepEndDate, mod.PerformedProcedureStepEndTime = _now()
    mod.PerformedSeriesSequence = [series_item(n) for n in images_per_series]
    return mod


def discontinued(meaning: str = "Equipment failure") -> Dataset:
    mod = Dataset()
    mod.PerformedProcedureStepStatus = "DISCONTINUED"
    mod.PerformedProcedureStepEndDate, mod.PerformedProcedureStepEndTime = _now()
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator, reason.CodeMeaning = "110501", "DCM", meaning
    mod.PerformedProcedureStepDiscontinuationReasonCodeSequence = [reason]
    mod.PerformedSeriesSequence = []
    return mod


@contextlib.contextmanager
def association(box: ClinicBox, ae_title: str = MODALITY_AE, handlers=()):
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(MPPS)
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="CLINICBOX", evt_handlers=list(handlers))
    assert assoc.is_established, "association refused:\n" + box.log()[-2000:]
    try:
        yield assoc
    finally:
        assoc.release()


def n_create(box: ClinicBox, ds: Dataset, uid: str | None) -> tuple[Dataset, Dataset | None]:
    with association(box) as assoc:
        return assoc.send_n_create(ds, MPPS, uid)


def n_set(box: ClinicBox, uid: str, mod: Dataset) -> tuple[Dataset, Dataset | None]:
    with association(box) as assoc:
        return assoc.send_n_set(mod, MPPS, uid)


def worklist_items(box: ClinicBox, accession: str) -> list[Dataset]:
    query = Dataset()
    query.AccessionNumber = accession
    query.PatientID = ""
    query.StudyInstanceUID = ""
    sps = Dataset()
    sps.ScheduledProcedureStepID = ""
    sps.Modality = ""
    sps.ScheduledStationAETitle = ""
    sps.ScheduledProcedureStepStatus = ""
    query.ScheduledProcedureStepSequence = [sps]
    with association(box) as assoc:
        answers = list(assoc.send_c_find(query, ModalityWorklistInformationFind))
    assert answers and answers[-1][0].Status == SUCCESS, answers[-1:] if answers else "no response"
    return [ident for status, ident in answers if status.Status in (0xFF00, 0xFF01)]


def assert_refused(status: Dataset, expected: int) -> None:
    assert "Status" in status, "no response"
    assert status.Status == expected, f"status 0x{status.Status:04X} (expected 0x{expected:04X}): " \
                                      f"{status.get('ErrorComment', '')}"
    assert str(status.get("ErrorComment") or "").strip(), "refusal without an Error Comment"


def assert_no_instance(box: ClinicBox, uid: str) -> None:
    """Nothing was created under ``uid``: an N-SET to it is answered 'no such instance'."""
    status, _ = n_set(box, uid, completed(1))
    assert status.Status == NO_SUCH_INSTANCE, f"instance {uid} exists (N-SET answered 0x{status.Status:04X})"


def _started(box: ClinicBox) -> tuple[dict, str]:
    """An order with a performed step IN PROGRESS (checked), and the MPPS instance UID."""
    order = add_order(box)
    uid = new_uid()
    status, _ = n_create(box, create_dataset(order), uid)
    assert status.Status == SUCCESS, status
    return order, uid


# --- the normal paths ------------------------------------------------------------------------------

def test_in_progress_then_completed(box):
    r = box.cli("worklist", "add", "--patient-id", "MPPS0001", "--patient-name", "Sono^Test",
                "--birth-date", "1980-02-03", "--sex", "F", "--modality", "US", "--station-ae", MODALITY_AE,
                "--procedure", "US abdomen", "--by", "desk", "--json")
    order = {**json.loads(r.stdout), "patient_id": "MPPS0001", "patient_name": "Sono^Test"}
    acc = order["accession_number"]
    before = worklist_items(box, acc)
    assert [i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for i in before] == order["step_ids"]
    assert before[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "SCHEDULED"

    uid = new_uid()
    create = create_dataset(order)
    status, attrs = n_create(box, create, uid)
    assert status.Status == SUCCESS
    assert attrs is not None and attrs.PerformedProcedureStepID == create.PerformedProcedureStepID

    shown = show(box, acc)
    assert shown["status"] == "IN PROGRESS"
    assert [s["status"] for s in shown["steps"]] == ["IN PROGRESS"]
    assert [(p["sop_instance_uid"], p["status"]) for p in shown["performed"]] == [(uid, "IN PROGRESS")]
    (item,) = worklist_items(box, acc)  # in progress: still on the worklist, shown as started
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "STARTED"

    mod = completed(3, 2)
    status, attrs = n_set(box, uid, mod)
    assert status.Status == SUCCESS, status
    assert attrs is not None and attrs.PerformedProcedureStepStatus == "COMPLETED"

    shown = show(box, acc)
    assert shown["status"] == "COMPLETED"
    assert [s["status"] for s in shown["steps"]] == ["COMPLETED"]
    (p,) = shown["performed"]
    assert (p["sop_instance_uid"], p["status"]) == (uid, "COMPLETED")
    assert (p["series_count"], p["image_count"]) == (2, 5)
    assert (p["end_date"], p["end_time"]) == (mod.PerformedProcedureStepEndDate, mod.PerformedProcedureStepEndTime)
    assert p["start_date"] == create.PerformedProcedureStepStartDate
    assert p["performed_station_ae"] == MODALITY_AE
    assert worklist_items(box, acc) == []  # done: the step left the worklist

    # who did what, when
    mpps_events = [h for h in shown["history"] if h["who"] == f"MPPS {MODALITY_AE}"]
    whats = [h["what"] for h in mpps_events]
    assert "SCHEDULED -> IN PROGRESS" in whats and "IN PROGRESS -> COMPLETED" in whats
    assert "performed step started" in whats and "performed step completed" in whats
    assert whats.index("SCHEDULED -> IN PROGRESS") < whats.index("IN PROGRESS -> COMPLETED")
    done = next(h for h in mpps_events if h["what"] == "performed step completed")
    assert uid in done["detail"] and "5 image" in done["detail"]
    for h in mpps_events:
        at = datetime.fromisoformat(h["at"])
        assert abs((datetime.now(timezone.utc) - at).total_seconds()) < 120
    assert shown["history"][0]["who"] == "desk" and shown["history"][0]["what"] == "created"

    listed = [r for r in performed(box) if r["sop_instance_uid"] == uid]
    assert [(r["order_accession"], r["status"], r["image_count"]) for r in listed] == [(acc, "COMPLETED", 5)]


def test_intermediate_n_set_keeps_it_in_progress(box):
    order, uid = _started(box)
    mod = Dataset()
    mod.PerformedProcedureStepDescription = "US abdomen and pelvis"
    mod.PerformedSeriesSequence = [series_item(2)]
    status, _ = n_set(box, uid, mod)
    assert status.Status == SUCCESS
    shown = show(box, order["accession_number"])
    assert shown["status"] == "IN PROGRESS"
    (p,) = shown["performed"]
    assert (p["status"], p["series_count"], p["image_count"]) == ("IN PROGRESS", 1, 2)
    # the final N-SET need not repeat what was set before (the series)
    end = Dataset()
    end.PerformedProcedureStepStatus = "COMPLETED"
    end.PerformedProcedureStepEndDate, end.PerformedProcedureStepEndTime = _now()
    status, _ = n_set(box, uid, end)
    assert status.Status == SUCCESS, status
    (p,) = show(box, order["accession_number"])["performed"]
    assert (p["status"], p["image_count"]) == ("COMPLETED", 2)


def test_discontinued_keeps_the_reason(box):
    order, uid = _started(box)
    acc = order["accession_number"]
    status, _ = n_set(box, uid, discontinued("Equipment failure"))
    assert status.Status == SUCCESS, status
    shown = show(box, acc)
    assert shown["status"] == "DISCONTINUED"
    assert [s["status"] for s in shown["steps"]] == ["DISCONTINUED"]
    (p,) = shown["performed"]
    assert p["status"] == "DISCONTINUED" and p["discontinuation_reason"] == "Equipment failure"
    assert p["end_date"]
    assert any(h["what"] == "IN PROGRESS -> DISCONTINUED" and h["who"] == f"MPPS {MODALITY_AE}"
               for h in shown["history"])
    assert any("Equipment failure" in h["detail"] for h in shown["history"])
    assert worklist_items(box, acc) == []


def test_unscheduled_mpps_is_kept_for_reconciliation(box):
    _order, scheduled_uid = _started(box)  # a scheduled one, not to be listed as unscheduled
    study = new_uid()
    uid = new_uid()
    status, _ = n_create(box, create_dataset(study_uid=study, patient_id="WALKIN7", patient_name="Walkin^Seven"),
                         uid)
    assert status.Status == SUCCESS
    listed = performed(box, unscheduled=True)
    assert scheduled_uid not in {r["sop_instance_uid"] for r in listed}
    (r,) = [r for r in listed if r["sop_instance_uid"] == uid]
    assert r["order_accession"] is None and r["status"] == "IN PROGRESS"
    assert (r["study_instance_uid"], r["patient_id"], r["calling_ae"]) == (study, "WALKIN7", MODALITY_AE)

    status, _ = n_set(box, uid, completed(4))
    assert status.Status == SUCCESS
    (r,) = [r for r in performed(box, unscheduled=True) if r["sop_instance_uid"] == uid]
    assert (r["status"], r["image_count"]) == ("COMPLETED", 4)


@pytest.mark.parametrize("link", ["accession", "study_uid", "requested_procedure_id"])
def test_linked_by_each_key_of_the_scheduled_step(box, link):
    """Accession number first, then Study Instance UID, then Requested Procedure ID (others left empty)."""
    order = add_order(box)
    ds = create_dataset(order)
    item = ds.ScheduledStepAttributesSequence[0]
    if link != "accession":
        item.AccessionNumber = ""
    if link != "study_uid":
        item.StudyInstanceUID = new_uid()  # Type 1: the modality made its own
    if link != "requested_procedure_id":
        item.RequestedProcedureID = ""
    uid = new_uid()
    status, _ = n_create(box, ds, uid)
    assert status.Status == SUCCESS
    shown = show(box, order["accession_number"])
    assert [p["sop_instance_uid"] for p in shown["performed"]] == [uid]
    assert shown["status"] == "IN PROGRESS" and shown["steps"][0]["status"] == "IN PROGRESS"


def test_n_create_without_instance_uid_gets_one_assigned(box):
    order = add_order(box)
    responses = []

    def on_recv(event):
        if type(event.message).__name__ == "N_CREATE_RSP":
            responses.append(event.message.command_set)

    with association(box, handlers=[(evt.EVT_DIMSE_RECV, on_recv)]) as assoc:
        status, _ = assoc.send_n_create(create_dataset(order), MPPS, None)
    assert status.Status == SUCCESS
    (rsp,) = responses
    assigned = str(rsp.get("AffectedSOPInstanceUID") or "")
    assert assigned, "N-CREATE-RSP carries no Affected SOP Instance UID"
    assert [p["sop_instance_uid"] for p in show(box, order["accession_number"])["performed"]] == [assigned]
    status, _ = n_set(box, assigned, completed(1))  # and the modality can finish it under that UID
    assert status.Status == SUCCESS
    assert show(box, order["accession_number"])["status"] == "COMPLETED"


def test_unknown_caller_may_not_send_mpps(box):
    order = add_order(box)
    uid = new_uid()
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(MPPS)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="CLINICBOX")
    try:
        if assoc.is_established:
            assert all(cx.abstract_syntax != MPPS for cx in assoc.accepted_contexts)
            with pytest.raises(ValueError):
                assoc.send_n_create(create_dataset(order), MPPS, uid)
    finally:
        if assoc.is_established:
            assoc.release()
    assert "STRANGER may not query the worklist or send MPPS" in box.log()
    shown = show(box, order["accession_number"])
    assert shown["status"] == "SCHEDULED" and shown["performed"] == []
    assert_no_instance(box, uid)


# --- N-CREATE refusals --------------------------------------------------------------------------------

def _drop(kw):
    return lambda ds: delattr(ds, kw)


def _empty(kw):
    return lambda ds: setattr(ds, kw, [] if ds[kw].VR == "SQ" else None)


def _item_drop(kw):
    return lambda ds: delattr(ds.ScheduledStepAttributesSequence[0], kw)


def _item_empty(kw):
    return lambda ds: setattr(ds.ScheduledStepAttributesSequence[0], kw, None)


def _status(value):
    return lambda ds: setattr(ds, "PerformedProcedureStepStatus", value)


CREATE_REFUSALS = [
    *[(f"no {kw}", _drop(kw), MISSING_ATTRIBUTE) for kw in (
        "ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepStatus",
        "Modality")],
    *[(f"empty {kw}", _empty(kw), MISSING_VALUE) for kw in (
        "ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepStatus",
        "Modality")],
    ("scheduled item without StudyInstanceUID", _item_drop("StudyInstanceUID"), MISSING_ATTRIBUTE),
    ("scheduled item with empty StudyInstanceUID", _item_empty("StudyInstanceUID"), MISSING_VALUE),
    ("status COMPLETED", _status("COMPLETED"), INVALID_VALUE),
    ("status DISCONTINUED", _status("DISCONTINUED"), INVALID_VALUE),
    ("status nonsense", _status("STARTED"), INVALID_VALUE),
]


@pytest.fixture(scope="module")
def refusal_order(box):
    return add_order(box)


@pytest.mark.parametrize("name,spoil,expected", CREATE_REFUSALS, ids=[c[0] for c in CREATE_REFUSALS])
def test_n_create_refused(box, refusal_order, name, spoil, expected):
    ds = create_dataset(refusal_order)
    spoil(ds)
    uid = new_uid()
    status, attrs = n_create(box, ds, uid)
    assert_refused(status, expected)
    assert attrs is None
    assert_no_instance(box, uid)


def test_refused_n_creates_left_the_order_alone(box, refusal_order):
    """Runs after the refusals above (same module, same worker): the order they named is untouched."""
    acc = refusal_order["accession_number"]
    ds = create_dataset(refusal_order)
    del ds.Modality
    status, _ = n_create(box, ds, new_uid())
    assert_refused(status, MISSING_ATTRIBUTE)
    shown = show(box, acc)
    assert shown["status"] == "SCHEDULED"
    assert [s["status"] for s in shown["steps"]] == ["SCHEDULED"]
    assert shown["performed"] == []
    assert [h["what"] for h in shown["history"]] == ["created"]
    assert len(worklist_items(box, acc)) == 1
    assert not [r for r in performed(box) if r["patient_id"] == refusal_order["patient_id"]]


def test_duplicate_n_create_refused_and_first_kept(box):
    order, uid = _started(box)
    acc = order["accession_number"]
    before = show(box, acc)
    again = create_dataset(order)
    again.PerformedStationAETitle = "OTHER_US"
    again.PerformedProcedureStepStartDate = "20200101"
    status, attrs = n_create(box, again, uid)
    assert_refused(status, DUPLICATE)
    assert attrs is None
    after = show(box, acc)
    assert after["performed"] == before["performed"]
    assert after["performed"][0]["performed_station_ae"] == MODALITY_AE
    assert after["history"] == before["history"] and after["status"] == "IN PROGRESS"
    assert [r["sop_instance_uid"] for r in performed(box)].count(uid) == 1


# --- N-SET refusals ------------------------------------------------------------------------------------

def test_n_set_of_unknown_instance_refused(box):
    uid = new_uid()
    status, attrs = n_set(box, uid, completed(1))
    assert_refused(status, NO_SUCH_INSTANCE)
    assert attrs is None
    assert uid not in {r["sop_instance_uid"] for r in performed(box)}


def _no_end_time(mod):
    del mod.PerformedProcedureStepEndTime


def _empty_end_date(mod):
    mod.PerformedProcedureStepEndDate = None


def _no_series(mod):
    del mod.PerformedSeriesSequence  # N-CREATE sent it empty: still empty


def _bad_status(mod):
    mod.PerformedProcedureStepStatus = "FINISHED"


SET_REFUSALS = [
    ("COMPLETED with empty end time", _no_end_time, MISSING_VALUE),  # N-CREATE sent it empty
    ("COMPLETED with empty end date", _empty_end_date, MISSING_VALUE),
    ("COMPLETED without performed series", _no_series, MISSING_VALUE),
    ("status FINISHED", _bad_status, INVALID_VALUE),
]


@pytest.mark.parametrize("name,spoil,expected", SET_REFUSALS, ids=[c[0] for c in SET_REFUSALS])
def test_n_set_refused_changes_nothing(box, name, spoil, expected):
    order, uid = _started(box)
    acc = order["accession_number"]
    before = show(box, acc)
    mod = completed(2)
    spoil(mod)
    status, attrs = n_set(box, uid, mod)
    assert_refused(status, expected)
    assert attrs is None
    after = show(box, acc)
    assert after == before  # status, steps, performed step and history all as they were
    # still IN PROGRESS (and its stored attributes unspoilt): a proper N-SET completes it
    status, _ = n_set(box, uid, completed(2))
    assert status.Status == SUCCESS, status


def test_final_n_set_needs_end_attributes_the_create_did_not_send(box):
    """The N-CREATE left out the (Type 2) end date/time altogether: COMPLETED without them is 0x0120."""
    order = add_order(box)
    ds = create_dataset(order)
    del ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime
    uid = new_uid()
    status, _ = n_create(box, ds, uid)
    assert status.Status == SUCCESS
    mod = completed(1)
    del mod.PerformedProcedureStepEndDate, mod.PerformedProcedureStepEndTime
    status, _ = n_set(box, uid, mod)
    assert_refused(status, MISSING_ATTRIBUTE)
    shown = show(box, order["accession_number"])
    assert shown["status"] == "IN PROGRESS" and shown["performed"][0]["status"] == "IN PROGRESS"


@pytest.mark.parametrize("final", ["COMPLETED", "DISCONTINUED"])
def test_no_update_after_the_final_state(box, final):
    order, uid = _started(box)
    acc = order["accession_number"]
    status, _ = n_set(box, uid, completed(3) if final == "COMPLETED" else discontinued())
    assert status.Status == SUCCESS
    before = show(box, acc)
    assert before["status"] == final
    for mod in (completed(7), discontinued("Changed my mind"), _in_progress_again()):
        status, attrs = n_set(box, uid, mod)
        assert_refused(status, PROCESSING_FAILURE)
        assert status.get("ErrorID") == NO_LONGER_UPDATABLE
        assert attrs is None
    assert show(box, acc) == before


def _in_progress_again() -> Dataset:
    mod = Dataset()
    mod.PerformedProcedureStepStatus = "IN PROGRESS"
    mod.PerformedProcedureStepDescription = "reopened"
    return mod

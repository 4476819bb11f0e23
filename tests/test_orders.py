"""The orders room on its own: validation, accession numbers, known patients, worklist SQL, MPPS states."""

from __future__ import annotations

from datetime import datetime

import pydicom
import pytest
from pydicom.dataset import Dataset

from clinicbox.archive.ingest import Archive
from clinicbox.core.config import StorageSettings
from clinicbox.orders.book import OrderBook
from clinicbox.orders.csvimport import parse
from clinicbox.orders.model import NewOrder, OrderError, PatientMismatch, Step
from clinicbox.orders.mpps import MppsRefused
from clinicbox.orders.text import to_latin1
from clinicbox.orders.worklist import read_query
from tests.support.synth import ORG_ROOT, ct_dataset


@pytest.fixture
def book(tmp_path):
    archive = Archive(StorageSettings(data_dir=str(tmp_path / "data")))
    archive.open()
    b = OrderBook(archive)
    b.open()
    yield b
    archive.close()


def _order(pid="P1", name="DOE^JANE", modality="US", stations=("US1",), at="2026-11-23 09:30", **kw) -> NewOrder:
    return NewOrder(patient_id=pid, patient_name=name, requested_procedure_description="US abdomen",
                    steps=[Step(modality=modality, station_ae_titles=list(stations),
                                start=datetime.strptime(at, "%Y-%m-%d %H:%M"))], **kw)


def _query(**top) -> Dataset:
    ds = Dataset()
    sps = Dataset()
    for kw in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
               "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID"):
        setattr(sps, kw, top.pop(kw, ""))
    for kw in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "RequestingPhysician"):
        setattr(ds, kw, top.pop(kw, ""))
    ds.ScheduledProcedureStepSequence = [sps]
    assert not top
    return ds


def _find(book, charset="ISO_IR 192", station=None, **keys):
    return list(book.worklist(read_query(_query(**keys)), charset=charset, station_filter=station))


def test_validation_names_the_field():
    for bad, field in [(dict(pid=""), "patient_id"), (dict(name=""), "patient_name"),
                       (dict(modality="ultra sound!"), "modality"), (dict(stations=()), "station_ae"),
                       (dict(stations=("BAD\\AE",)), "station_ae"), (dict(priority="SOON"), "priority"),
                       (dict(patient_birth_date="31.12.1980"), "birth_date"),
                       (dict(study_instance_uid="1.2.abc"), "study_uid"), (dict(accession_number="X" * 17), "accession")]:
        with pytest.raises(OrderError) as exc:
            from clinicbox.orders.model import validated
            validated(_order(**bad))
        assert exc.value.field == field, (bad, exc.value)


def test_accession_numbers_are_generated_unique_and_study_uid_kept_when_given(book):
    a = book.add(_order(), who="desk")
    b = book.add(_order(), who="desk")
    assert a.accession_number != b.accession_number
    assert a.accession_number.startswith("CB" + datetime.now().strftime("%y%m%d"))
    assert a.requested_procedure_id == a.accession_number and a.step_ids == (f"{a.accession_number}-1",)
    uid = pydicom.uid.generate_uid(prefix=ORG_ROOT)
    c = book.add(_order(accession_number="EXT-1", study_instance_uid=uid), who="desk")
    assert (c.accession_number, c.study_instance_uid) == ("EXT-1", uid)
    with pytest.raises(OrderError, match="already used"):
        book.add(_order(accession_number="EXT-1"), who="desk")


def test_known_patient_reused_and_changed_name_refused_unless_confirmed(book):
    first = book.add(_order(patient_birth_date="1980-02-03"), who="desk")
    assert not first.patient_reused
    assert book.add(_order(name="Doe^Jane"), who="desk").patient_reused  # same person, other case
    with pytest.raises(PatientMismatch, match="already known"):
        book.add(_order(name="ROE^JANE"), who="desk")
    with pytest.raises(PatientMismatch, match="birth date"):
        book.add(_order(patient_birth_date="1981-02-03"), who="desk")
    book.add(_order(name="ROE^JANE"), who="desk", confirm=True)
    assert {o["patient_name"] for o in book.orders()} == {"ROE^JANE"}  # one patient record, renamed


def test_patient_known_only_from_stored_images_is_checked_too(book, tmp_path):
    ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                    rows=4, cols=4, patient_id="IMG1", patient_name="STORED^NAME")
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    book.archive.store_file(path)
    with pytest.raises(PatientMismatch):
        book.add(_order(pid="IMG1", name="OTHER^NAME"), who="desk")
    assert book.add(_order(pid="IMG1", name="Stored^Name"), who="desk").patient_reused


def test_worklist_matching_rules_in_sql(book):
    book.add(_order("P1", "DOE^JANE", "US", ("US1",), "2026-11-23 09:30"), who="d")
    book.add(_order("P2", "DOE^JOHN", "CR", ("CR1", "CR2"), "2026-11-23 14:00"), who="d")
    book.add(_order("P3", "ROE^RICHARD", "US", ("US2",), "2026-11-24 08:00"), who="d")
    ids = lambda answers: sorted(str(a.PatientID) for a in answers)  # noqa: E731
    assert ids(_find(book)) == ["P1", "P2", "P3"]
    assert ids(_find(book, Modality="US")) == ["P1", "P3"]
    assert ids(_find(book, ScheduledStationAETitle="CR2")) == ["P2"]
    assert ids(_find(book, ScheduledStationAETitle="CR*")) == ["P2"]
    assert ids(_find(book, PatientName="doe*")) == ["P1", "P2"]
    assert ids(_find(book, PatientName="?OE^J*")) == ["P1", "P2"]
    assert ids(_find(book, ScheduledProcedureStepStartDate="20261123")) == ["P1", "P2"]
    assert ids(_find(book, ScheduledProcedureStepStartDate="20261124-")) == ["P3"]
    assert ids(_find(book, ScheduledProcedureStepStartDate="-20261123")) == ["P1", "P2"]
    assert ids(_find(book, ScheduledProcedureStepStartTime="0800-1000")) == ["P1", "P3"]
    assert ids(_find(book, ScheduledProcedureStepStartTime="0930")) == ["P1"]  # stored 093000
    # combined: from the 23rd 12:00 to the 24th 09:00
    assert ids(_find(book, ScheduledProcedureStepStartDate="20261123-20261124",
                     ScheduledProcedureStepStartTime="1200-0900")) == ["P2", "P3"]
    assert ids(_find(book, station="US2")) == ["P3"]  # own-station filter when the query names none
    assert ids(_find(book, station="US2", ScheduledStationAETitle="US1")) == ["P1"]


def test_answers_hold_exactly_the_requested_keys_in_the_devices_charset(book):
    book.add(_order(name="WRÓBEL^ŁUKASZ"), who="d")
    [utf8] = _find(book, charset="ISO_IR 192")
    assert utf8.SpecificCharacterSet == "ISO_IR 192" and str(utf8.PatientName) == "WRÓBEL^ŁUKASZ"
    assert {e.keyword for e in utf8} == {"SpecificCharacterSet", "PatientName", "PatientID", "AccessionNumber",
                                          "StudyInstanceUID", "RequestingPhysician", "ScheduledProcedureStepSequence"}
    assert utf8.RequestingPhysician == ""  # asked for, unknown: empty, not dropped
    sps = utf8.ScheduledProcedureStepSequence[0]
    assert sps.Modality == "US" and sps.ScheduledStationAETitle == "US1" and sps.ScheduledProcedureStepID
    assert "ScheduledProcedureStepDescription" not in sps  # not asked for
    [latin] = _find(book, charset="ISO_IR 100")
    assert latin.SpecificCharacterSet == "ISO_IR 100" and str(latin.PatientName) == "WRÓBEL^LUKASZ"
    assert to_latin1("Ștefan Müller Ωmega") == "Stefan Müller ?mega"


def test_cancelled_and_completed_steps_leave_the_worklist_and_history_is_kept(book):
    a = book.add(_order("P1"), who="desk")
    book.add(_order("P2"), who="desk")
    book.cancel(a.accession_number, who="anna", reason="called off")
    assert [str(x.PatientID) for x in _find(book)] == ["P2"]
    with pytest.raises(OrderError, match="CANCELLED"):
        book.cancel(a.accession_number, who="anna")
    what = [(h["who"], h["what"]) for h in book.history(a.accession_number)]
    assert what == [("desk", "created"), ("anna", "SCHEDULED -> CANCELLED")]


def _mpps(added, status="IN PROGRESS", **extra) -> Dataset:
    ds = Dataset()
    item = Dataset()
    item.StudyInstanceUID = added.study_instance_uid if added else pydicom.uid.generate_uid(prefix=ORG_ROOT)
    item.AccessionNumber = added.accession_number if added else ""
    item.ScheduledProcedureStepID = added.step_ids[0] if added else ""
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedProcedureStepID, ds.PerformedStationAETitle = "PPS1", "US1"
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20261123", "093100"
    ds.PerformedProcedureStepStatus, ds.Modality = status, "US"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _final(status: str, images: int = 2) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "20261123", "094500"
    series = Dataset()
    series.SeriesInstanceUID = pydicom.uid.generate_uid(prefix=ORG_ROOT)
    refs = []
    for _ in range(images):
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.6.1", pydicom.uid.generate_uid()
        refs.append(r)
    series.ReferencedImageSequence = refs
    ds.PerformedSeriesSequence = [series] if images else []
    return ds


def test_mpps_moves_the_order_and_refuses_what_ps34_f7_refuses(book):
    added = book.add(_order(), who="desk")
    uid = pydicom.uid.generate_uid()
    assert book.mpps_create(uid, _mpps(added), "US1").order_accession == added.accession_number
    order = book.order(added.accession_number)
    assert order["status"] == "IN PROGRESS" and order["steps"][0]["status"] == "IN PROGRESS"
    [item] = _find(book)
    assert item.ScheduledProcedureStepSequence[0].get("ScheduledProcedureStepID")  # still on the worklist
    with pytest.raises(MppsRefused) as exc:
        book.mpps_create(uid, _mpps(added), "US1")
    assert exc.value.status == 0x0111
    with pytest.raises(MppsRefused) as exc:
        book.mpps_set(uid, _final("COMPLETED", images=0), "US1")
    assert exc.value.status in (0x0120, 0x0121) and "PerformedSeriesSequence" in exc.value.comment
    assert book.order(added.accession_number)["status"] == "IN PROGRESS"  # the refusal changed nothing
    book.mpps_set(uid, _final("COMPLETED"), "US1")
    order = book.order(added.accession_number)
    assert order["status"] == "COMPLETED" and order["performed"][0]["image_count"] == 2
    assert _find(book) == []
    with pytest.raises(MppsRefused) as exc:
        book.mpps_set(uid, _final("DISCONTINUED"), "US1")
    assert (exc.value.status, exc.value.error_id) == (0x0110, 0xA710)
    with pytest.raises(MppsRefused) as exc:
        book.mpps_set(pydicom.uid.generate_uid(), _final("COMPLETED"), "US1")
    assert exc.value.status == 0x0112
    with pytest.raises(MppsRefused) as exc:
        book.mpps_create(pydicom.uid.generate_uid(), _mpps(added, status="COMPLETED"), "US1")
    assert exc.value.status == 0x0106
    missing = _mpps(added)
    del missing.PerformedStationAETitle
    with pytest.raises(MppsRefused) as exc:
        book.mpps_create(pydicom.uid.generate_uid(), missing, "US1")
    assert exc.value.status == 0x0120 and "PerformedStationAETitle" in exc.value.comment


def test_mpps_discontinued_and_unscheduled(book):
    added = book.add(_order(), who="desk")
    uid = pydicom.uid.generate_uid()
    book.mpps_create(uid, _mpps(added), "US1")
    stop = _final("DISCONTINUED", images=0)
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator, reason.CodeMeaning = "110514", "DCM", "Incorrect worklist entry selected"
    stop.PerformedProcedureStepDiscontinuationReasonCodeSequence = [reason]
    book.mpps_set(uid, stop, "US1")
    order = book.order(added.accession_number)
    assert order["status"] == "DISCONTINUED"
    assert order["performed"][0]["discontinuation_reason"] == "Incorrect worklist entry selected"
    book.mpps_create(pydicom.uid.generate_uid(), _mpps(None), "US9")
    [unscheduled] = book.performed(unscheduled_only=True)
    assert unscheduled["performed_station_ae"] == "US1" and unscheduled["order_accession"] is None


def test_stored_images_count_against_their_order(book, tmp_path):
    added = book.add(_order(), who="desk")
    series = pydicom.uid.generate_uid(prefix=ORG_ROOT)
    for n in range(3):
        study = added.study_instance_uid if n < 2 else pydicom.uid.generate_uid(prefix=ORG_ROOT)
        ds = ct_dataset(study, series if n < 2 else pydicom.uid.generate_uid(prefix=ORG_ROOT), n + 1,
                        rows=4, cols=4, patient_id="P1", patient_name="DOE^JANE")
        ds.AccessionNumber = added.accession_number  # the third: right accession, the modality's own study UID
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        book.archive.store_file(path)
    order = book.order(added.accession_number)
    assert order["images"] == 3 and order["first_image_at"]


def test_csv_rows_sharing_an_accession_are_one_order_and_bad_rows_are_named():
    text = ("patient_id,patient_name,modality,station_ae,at,accession,birth_date\n"
            "P1,DOE^JANE,US,US1,2026-11-23 09:00,A1,1980-01-01\n"
            "P1,DOE^JANE,CR,CR1;CR2,2026-11-23 09:30,A1,1980-01-01\n"
            "P2,,US,US1,2026-11-23 10:00,,\n"
            "P3,ROE^RICH,US,US1,tomorrow,,\n"
            "P4,POE^EDGAR,US,US1,2026-11-23 11:00,,1809-01-19\n")
    orders, errors = parse(text)
    assert [(label, len(o.steps)) for label, o in orders] == [("rows 2, 3", 2), ("row 6", 1)]
    assert orders[0][1].steps[1].station_ae_titles == ["CR1", "CR2"]
    assert [label for label, _ in errors] == ["row 4", "row 5"]
    assert "patient_name" in errors[0][1] and "at" in errors[1][1]
    assert parse("patient_id,name\n")[1][0][0] == "header"


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
@pytest.mark.parametrize("implicit", [True, False])
def test_compiled_answers_are_byte_identical_to_pydicom_encoded_answers(book, charset, implicit):
    from pynetdicom.dsutils import encode

    book.add(_order(name="WRÓBEL^ŁUKASZ", patient_birth_date="1980-02-03", medical_alerts=["Pacemaker", "Latex"],
                    procedure_code_value="US-ABD"), who="d")
    book.add(_order(pid="P2", name="Müller^Jürgen", stations=("AA32", "AA33")), who="d")
    q = _query()
    q.RequestedProcedureCodeSequence = []  # asked for, no item: the code comes back whole
    q.MedicalAlerts = ""
    q.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence = [Dataset()]
    q.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue = ""
    q.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeMeaning = ""
    query = read_query(q)
    datasets = list(book.worklist(query, charset=charset))
    compiled = list(book.worklist(query, charset=charset, implicit=implicit))
    assert len(compiled) == 2
    assert compiled == [encode(ds, implicit, True, False) for ds in datasets]


def test_mpps_with_a_step_id_the_order_does_not_have_still_moves_the_order(book):
    added = book.add(_order(), who="desk")
    uid = pydicom.uid.generate_uid()
    ds = _mpps(added)
    ds.ScheduledStepAttributesSequence[0].ScheduledProcedureStepID = "MODALITY-OWN-7"
    book.mpps_create(uid, ds, "US1")
    book.mpps_set(uid, _final("COMPLETED"), "US1")
    order = book.order(added.accession_number)
    assert order["status"] == "COMPLETED" and order["steps"][0]["status"] == "COMPLETED"
    assert _find(book) == []


def test_csv_rows_of_one_accession_must_name_one_patient():
    text = ("patient_id,patient_name,modality,station_ae,at,accession\n"
            "P1,DOE^JOHN,US,US1,2026-11-23 09:00,A1\n"
            "P2,ROE^JANE,CR,CR1,2026-11-23 09:30,A1\n")
    orders, errors = parse(text)
    assert orders == [] and errors and "patient_id" in errors[0][1] and errors[0][0] == "rows 2, 3"


def test_mpps_after_the_desk_cancelled_keeps_the_order_cancelled(book):
    added = book.add(_order(), who="desk")
    book.cancel(added.accession_number, who="desk", reason="patient left")
    uid = pydicom.uid.generate_uid()
    assert book.mpps_create(uid, _mpps(added), "US1").order_accession == added.accession_number
    book.mpps_set(uid, _final("DISCONTINUED", images=0), "US1")
    order = book.order(added.accession_number)
    assert order["status"] == "CANCELLED" and order["performed"][0]["status"] == "DISCONTINUED"

"""The reconciliation room on a real archive in a temp dir: matching rules, intake modes, decisions,
and the held objects' place in backup, restore and start-up repair (the DICOM path: test_intake.py)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from clinicbox.archive.ingest import Archive, StoreOutcome
from clinicbox.archive.repair import repair
from clinicbox.core.config import Config, ConfigError, from_mapping
from clinicbox.jobs import backup
from clinicbox.jobs import restore as restore_mod
from clinicbox.orders.book import OrderBook
from clinicbox.orders.model import NewOrder, Step
from clinicbox.reconcile.match import person_key
from clinicbox.reconcile.queue import ReconcileError, Reconciler
from tests.support.docs import encapsulated_pdf, make_pdf, sc_scan, vl_photo
from tests.support.synth import ct_dataset


def _config(tmp_path: Path, **sections) -> Config:
    return from_mapping({"storage": {"data_dir": str(tmp_path / "data")}, **sections})


class Room:
    def __init__(self, tmp_path: Path, **sections) -> None:
        self.config = _config(tmp_path, **sections)
        self.archive = Archive(self.config.storage)
        self.archive.open()
        self.orders = OrderBook(self.archive)
        self.orders.open()
        self.rec = Reconciler(self.archive, self.config.intake, self.config.reconcile)
        self.rec.open()
        self.rec.install()
        for name, ae, role in (("EMR", "EMR1", "emr"), ("CAM", "CAP1", "capture"), ("CT", "CT1", "modality")):
            self.archive.add_device(name, ae, "127.0.0.1", 104, role)

    def send(self, ds, ae: str = "EMR1"):
        fd, tmp = self.archive.new_incoming()
        os.close(fd)
        ds.save_as(tmp, enforce_file_format=True)
        return self.archive.store_incoming(Path(tmp), calling_ae=ae)

    def order(self, pid: str, name: str, birth: str = "", **kw) -> dict:
        step = Step(modality="CT", station_ae_titles=["CT1"], start=datetime.now(), description="CT exam")
        added = self.orders.add(NewOrder(patient_id=pid, patient_name=name, patient_birth_date=birth,
                                         steps=[step], **kw), who="desk")
        return self.orders.order(added.accession_number)

    def patient_of(self, sop_uid: str) -> tuple[str, str, str]:
        return tuple(self.archive.index.conn.execute(
            "SELECT p.patient_id, p.patient_name, s.study_instance_uid FROM instances i"
            " JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
            " JOIN patients p ON p.id = s.patient_pk WHERE i.sop_instance_uid=?", (sop_uid,)).fetchone())

    def close(self) -> None:
        self.archive.close()


@pytest.fixture
def room(tmp_path):
    r = Room(tmp_path)
    yield r
    r.close()


def test_person_key_folds_case_accents_and_padding():
    assert person_key("Doe^Jane^^") == person_key("DOE^JANE") == person_key("Dóe^Jane=ドウ^ジェーン")
    assert person_key("DOE^JANE") != person_key("DOE^JOAN")


def test_accession_of_another_patients_order_is_a_conflict(room):
    order = room.order("P1", "DOE^JANE")
    ds = encapsulated_pdf(make_pdf("x"), patient_id="P2", patient_name="ROE^RICH",
                          accession=order["accession_number"])
    result = room.send(ds)
    assert result.outcome is StoreOutcome.HELD
    item = room.rec.item(result.held_item)
    assert item["kind"] == "conflicting"
    assert "belongs to another patient (patient ID P1)" in item["reasons"][0]
    assert (item["suggested_patient_id"], item["suggested_accession"]) == ("P1", order["accession_number"])


def test_study_uid_stored_under_another_patient_is_a_conflict_even_from_a_modality(room):
    first = ct_dataset("1.2.826.0.1.3680043.10.1234.77", "1.2.826.0.1.3680043.10.1234.78", 1, rows=4, cols=4,
                       patient_id="A1", patient_name="ALPHA^ONE")
    assert room.send(first, "CT1").outcome is StoreOutcome.STORED
    second = ct_dataset("1.2.826.0.1.3680043.10.1234.77", "1.2.826.0.1.3680043.10.1234.79", 2, rows=4, cols=4,
                        patient_id="B2", patient_name="BETA^TWO")
    result = room.send(second, "CT1")
    assert result.outcome is StoreOutcome.HELD
    reasons = room.rec.item(result.held_item)["reasons"]
    assert "the stored study with this Study Instance UID belongs to another patient (patient ID A1)" in reasons


def test_no_patient_id_but_a_known_accession_waits_with_a_suggestion(room):
    order = room.order("P1", "DOE^JANE")
    result = room.send(encapsulated_pdf(make_pdf("x"), patient_id="", patient_name="",
                                        accession=order["accession_number"]))
    item = room.rec.item(result.held_item)
    assert item["kind"] == "unknown" and item["suggested_patient_id"] == "P1"
    room.rec.assign(item["id"], "P1", accession=order["accession_number"], who="desk")
    ds = pydicom.dcmread(room.archive.store.abspath(room.archive.index.instance(
        item["objects_held"][0]["sop_instance_uid"])["path"]))
    assert (ds.PatientID, ds.StudyInstanceUID) == ("P1", order["study_instance_uid"])


def test_issuer_of_patient_id_separates_namespaces(room):
    room.order("P1", "DOE^JANE", issuer_of_patient_id="CLINIC")
    ds = vl_photo(patient_id="P1", patient_name="SOMEONE^ELSE")
    ds.IssuerOfPatientID = "OTHERHOSPITAL"
    result = room.send(ds, "CAP1")
    # another issuer's P1 is another person: not a conflict with ours, but nobody we know either
    assert room.rec.item(result.held_item)["kind"] == "unknown"
    ds = vl_photo(patient_id="P1", patient_name="SOMEONE^ELSE", seed=3)  # no issuer: could be ours
    assert room.rec.item(room.send(ds, "CAP1").held_item)["kind"] == "conflicting"


def test_intake_modes_per_role_and_per_device(room):
    unknown = lambda n: vl_photo(patient_id=f"NEW{n}", patient_name=f"NEW^P{n}", seed=n)  # noqa: E731
    assert room.send(unknown(1), "EMR1").outcome is StoreOutcome.HELD          # emr: match
    assert room.send(unknown(2), "CT1").outcome is StoreOutcome.STORED         # modality: check
    assert room.send(unknown(3), "NOT-ADDED").outcome is StoreOutcome.STORED   # unknown caller: check
    room.archive.add_device("EMR", "EMR1", "127.0.0.1", 104, "emr", intake="accept")
    conflicting = vl_photo(patient_id="NEW2", patient_name="OTHER^NAME", seed=4)
    assert room.send(conflicting, "EMR1").outcome is StoreOutcome.STORED       # accept: as sent
    room.archive.add_device("CT", "CT1", "127.0.0.1", 104, "modality", intake="match")
    assert room.send(unknown(5), "CT1").outcome is StoreOutcome.HELD


def test_match_scope_documents_checks_other_images(tmp_path):
    r = Room(tmp_path, intake={"match_scope": "documents"})
    try:
        ct = ct_dataset("1.2.826.0.1.3680043.10.1234.90", "1.2.826.0.1.3680043.10.1234.91", 1, rows=4, cols=4,
                        patient_id="Z1", patient_name="ZED^ONE")
        assert r.send(ct, "EMR1").outcome is StoreOutcome.STORED   # an image: checked only
        assert r.send(vl_photo(patient_id="Z9", patient_name="ZED^NINE"), "EMR1").outcome is StoreOutcome.HELD
    finally:
        r.close()


def test_bad_intake_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"intake\.match_on\[1\]"):
        _config(tmp_path, intake={"match_on": ["patient_id", "name"]})
    with pytest.raises(ConfigError, match=r"intake\.emr"):
        _config(tmp_path, intake={"emr": "maybe"})


def test_assign_never_joins_another_patients_study_or_order(room):
    order = room.order("P1", "DOE^JANE")
    other = ct_dataset("1.2.826.0.1.3680043.10.1234.50", "1.2.826.0.1.3680043.10.1234.51", 1, rows=4, cols=4,
                       patient_id="X1", patient_name="EX^ONE")
    room.send(other, "CT1")
    # claims X1's study and series and P1's accession, under patient ID P5 nobody knows
    ds = ct_dataset("1.2.826.0.1.3680043.10.1234.50", "1.2.826.0.1.3680043.10.1234.51", 2, rows=4, cols=4,
                    patient_id="P5", patient_name="FIVE^P")
    ds.AccessionNumber = order["accession_number"]
    held = room.send(ds, "CT1")
    assert held.outcome is StoreOutcome.HELD
    room.order("P5", "FIVE^P")  # the desk registers P5 meanwhile
    room.rec.assign(held.held_item, "P5", who="desk")
    pid, name, study = room.patient_of(ds.SOPInstanceUID)
    assert (pid, name) == ("P5", "FIVE^P")
    assert study != "1.2.826.0.1.3680043.10.1234.50"
    assert room.patient_of(other.SOPInstanceUID)[0] == "X1"
    released = pydicom.dcmread(room.archive.store.abspath(room.archive.index.instance(ds.SOPInstanceUID)["path"]))
    assert released.AccessionNumber == ""
    assert released.SeriesInstanceUID != "1.2.826.0.1.3680043.10.1234.51"
    assert released.SOPInstanceUID == ds.SOPInstanceUID
    modified = released.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert modified.AccessionNumber == order["accession_number"]
    assert modified.StudyInstanceUID == "1.2.826.0.1.3680043.10.1234.50"


def test_decisions_that_cannot_be_taken_say_why(room):
    room.order("P1", "DOE^JANE")
    other = room.order("P2", "ROE^RICH")
    held = room.send(sc_scan(patient_id="P1", patient_name="DOE^JOAN"), "CAP1")
    with pytest.raises(ReconcileError, match="no patient with ID P7"):
        room.rec.assign(held.held_item, "P7", who="desk")
    with pytest.raises(ReconcileError, match="belongs to another patient"):
        room.rec.assign(held.held_item, "P1", accession=other["accession_number"], who="desk")
    with pytest.raises(ReconcileError, match="already belongs to a known patient"):
        room.rec.new_patient(held.held_item, who="desk")
    with pytest.raises(ReconcileError, match="needs a reason"):
        room.rec.reject(held.held_item, reason=" ", who="desk")
    with pytest.raises(ReconcileError, match="no reconciliation item 999"):
        room.rec.item(999)
    assert room.rec.item(held.held_item)["status"] == "held"  # nothing changed by a refusal
    room.rec.new_patient(held.held_item, patient_id="P1B", who="desk")
    assert room.patient_of(room.rec.item(held.held_item)["decision"] and
                           pydicom.dcmread(room.archive.store.abspath(room.archive.index.conn.execute(
                               "SELECT path FROM instances WHERE sop_class_uid LIKE '1.2.840.10008.5.1.4.1.1.7%'"
                           ).fetchone()[0])).SOPInstanceUID)[:2] == ("P1B", "DOE^JOAN")


def test_a_name_outside_latin1_switches_the_object_to_utf8(room):
    room.order("P1", "DOE^JANE")
    held = room.send(sc_scan(patient_id="P1", patient_name="DOE^JOAN"), "CAP1")
    room.rec.new_patient(held.held_item, patient_id="P9", name="Łukasz^Żółw", who="desk")
    uid = room.rec.item(held.held_item)["decision"]
    path = room.archive.store.abspath(room.archive.index.conn.execute(
        "SELECT i.path FROM instances i JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
        " JOIN patients p ON p.id = s.patient_pk WHERE p.patient_id = 'P9'").fetchone()[0])
    ds = pydicom.dcmread(path)
    assert uid["patient_id"] == "P9"
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Łukasz^Żółw"


def test_held_objects_are_backed_up_restored_and_not_indexed_by_repair(tmp_path):
    r = Room(tmp_path)
    try:
        r.order("P1", "DOE^JANE")
        held = r.send(sc_scan(patient_id="P1", patient_name="DOE^JOAN"), "CAP1")
        stored = r.send(sc_scan(patient_id="P1", patient_name="DOE^JANE", seed=7), "CAP1")
        assert (held.outcome, stored.outcome) == (StoreOutcome.HELD, StoreOutcome.STORED)
        target = tmp_path / "usb"
        target.mkdir()
        result = backup.run_backup(r.config.data_dir, target)
        assert result.instances == 2
        assert restore_mod.verify_backup(target)["ok"]
        report = repair(r.archive)                      # start-up repair: the held file is not an orphan
        assert report.indexed == 0 and report.quarantined == []
        assert r.archive.index.counts()["instances"] == 1
    finally:
        r.close()
    restored = tmp_path / "restored"
    restore_mod.restore(target, None, restored)
    r2 = Archive(_config(tmp_path / "x", storage={"data_dir": str(restored)}).storage)
    r2.open()
    try:
        rows = r2.index.conn.execute("SELECT path, sha256 FROM held_objects").fetchall()
        assert len(rows) == 1 and (restored / rows[0][0]).exists()
        assert r2.index.counts()["instances"] == 1
    finally:
        r2.close()


def test_an_unacknowledged_file_found_at_start_up_goes_through_intake(tmp_path):
    r = Room(tmp_path)
    try:
        r.order("P1", "DOE^JANE")
        ds = sc_scan(patient_id="P1", patient_name="DOE^JOAN")
        # as if the service died after placing the file but before its index commit
        path = r.archive.store.abspath(r.archive.store.relpath_for(ds.SOPInstanceUID))
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        report = repair(r.archive)
        assert report.indexed == 1
        assert r.archive.index.instance(ds.SOPInstanceUID) is None
        assert [h["path"] for h in r.archive.index.held(ds.SOPInstanceUID)] == [
            r.archive.store.relpath_for(ds.SOPInstanceUID)]
    finally:
        r.close()


def test_list_and_show_through_the_cli(tmp_path, capsys):
    from clinicbox.cli import main

    r = Room(tmp_path)
    try:
        held = r.send(encapsulated_pdf(make_pdf("x"), patient_id="Q1", patient_name="QUEUE^ONE", title="Letter"))
    finally:
        r.close()
    data = str(tmp_path / "data")
    assert main(["reconcile", "list", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "unknown" in out and "no patient with ID Q1 is known" in out
    assert main(["reconcile", "show", str(held.held_item), "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "Letter" in out and held.sop_instance_uid in out
    assert main(["reconcile", "assign", str(held.held_item), "--patient-id", "Q9", "--data-dir", data]) == 1
    assert "no patient with ID Q9" in capsys.readouterr().err
    assert main(["reconcile", "list", "--json", "--status", "all", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "held"


# --- regressions from the review of 2026-11-23 -------------------------------------------------------

def test_an_object_arriving_while_an_item_is_released_is_released_too(room):
    room.order("P1", "DOE^JANE")
    first = sc_scan(patient_id="P1", patient_name="DOE^JOAN", seed=1)
    held = room.send(first, "CAP1")
    late = sc_scan(patient_id="P1", patient_name="DOE^JOAN", seed=2, study_uid=first.StudyInstanceUID)
    real = room.rec._release_one
    arrived = []

    def release_one(*args, **kwargs):
        if not arrived:  # the sender's next object lands in the same open item mid-release
            arrived.append(room.send(late, "CAP1"))
        return real(*args, **kwargs)

    room.rec._release_one = release_one
    result = room.rec.assign(held.held_item, "P1", who="desk")
    assert arrived[0].held_item == held.held_item
    assert result["objects"] == 2
    assert room.archive.index.conn.execute("SELECT count(*) FROM held_objects").fetchone()[0] == 0
    assert room.patient_of(late.SOPInstanceUID)[0] == "P1"


def test_a_held_copy_never_shares_a_file_with_a_row_flagged_missing(room):
    ds = sc_scan(patient_id="A1", patient_name="ONE^ANN")
    assert room.send(ds, "CT1").outcome is StoreOutcome.STORED
    row = room.archive.index.instance(ds.SOPInstanceUID)
    room.archive.store.abspath(row["path"]).unlink()
    assert repair(room.archive).missing == 1
    ds.PatientName = "TWO^BOB"  # the same UID again, claiming another name: held
    held = room.send(ds, "CT1")
    assert held.outcome is StoreOutcome.HELD
    (h,) = room.archive.index.held(ds.SOPInstanceUID)
    assert h["path"] != row["path"]


def test_new_patient_with_another_issuer_gets_its_own_study(room):
    first = sc_scan(patient_id="1234", patient_name="ALPHA^ANN")
    first.IssuerOfPatientID = "HOSP_A"
    room.archive.add_device("OTHER", "ARCH1", "127.0.0.1", 104, "archive")
    assert room.send(first, "ARCH1").outcome is StoreOutcome.STORED       # accept: as sent
    second = sc_scan(patient_id="1234", patient_name="BETA^BOB", seed=5, study_uid=first.StudyInstanceUID)
    second.IssuerOfPatientID = "CLINIC_B"
    held = room.send(second, "EMR1")
    assert held.outcome is StoreOutcome.HELD
    room.rec.new_patient(held.held_item, who="desk")
    pid, name, study = room.patient_of(second.SOPInstanceUID)
    assert (pid, name) == ("1234", "BETA^BOB") and study != first.StudyInstanceUID
    assert room.patient_of(first.SOPInstanceUID)[1] == "ALPHA^ANN"


def test_a_resend_of_a_rejected_object_is_kept(room):
    ds = encapsulated_pdf(make_pdf("x"), patient_id="Q7", patient_name="QUEUE^SEVEN")
    held = room.send(ds)
    room.rec.reject(held.held_item, reason="not registered yet", who="desk")
    again = room.send(ds)  # the EMR sends it again once the patient is registered
    assert again.outcome is StoreOutcome.HELD and again.held_item != held.held_item
    assert len(room.archive.index.held(ds.SOPInstanceUID)) == 2


def test_a_different_version_of_a_stored_uid_stays_held_under_keep_first(room):
    room.order("P1", "DOE^JANE")
    ds = sc_scan(patient_id="P1", patient_name="DOE^JOAN")
    held = room.send(ds, "CAP1")                                   # held: another name
    ds.PatientName = "DOE^JANE"
    ds.PixelData = bytes(len(ds.PixelData))
    assert room.send(ds, "CAP1").outcome is StoreOutcome.STORED     # then a corrected, different version
    with pytest.raises(ReconcileError, match="another version"):
        room.rec.assign(held.held_item, "P1", who="desk")
    assert room.rec.item(held.held_item)["status"] == "held" and room.rec.item(held.held_item)["held"] == 1


def test_objects_without_a_patient_id_are_held_even_from_a_modality(room):
    ds = ct_dataset("1.2.826.0.1.3680043.10.1234.60", "1.2.826.0.1.3680043.10.1234.61", 1, rows=4, cols=4,
                    patient_id="", patient_name="")
    ds.AccessionNumber = ""
    result = room.send(ds, "CT1")
    assert result.outcome is StoreOutcome.HELD
    assert room.rec.item(result.held_item)["reasons"] == ["the object has no patient ID"]


def test_staff_values_are_checked_before_anything_is_rewritten(room):
    held = room.send(encapsulated_pdf(make_pdf("x"), patient_id="Q8", patient_name="QUEUE^EIGHT"))
    with pytest.raises(ReconcileError, match="birth"):
        room.rec.new_patient(held.held_item, birth_date="02.01.1980", who="desk")
    with pytest.raises(ReconcileError, match="backslash"):
        room.rec.new_patient(held.held_item, patient_id="A\\B", who="desk")
    assert room.rec.item(held.held_item)["status"] == "held"
    room.rec.new_patient(held.held_item, birth_date="1980-01-02", who="desk")
    row = room.archive.index.conn.execute("SELECT patient_birth_date FROM patients WHERE patient_id='Q8'").fetchone()
    assert row[0] == "19800102"


def test_the_scrub_checks_held_objects_too(room):
    from clinicbox.jobs.integrity import scrub

    held = room.send(encapsulated_pdf(make_pdf("x"), patient_id="Q9", patient_name="QUEUE^NINE"))
    (h,) = room.archive.index.held(held.sop_instance_uid)
    path = room.archive.store.abspath(h["path"])
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    figures = scrub(room.archive)
    assert figures["damaged"] == 1 and figures["problems"][0]["sop_instance_uid"] == held.sop_instance_uid

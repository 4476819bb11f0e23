"""EMR/capture intake and the reconciliation queue, end to end with independent peers.

DCMTK storescu sends as the EMR, the capture station and the CT; DCMTK findscu/getscu (as a
viewer) show what query/retrieve sees before and after staff decide through the CLI; dicom3tools
dciodvfy checks that rewritten objects gained no errors.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from clinicbox.reconcile.match import person_key
from tests.support.docs import encapsulated_pdf, make_pdf, sc_scan, vl_photo
from tests.support.peers import ClinicBox, dcmtk
from tests.support.synth import ORG_ROOT, ct_dataset

pytestmark = pytest.mark.xdist_group("intake")

EMR, CAPTURE, CT, VIEWER = "EMR1", "CAPTURE1", "CT1", "VIEWER1"
TODAY = datetime.now().strftime("%Y-%m-%d")


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("intake")
    config = tmp / "clinicbox.toml"
    config.write_text("[reconcile]\ntrash_days = 0\n")
    box = ClinicBox(tmp / "data", config=config).start()
    try:
        for name, ae, role in (("EMR", EMR, "emr"), ("SCANNER", CAPTURE, "capture"), ("CT-ROOM", CT, "modality"),
                               ("VIEWER", VIEWER, "workstation")):
            box.cli("devices", "add", name, "--ae", ae, "--host", "127.0.0.1", "--port", "104", "--role", role)
        box.tmp = tmp
        box.config_file = config
        box.orders = {}
        for pid, name, birth, sex, modality in (("P100", "DOE^JANE", "1980-02-03", "F", "US"),
                                                ("P200", "ROE^RICHARD", "1955-07-14", "M", "CT")):
            r = box.cli("worklist", "add", "--patient-id", pid, "--patient-name", name, "--birth-date", birth,
                        "--sex", sex, "--modality", modality, "--station-ae", CT, "--at", f"{TODAY} 09:00",
                        "--procedure", f"{modality} exam", "--json")
            box.orders[pid] = json.loads(r.stdout)
        yield box
    finally:
        box.stop()


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def send(box: ClinicBox, aet: str, *files: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "CLINICBOX", "127.0.0.1", str(box.port),
                        *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + box.log()[-2000:]
    assert "Success" not in r.stderr or "Failed" not in r.stderr
    return r


def findscu(box: ClinicBox, out: Path, *keys: str) -> list[Dataset]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = subprocess.run([dcmtk("findscu"), "-S", "-aet", VIEWER, "-aec", "CLINICBOX", "-X", "-od", str(out),
                        "127.0.0.1", str(box.port), *[a for k in keys for a in ("-k", k)]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def getscu(box: ClinicBox, out: Path, *keys: str) -> list[Dataset]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = subprocess.run([dcmtk("getscu"), "-S", "-aet", VIEWER, "-aec", "CLINICBOX", "-od", str(out), "127.0.0.1",
                        str(box.port), *[a for k in keys for a in ("-k", k)]], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def study_keys(study_uid: str) -> list[str]:
    return ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}", "PatientID", "PatientName",
            "AccessionNumber", "NumberOfStudyRelatedInstances"]


def queue(box: ClinicBox, status: str = "held") -> list[dict]:
    return json.loads(box.cli("reconcile", "list", "--status", status, "--json").stdout)


def item_for(box: ClinicBox, study_uid: str) -> dict:
    items = [i for i in queue(box) if i["study_instance_uid"] == study_uid]
    assert len(items) == 1, items
    return items[0]


def dciodvfy_errors(path: Path) -> set[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install dicom3tools (apt-get install -y dicom3tools)")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")}


def audit(box: ClinicBox) -> list[dict]:
    conn = sqlite3.connect(box.data_dir / "index.sqlite3")
    try:
        return [{"who": w, "action": a, "detail": json.loads(d)}
                for w, a, d in conn.execute("SELECT who, action, detail FROM audit_log ORDER BY id")]
    finally:
        conn.close()


def released_intact(box: ClinicBox, original: Path, study_uid: str, out: Path) -> Dataset:
    """Retrieve the released object with getscu; same SOP Instance UID, no new dciodvfy errors."""
    sent = pydicom.dcmread(original)
    got = getscu(box, out, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}")
    assert [d.SOPInstanceUID for d in got] == [sent.SOPInstanceUID]
    retrieved = sorted(out.iterdir())[0]
    new_errors = dciodvfy_errors(retrieved) - dciodvfy_errors(original)
    assert not new_errors, new_errors
    return got[0]


# --- the five kinds of arrival -----------------------------------------------------------------

def test_pdf_matched_on_patient_id_and_accession(box):
    accession = box.orders["P100"]["accession_number"]
    pdf = make_pdf("Referral letter for an abdominal ultrasound")
    path = write(encapsulated_pdf(pdf, patient_id="P100", patient_name="Doe^Jane", birth_date="19800203",
                                  accession=accession, title="Referral letter"), box.tmp / "pdf" / "referral.dcm")
    send(box, EMR, path)
    sent = pydicom.dcmread(path)
    assert not [i for i in queue(box) if i["study_instance_uid"] == sent.StudyInstanceUID]
    found = findscu(box, box.tmp / "f-pdf", "QueryRetrieveLevel=STUDY", "PatientID=P100",
                    f"AccessionNumber={accession}", "StudyInstanceUID", "PatientName")
    assert sent.StudyInstanceUID in [d.StudyInstanceUID for d in found]
    order = json.loads(box.cli("worklist", "show", accession, "--json").stdout)
    assert order["images"] >= 1, order
    docs = json.loads(box.cli("documents", "list", "--patient-id", "P100", "--json").stdout)
    assert [d["title"] for d in docs if d["sop_instance_uid"] == sent.SOPInstanceUID] == ["Referral letter"]
    studies = json.loads(box.cli("studies", "--patient-id", "P100", "--json").stdout)
    assert "Referral letter" in [s["documents"] for s in studies]
    out = box.tmp / "exported.pdf"
    r = box.cli("documents", "export", sent.SOPInstanceUID, "--to", str(out))
    assert "PDF" in r.stdout
    assert out.read_bytes() == pdf


def test_photo_with_only_patient_id_and_name_matched_to_the_patient(box):
    path = write(vl_photo(patient_id="P100", patient_name="DOE^JANE^^", title="Wound photo"),
                 box.tmp / "photo" / "wound.dcm")
    send(box, CAPTURE, path)
    sent = pydicom.dcmread(path)
    assert not [i for i in queue(box) if i["study_instance_uid"] == sent.StudyInstanceUID]
    found = findscu(box, box.tmp / "f-photo", *study_keys(sent.StudyInstanceUID))
    assert [(d.PatientID, d.StudyInstanceUID) for d in found] == [("P100", sent.StudyInstanceUID)]
    out = box.tmp / "photo-export"
    out.mkdir()
    box.cli("documents", "export", sent.SOPInstanceUID, "--to", str(out))
    png = (out / f"{sent.SOPInstanceUID}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_scan_with_known_id_but_other_name_held_then_assigned(box):
    original = write(sc_scan(patient_id="P100", patient_name="DOE^JOAN", birth_date="19800203", sex="F",
                             title="Scanned consent"), box.tmp / "scan" / "consent.dcm")
    r = send(box, CAPTURE, original)
    assert "Received Store Response (Success)" in r.stderr or r.returncode == 0
    sent = pydicom.dcmread(original)
    item = item_for(box, sent.StudyInstanceUID)
    assert item["kind"] == "conflicting"
    assert any("known with another name" in reason for reason in item["reasons"]), item
    # held: stored, but invisible to query/retrieve
    assert findscu(box, box.tmp / "f-scan0", *study_keys(sent.StudyInstanceUID)) == []
    assert getscu(box, box.tmp / "g-scan0", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={sent.StudyInstanceUID}") == []
    shown = json.loads(box.cli("reconcile", "show", str(item["id"]), "--json").stdout)
    assert [o["sop_instance_uid"] for o in shown["objects_held"]] == [sent.SOPInstanceUID]

    box.cli("reconcile", "assign", str(item["id"]), "--patient-id", "P100", "--by", "desk.anna")
    found = findscu(box, box.tmp / "f-scan1", *study_keys(sent.StudyInstanceUID))
    # the patient as the archive first stored it ("Doe^Jane" from the EMR's letter): the same person
    assert [(d.PatientID, person_key(str(d.PatientName))) for d in found] == [("P100", "DOE^JANE")]
    got = released_intact(box, original, sent.StudyInstanceUID, box.tmp / "g-scan1")
    assert str(got.PatientName) == "DOE^JANE"
    oas = got.OriginalAttributesSequence[-1]
    assert oas.ReasonForTheAttributeModification == "CORRECT"
    assert oas.ModifyingSystem == "ClinicBox"
    assert str(oas.ModifiedAttributesSequence[0].PatientName) == "DOE^JOAN"
    assert CAPTURE in oas.SourceOfPreviousValues
    assert queue(box, "assigned")[-1]["decided_by"] == "desk.anna"
    assert {"who": "desk.anna", "action": "reconcile assign"}.items() <= audit(box)[-1].items()


def test_unknown_patient_held_then_accepted_as_new_patient(box):
    original = write(encapsulated_pdf(make_pdf("Outside report"), patient_id="P900", patient_name="NOBODY^KNOWN",
                                      title="Outside report"), box.tmp / "unknown" / "report.dcm")
    send(box, EMR, original)
    sent = pydicom.dcmread(original)
    item = item_for(box, sent.StudyInstanceUID)
    assert (item["kind"], item["reasons"]) == ("unknown", ["no patient with ID P900 is known"])
    assert findscu(box, box.tmp / "f-unk0", *study_keys(sent.StudyInstanceUID)) == []
    # staff may look at the held document before deciding
    box.cli("documents", "export", sent.SOPInstanceUID, "--to", str(box.tmp / "held.pdf"))
    assert (box.tmp / "held.pdf").read_bytes().startswith(b"%PDF-1.4")

    box.cli("reconcile", "new-patient", str(item["id"]), "--name", "KNOWN^NOBODY", "--by", "desk.ben")
    found = findscu(box, box.tmp / "f-unk1", *study_keys(sent.StudyInstanceUID))
    assert [(d.PatientID, str(d.PatientName)) for d in found] == [("P900", "KNOWN^NOBODY")]
    got = released_intact(box, original, sent.StudyInstanceUID, box.tmp / "g-unk1")
    assert str(got.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0].PatientName) == "NOBODY^KNOWN"
    assert audit(box)[-1]["action"] == "reconcile new-patient"


def test_modality_image_disagreeing_with_its_order_held_then_assigned_to_the_order(box):
    order = box.orders["P200"]
    accession = order["accession_number"]
    ds = ct_dataset(generate_uid(prefix=ORG_ROOT), generate_uid(prefix=ORG_ROOT), 1, rows=8, cols=8,
                    patient_id="P200", patient_name="ROE^RICHARDO")  # typed at the CT, misspelt
    ds.AccessionNumber = accession
    ds.PatientBirthDate, ds.PatientSex = "19550714", "M"
    original = write(ds, box.tmp / "ct" / "ct1.dcm")
    send(box, CT, original)
    item = item_for(box, ds.StudyInstanceUID)
    assert item["kind"] == "conflicting"
    assert any(f"order with accession {accession}" in reason for reason in item["reasons"]), item

    box.cli("reconcile", "assign", str(item["id"]), "--patient-id", "P200", "--accession", accession)
    study_uid = json.loads(box.cli("worklist", "show", accession, "--json").stdout)["study_instance_uid"]
    found = findscu(box, box.tmp / "f-ct", "QueryRetrieveLevel=STUDY", f"AccessionNumber={accession}",
                    "StudyInstanceUID", "PatientID", "PatientName")
    assert [(d.StudyInstanceUID, d.PatientID, str(d.PatientName)) for d in found] == [
        (study_uid, "P200", "ROE^RICHARD")]
    got = released_intact(box, original, study_uid, box.tmp / "g-ct")
    modified = got.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
    assert str(modified.PatientName) == "ROE^RICHARDO"
    assert modified.StudyInstanceUID == ds.StudyInstanceUID  # the study UID the CT made up, kept
    order = json.loads(box.cli("worklist", "show", accession, "--json").stdout)
    assert order["images"] == 1, order


def test_rejected_item_stays_invisible_then_the_retention_job_removes_it(box):
    original = write(sc_scan(patient_id="P100", patient_name="SMITH^OTHER", seed=9), box.tmp / "wrong" / "x.dcm")
    send(box, CAPTURE, original)
    sent = pydicom.dcmread(original)
    item = item_for(box, sent.StudyInstanceUID)
    held_path = box.data_dir / json.loads(box.cli("reconcile", "show", str(item["id"]), "--json").stdout)[
        "objects_held"][0]["path"]
    assert held_path.exists()
    box.cli("reconcile", "reject", str(item["id"]), "--reason", "another clinic's patient", "--by", "desk.anna")
    assert findscu(box, box.tmp / "f-rej", *study_keys(sent.StudyInstanceUID)) == []
    refused = box.cli("reconcile", "assign", str(item["id"]), "--patient-id", "P100", check=False)
    assert refused.returncode == 1 and "already rejected" in refused.stderr
    # trash_days = 0 in this box's config: the next retention run empties the trash
    box.cli("jobs", "run", "retention", "--config", str(box.config_file))
    assert not held_path.exists()
    assert [i["status"] for i in queue(box, "all") if i["id"] == item["id"]] == ["expired"]
    assert [a["action"] for a in audit(box)][-2:] == ["reconcile reject", "reconcile expire"]


def test_storescu_gets_success_for_held_objects_and_resends_are_duplicates(box):
    original = write(encapsulated_pdf(make_pdf("Again"), patient_id="P901", patient_name="AGAIN^SENT"),
                     box.tmp / "again" / "a.dcm")
    send(box, EMR, original)
    send(box, EMR, original)  # the EMR retries: still one held object
    sent = pydicom.dcmread(original)
    item = item_for(box, sent.StudyInstanceUID)
    assert item["held"] == 1


# --- a burst ---------------------------------------------------------------------------------------

def test_burst_of_500_mixed_objects_from_3_senders_loses_nothing_and_misfiles_nothing(box):
    """EMR (match), capture station (match) and CT (check) send at once: known patients with the right
    and a wrong name, unknown patients, and new patients both the CT and the EMR introduce under the
    same ID with different names (whoever comes first, the other must not join them)."""
    folder = box.tmp / "burst"
    claims: dict[str, tuple[str, str]] = {}
    sender_of: dict[str, str] = {}
    kind_of: dict[str, str] = {}
    per_sender = {EMR: [], CAPTURE: [], CT: []}
    pdf = make_pdf("burst")
    for n in range(500):
        sender = (EMR, CAPTURE, CT)[n % 3]
        kind = n % 5
        if kind == 0:
            pid, name = "P100", "DOE^JANE"                   # known, agrees
        elif kind == 1:
            pid, name = "P100", f"DOE^JANET{n}"              # known, another name
        elif kind == 2:
            pid, name = f"U{n}", f"UNKNOWN^N{n}"             # nobody knows them
        else:
            k = n // 15
            pid = f"RACE{k}"                                 # a new patient, names differ by sender
            name = f"RACE^{sender}"
        if sender == EMR:
            ds = encapsulated_pdf(pdf, patient_id=pid, patient_name=name, title=f"doc {n}")
        elif sender == CAPTURE:
            ds = vl_photo(patient_id=pid, patient_name=name, size=8, seed=n) if n % 2 else \
                sc_scan(patient_id=pid, patient_name=name, size=8, seed=n)
        else:
            ds = ct_dataset(generate_uid(prefix=ORG_ROOT), generate_uid(prefix=ORG_ROOT), 1, rows=8, cols=8,
                            patient_id=pid, patient_name=name, seed=n)
            ds.AccessionNumber = ds.PatientBirthDate = ""
        claims[ds.SOPInstanceUID] = (pid, name)
        sender_of[ds.SOPInstanceUID] = sender
        kind_of[ds.SOPInstanceUID] = ("agrees", "conflict", "unknown", "new", "new")[kind]
        per_sender[sender].append(write(ds, folder / sender / f"{n:04d}.dcm"))

    errors = []

    def run(sender):
        try:
            send(box, sender, *per_sender[sender])
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in per_sender]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    conn = sqlite3.connect(box.data_dir / "index.sqlite3")
    try:
        filed = {uid: (pid, name) for uid, pid, name in conn.execute(
            "SELECT i.sop_instance_uid, p.patient_id, p.patient_name FROM instances i"
            " JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
            " JOIN patients p ON p.id = s.patient_pk")}
        held = [r[0] for r in conn.execute("SELECT sop_instance_uid FROM held_objects")]
    finally:
        conn.close()
    burst_filed = {u: v for u, v in filed.items() if u in claims}
    burst_held = [u for u in held if u in claims]
    # none lost: every object is filed or held, exactly once
    assert len(burst_held) == len(set(burst_held))
    assert set(burst_filed) | set(burst_held) == set(claims)
    assert not set(burst_filed) & set(burst_held)
    # none misfiled: a filed object sits under the patient it names, with the name it carries
    wrong = {u: (claims[u], v) for u, v in burst_filed.items()
             if v[0] != claims[u][0] or person_key(v[1]) != person_key(claims[u][1])}
    assert not wrong, list(wrong.items())[:5]
    # and the rules held: agreeing objects filed; conflicts held; unknown patients held from the EMR and
    # the capture station (match), filed from the CT (check); a new patient the CT filed is not joined
    # by the EMR's or the capture station's objects that give another name
    for u, (pid, name) in claims.items():
        expect_held = {"agrees": False, "conflict": True}.get(kind_of[u], sender_of[u] != CT)
        assert (u in burst_held) == expect_held, (kind_of[u], sender_of[u], pid, name)

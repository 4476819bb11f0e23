"""C-FIND SCP (Patient Root and Study Root) with DCMTK findscu as the independent client."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support.peers import ClinicBox, dcmtk
from tests.support.synth import ORG_ROOT, ct_dataset

STUDIES = [  # patient id, name, date, modality, series count, instances per series
    ("FND1", "Doe^John", "20240115", "CT", 2, 3),
    ("FND2", "Doe^Jane", "20240620", "MR", 1, 2),
    ("FND3", "Müller^Jürgen", "20241231", "US", 1, 1),
]


def _populate(box: ClinicBox, tmp: Path) -> dict:
    uids = {}
    folder = tmp / "in"
    folder.mkdir()
    for pid, name, date, modality, nseries, per in STUDIES:
        study = pydicom.uid.generate_uid(prefix=ORG_ROOT)
        uids[pid] = {"study": study, "series": []}
        for s in range(nseries):
            series = pydicom.uid.generate_uid(prefix=ORG_ROOT)
            uids[pid]["series"].append(series)
            for n in range(1, per + 1):
                ds = ct_dataset(study, series, n, rows=4, cols=4, patient_id=pid, patient_name=name)
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.StudyDate, ds.Modality, ds.SeriesNumber = date, modality, s + 1
                ds.save_as(folder / f"{pid}-{s}-{n}.dcm", enforce_file_format=True)
    r = box.cli("import", str(folder))
    assert "rejected 0" in r.stdout, r.stdout + r.stderr
    return uids


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("find")
    box = ClinicBox(tmp / "data").start()
    box.cli("devices", "add", "FINDER", "--ae", "FINDSCU", "--host", "127.0.0.1", "--port", "11113")
    uids = _populate(box, tmp)
    yield box, uids, tmp
    box.stop()


def findscu(box, tmp, *args, model="-S", expect_rc=0, verbose=False):
    out = tmp / f"rsp-{abs(hash(args))}"
    out.mkdir(exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    r = subprocess.run([dcmtk("findscu"), model, *(["-v"] if verbose else []), "-aec", "CLINICBOX", "-X", "-od", str(out), "127.0.0.1",
                        str(box.port), *[a for k in args for a in ("-k", k)]], capture_output=True, text=True)
    assert r.returncode == expect_rc, r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], r


def test_study_level_wildcard_returns_requested_and_computed_keys(archive):
    box, uids, tmp = archive
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=STUDY", "PatientName=Doe*", "StudyInstanceUID=",
                         "StudyDate=", "ModalitiesInStudy=", "NumberOfStudyRelatedInstances=",
                         "NumberOfStudyRelatedSeries=", "AccessionNumber=")
    got = {str(a.PatientName): a for a in answers}
    assert set(got) == {"Doe^John", "Doe^Jane"}
    john = got["Doe^John"]
    assert john.StudyInstanceUID == uids["FND1"]["study"]
    assert (john.NumberOfStudyRelatedSeries, john.NumberOfStudyRelatedInstances) == (2, 6)
    assert john.ModalitiesInStudy == "CT" and john.AccessionNumber == "ACC0001"
    asked = {"QueryRetrieveLevel", "PatientName", "StudyInstanceUID", "StudyDate", "ModalitiesInStudy",
             "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "AccessionNumber",
             "SpecificCharacterSet"}
    assert {e.keyword for e in john} <= asked, "answers carry exactly the requested keys"


def test_case_insensitive_names_and_date_range(archive):
    box, _uids, tmp = archive
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=STUDY", "PatientName=doe*", "StudyDate=20240601-")
    assert [str(a.PatientName) for a in answers] == ["Doe^Jane"]


def test_patient_root_patient_level(archive):
    box, _uids, tmp = archive
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=PATIENT", "PatientID=FND1", "PatientName=",
                         "NumberOfPatientRelatedStudies=", "NumberOfPatientRelatedInstances=", model="-P")
    (a,) = answers
    assert (str(a.PatientName), a.NumberOfPatientRelatedStudies, a.NumberOfPatientRelatedInstances) == \
        ("Doe^John", 1, 6)


def test_series_and_image_levels(archive):
    box, uids, tmp = archive
    study = uids["FND1"]["study"]
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                         "SeriesInstanceUID=", "Modality=", "SeriesNumber=", "NumberOfSeriesRelatedInstances=")
    assert sorted(a.SeriesNumber for a in answers) == [1, 2]
    assert all(a.NumberOfSeriesRelatedInstances == 3 and a.Modality == "CT" for a in answers)
    series = uids["FND1"]["series"][0]
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                         f"SeriesInstanceUID={series}", "SOPInstanceUID=", "InstanceNumber=", "Rows=")
    assert sorted(a.InstanceNumber for a in answers) == [1, 2, 3]
    assert all(a.Rows == 4 for a in answers), "keys without a column come from the stored header"


@pytest.mark.parametrize("charset, encoding", [("ISO_IR 192", "utf-8"), ("ISO_IR 100", "latin-1")])
def test_non_ascii_name_in_both_character_sets(archive, charset, encoding):
    box, _uids, tmp = archive
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=STUDY", f"SpecificCharacterSet={charset}",
                         "PatientName=M*", "PatientID=")
    (a,) = answers
    assert a.SpecificCharacterSet == charset
    assert str(a.PatientName) == "Müller^Jürgen"
    assert a["PatientName"].value.original_string == "Müller^Jürgen".encode(encoding)


def test_relational_query_refused(archive):
    box, _uids, tmp = archive
    answers, r = findscu(box, tmp, "QueryRetrieveLevel=SERIES", "Modality=CT", "SeriesInstanceUID=", verbose=True)
    assert answers == []
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in r.stderr  # DCMTK's name for 0xA900
    assert "needs a single StudyInstanceUID" in box.log()


def test_answer_cap(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[query]\nmax_results = 2\nallow_from = "any"\n')
    with ClinicBox(tmp_path / "data", config=config) as box:
        _populate(box, tmp_path)
        answers, _ = findscu(box, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=")
        assert len(answers) == 2


def test_unknown_callers_may_not_query_by_default(archive):
    box, _uids, tmp = archive
    r = subprocess.run([dcmtk("findscu"), "-S", "-aet", "STRANGER", "-aec", "CLINICBOX", "127.0.0.1", str(box.port),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID="], capture_output=True, text=True)
    assert r.returncode != 0
    assert "STRANGER may not query/retrieve" in box.log()


def test_devices_cli(tmp_path):
    box = ClinicBox(tmp_path / "data")
    r = box.cli("devices", "add", "US-ROOM-1", "--ae", "US_ROOM1", "--host", "10.0.0.5", "--port", "104",
                "--role", "modality")
    assert r.returncode == 0, r.stderr
    rows = json.loads(box.cli("devices", "list", "--json").stdout)
    assert [(d["name"], d["ae_title"], d["host"], d["port"], d["role"]) for d in rows] == \
        [("US-ROOM-1", "US_ROOM1", "10.0.0.5", 104, "modality")]
    assert "US-ROOM-1" in box.cli("devices", "list").stdout
    bad = box.cli("devices", "add", "X", "--ae", "WAY_TOO_LONG_AE_TITLE", "--host", "h", "--port", "1", check=False)
    assert bad.returncode == 2 and "--ae" in bad.stderr
    assert box.cli("devices", "remove", "US-ROOM-1").returncode == 0
    assert box.cli("devices", "remove", "US-ROOM-1", check=False).returncode == 1
    assert json.loads(box.cli("devices", "list", "--json").stdout) == []


def test_orthanc_queries_clinicbox(archive):
    """Orthanc (Debian's, a real and independent Q/R client) finds ClinicBox's studies."""
    from tests.support.orthanc import Orthanc
    box, uids, tmp = archive
    box.cli("devices", "add", "ORTHANC-PEER", "--ae", "ORTHANC", "--host", "127.0.0.1", "--port", "4242")
    with Orthanc(tmp / "orthanc", modalities={"clinicbox": ["CLINICBOX", "127.0.0.1", box.port]}) as orthanc:
        q = orthanc.rest("POST", "/modalities/clinicbox/query",
                         {"Level": "Study", "Query": {"PatientName": "doe*", "StudyInstanceUID": "",
                                                      "NumberOfStudyRelatedInstances": ""}})
        answers = orthanc.rest("GET", f"/queries/{q['ID']}/answers?expand&simplify")
        got = {a["StudyInstanceUID"]: a for a in answers}
        assert set(got) == {uids["FND1"]["study"], uids["FND2"]["study"]}
        assert got[uids["FND1"]["study"]]["NumberOfStudyRelatedInstances"] == "6"
        q = orthanc.rest("POST", "/modalities/clinicbox/query",
                         {"Level": "Series", "Query": {"StudyInstanceUID": uids["FND1"]["study"],
                                                       "SeriesInstanceUID": "", "Modality": ""}})
        series = orthanc.rest("GET", f"/queries/{q['ID']}/answers?expand&simplify")
        assert sorted(s["SeriesInstanceUID"] for s in series) == sorted(uids["FND1"]["series"])


def test_c_cancel_stops_a_long_answer(tmp_path):
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from tests.support.synth import ct_dataset
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(1200):
        ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                        rows=2, cols=2, patient_id=f"C{n:04d}")
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    config = tmp_path / "c.toml"
    config.write_text('[query]\nallow_from = "any"\nmax_results = 5000\n')
    with ClinicBox(tmp_path / "data", config=config) as box:
        assert "imported 1200" in box.cli("import", str(folder)).stdout
        # A raw client (message framing only) sends the C-CANCEL as soon as the first answer is in.
        # (pynetdicom drops a C-CANCEL that arrives before the request is being served.)
        from pynetdicom.dsutils import encode

        from clinicbox.dicom.scu import Scu, command_value, find_command

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.PatientID = ""
        scu = Scu("127.0.0.1", box.port, "CANCELLER", "CLINICBOX")
        scu.associate([(str(FIND), ["1.2.840.10008.1.2.1"])])
        cx = scu.accepted[0]
        cancel = struct.pack("<HHIH", 0, 0x0100, 2, 0x0FFF) + struct.pack("<HHIH", 0, 0x0120, 2, 7) \
            + struct.pack("<HHIH", 0, 0x0800, 2, 0x0101)
        cancel = struct.pack("<HHII", 0, 0, 4, len(cancel)) + cancel
        scu.send_message(cx.context_id, find_command(str(FIND), 7), encode(query, False, True))
        pending, final = 0, None
        while final is None:
            command, _data = scu.read_message()
            status = command_value(command, 0x0900)
            if status in (0xFF00, 0xFF01):
                pending += 1
                if pending == 1:
                    scu.send_message(cx.context_id, cancel)
            else:
                final = status
        scu.release()
        assert final == 0xFE00, hex(final or 0)
        assert pending < 1200
        assert "cancelled after" in box.log()


def test_each_matching_rule_through_findscu(archive):
    box, uids, tmp = archive

    def patients(*keys, model="-S"):
        answers, _ = findscu(box, tmp, "QueryRetrieveLevel=STUDY", "PatientID=", *keys, model=model)
        return sorted(str(a.PatientID) for a in answers)

    assert patients("PatientName=Doe^J?hn") == ["FND1"]                       # ? wildcard
    assert patients("StudyDate=-20240131") == ["FND1"]                        # open start
    assert patients("StudyDate=20240101-20240630") == ["FND1", "FND2"]        # A-B
    assert patients(f"StudyInstanceUID={uids['FND1']['study']}\\{uids['FND3']['study']}") == ["FND1", "FND3"]
    assert patients("PatientID=FND2") == ["FND2"]                             # single value
    assert patients("ModalitiesInStudy=US") == ["FND3"]


def test_patient_root_study_series_image_levels(archive):
    box, uids, tmp = archive
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=STUDY", "PatientID=FND1", "StudyInstanceUID=",
                         "NumberOfStudyRelatedInstances=", model="-P")
    (a,) = answers
    assert a.StudyInstanceUID == uids["FND1"]["study"] and a.NumberOfStudyRelatedInstances == 6
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=SERIES", "PatientID=FND1",
                         f"StudyInstanceUID={uids['FND1']['study']}", "SeriesInstanceUID=", model="-P")
    assert sorted(a.SeriesInstanceUID for a in answers) == sorted(uids["FND1"]["series"])
    answers, _ = findscu(box, tmp, "QueryRetrieveLevel=IMAGE", "PatientID=FND1",
                         f"StudyInstanceUID={uids['FND1']['study']}",
                         f"SeriesInstanceUID={uids['FND1']['series'][1]}", "SOPInstanceUID=", model="-P")
    assert len(answers) == 3
    # patient root without the patient's ID at study level: refused as the hierarchy demands
    answers, r = findscu(box, tmp, "QueryRetrieveLevel=STUDY", "StudyInstanceUID=", model="-P", verbose=True)
    assert answers == [] and "DataSetDoesNotMatchSOPClass" in r.stderr

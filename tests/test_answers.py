"""The answer writer: byte-identical to pydicom/pynetdicom encoding, PDUs within the peer's limit."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode

from clinicbox.archive.encode import encode_dataset
from clinicbox.dicom.answers import pdus, command_set


def _qr_answer() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller^Jürgen=ミュラー^ユルゲン"
    ds.PatientID = "X1"
    ds.StudyInstanceUID = "1.2.3.4.5"  # odd length: padded with NUL
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.NumberOfStudyRelatedInstances = 12
    ds.StudyDescription = ""
    ds.Rows = 512  # not a string element: written by pydicom
    ds.ReferencedStudySequence = []
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "US-ABD", "Abdomen"
    ds.ProcedureCodeSequence = [item, Dataset()]
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_encoded_answers_match_pydicom(implicit):
    for charset in ("ISO_IR 192", "ISO_IR 100", None):
        ds = _qr_answer()
        if charset is None:
            del ds.SpecificCharacterSet
            ds.PatientName = "DOE^JOHN"
        elif charset == "ISO_IR 100":
            ds.SpecificCharacterSet = charset
            ds.PatientName = "Müller^Jürgen"
        assert encode_dataset(ds, implicit) == encode(ds, implicit, True, False), charset


def test_command_set_matches_pynetdicom():
    from pynetdicom.dimse_messages import C_FIND_RSP

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.31"
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(b"\x00\x00")  # any identifier: the command says a data set follows
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    ours = command_set("1.2.840.10008.5.1.4.31", 0x8020, 7, 0xFF00)
    theirs = encode(msg.command_set, True, True)
    # the data set type value differs by convention only (any value but 0x0101 means "present")
    assert ours.replace(struct.pack("<HHIH", 0, 0x800, 2, 1), b"") == \
        theirs.replace(struct.pack("<HHIH", 0, 0x800, 2, msg.command_set.CommandDataSetType), b"")
    assert msg.command_set.CommandDataSetType != 0x0101


def test_pdus_respect_the_peers_maximum_and_reassemble():
    data = bytes(range(256)) * 40  # 10,240 bytes
    parts = pdus(3, data, False, 4096)
    assert len(parts) == 3
    body = b""
    for n, pdu in enumerate(parts):
        kind, _, length = struct.unpack(">BBI", pdu[:6])
        assert kind == 0x04 and length == len(pdu) - 6 and length <= 4096
        item_len, cx, header = struct.unpack(">IBB", pdu[6:12])
        assert cx == 3 and item_len == length - 4
        assert header == (0x02 if n == len(parts) - 1 else 0x00)  # data set; last fragment flagged
        body += pdu[12:]
    assert body == data
    [whole] = pdus(1, b"abcd", True, 0)  # 0: the peer sets no limit
    assert whole[11] == 0x03  # command, last fragment


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("asked", [[], ["ISO_IR 100"], ["ISO_IR 192"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]])
def test_qr_answers_from_rows_match_the_data_set_path(tmp_path, implicit, asked):
    import pydicom

    from clinicbox.archive.ingest import Archive
    from clinicbox.archive.query import QueryOptions, answer_charset, find
    from clinicbox.core.config import StorageSettings
    from tests.support.synth import ORG_ROOT, ct_dataset

    archive = Archive(StorageSettings(data_dir=str(tmp_path / "data")))
    archive.open()
    try:
        for n, (pid, name) in enumerate([("A1", "DOE^JOHN"), ("A2", "Müller^Jürgen"), ("A3", "Wróbel^Łukasz")]):
            study = pydicom.uid.generate_uid(prefix=ORG_ROOT)
            for s in range(2):
                ds = ct_dataset(study, pydicom.uid.generate_uid(prefix=ORG_ROOT), n + 1, rows=4, cols=4,
                                patient_id=pid, patient_name=name)
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.Modality = ("CT", "MR")[s]
                ds.StudyDescription = "Étude" if n else "Plain"
                path = tmp_path / f"{n}-{s}.dcm"
                ds.save_as(path, enforce_file_format=True)
                archive.store_file(path)
        study_keys = ["PatientName", "PatientID", "StudyDate", "StudyDescription", "ModalitiesInStudy",
                      "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                      "StudyInstanceUID", "AccessionNumber"]
        cases = [("PATIENT", "PATIENT", {"PatientID": ""}, ["PatientName", "PatientID", "NumberOfPatientRelatedStudies"]),
                 ("STUDY", "STUDY", {"PatientName": "*"}, study_keys),
                 ("STUDY", "SERIES", {"StudyInstanceUID": ""}, ["Modality", "SeriesNumber", "SeriesInstanceUID",
                                                                "NumberOfSeriesRelatedInstances"])]
        for model, level, match, keys in cases:
            if level == "SERIES":
                match = {"StudyInstanceUID": next(archive.index.conn.execute(
                    "SELECT study_instance_uid FROM studies WHERE study_instance_uid != '' LIMIT 1"))[0]}
            datasets = list(find(archive.index, model, level, dict(match), keys, QueryOptions()))
            for ds in datasets:
                charset = answer_charset([str(e.value) for e in ds if e.VR in ("PN", "LO", "SH") and e.value], asked)
                if charset:
                    ds.SpecificCharacterSet = charset
            rows = list(find(archive.index, model, level, dict(match), keys, QueryOptions(), implicit=implicit,
                             asked_charset=asked))
            assert rows and all(isinstance(r, bytes) for r in rows)
            assert rows == [encode(ds, implicit, True, False) for ds in datasets], (level, asked)
    finally:
        archive.close()

"""C-FIND matching rules turned into SQL, run against a real index built through the ingest path."""

from __future__ import annotations

import pydicom
import pytest

from clinicbox.archive.ingest import Archive
from clinicbox.archive.matching import UnsupportedMatch, condition, where_clause
from clinicbox.core.config import StorageSettings
from tests.support.synth import ORG_ROOT, ct_dataset

PATIENTS = [  # (id, name, birth, study date, study time, accession, modality)
    ("P1", "Doe^John", "19700101", "20240115", "081500", "A100", "CT"),
    ("P2", "Doe^Jane", "19800202", "20240620", "143000", "A200", "MR"),
    ("P3", "Müller^Jürgen", "19900303", "20241231", "235959", "A300", "US"),
    ("P4", "doe^lower", "20000404", "20250101", "000000", "B400", "CT"),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("m")
    archive = Archive(StorageSettings(data_dir=str(tmp / "data")))
    archive.open()
    for pid, name, birth, date, time, acc, mod in PATIENTS:
        ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                        rows=4, cols=4, patient_id=pid, patient_name=name)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.Modality = birth, date, time, acc, mod
        path = tmp / f"{pid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        archive.store_file(path)
    yield archive.index
    archive.close()


def ids(index, identifier, **kw):
    where, params = where_clause(identifier, **kw)
    sql = ("SELECT DISTINCT p.patient_id FROM studies s JOIN patients p ON p.id = s.patient_pk"
           " JOIN series se ON se.study_pk = s.id JOIN instances i ON i.series_pk = se.id WHERE " + where)
    return sorted(r[0] for r in index.conn.execute(sql, params))


@pytest.mark.parametrize("identifier, expected", [
    ({}, ["P1", "P2", "P3", "P4"]),
    ({"PatientName": ""}, ["P1", "P2", "P3", "P4"]),                 # universal
    ({"PatientName": "*"}, ["P1", "P2", "P3", "P4"]),
    ({"PatientID": "P2"}, ["P2"]),                                    # single value
    ({"PatientName": "Doe*"}, ["P1", "P2"]),                          # wildcard, case-sensitive
    ({"PatientName": "Doe^Ja?e"}, ["P2"]),
    ({"PatientName": "Müller*"}, ["P3"]),                             # non-ASCII
    ({"StudyDate": "20240101-20241231"}, ["P1", "P2", "P3"]),         # ranges
    ({"StudyDate": "20240601-"}, ["P2", "P3", "P4"]),
    ({"StudyDate": "-20240115"}, ["P1"]),
    ({"StudyTime": "-0900"}, ["P1", "P4"]),
    ({"StudyTime": "1400-2359"}, ["P2", "P3"]),
    ({"AccessionNumber": "A*"}, ["P1", "P2", "P3"]),
    ({"Modality": "CT"}, ["P1", "P4"]),
    ({"ModalitiesInStudy": ["MR", "US"]}, ["P2", "P3"]),
    ({"PatientID": "P*", "StudyDate": "2025*"}, []),                  # DA takes no wildcard: literal
    ({"PatientBirthDate": "19800202"}, ["P2"]),
])
def test_matching_rules(index, identifier, expected):
    assert ids(index, identifier) == expected


def test_uid_list_matching(index):
    uids = [r[0] for r in index.conn.execute("SELECT study_instance_uid FROM studies ORDER BY id")]
    assert ids(index, {"StudyInstanceUID": [uids[0], uids[2]]}) == ["P1", "P3"]
    assert ids(index, {"StudyInstanceUID": uids[1]}) == ["P2"]


def test_case_insensitive_person_names_is_a_setting(index):
    assert ids(index, {"PatientName": "doe*"}) == ["P4"]
    assert ids(index, {"PatientName": "doe*"}, case_insensitive_names=True) == ["P1", "P2", "P4"]
    assert ids(index, {"PatientName": "DOE^JOHN"}, case_insensitive_names=True) == ["P1"]


def test_sql_special_characters_are_literal(index):
    assert ids(index, {"AccessionNumber": "A%"}) == []
    assert ids(index, {"PatientName": "[D]oe*"}) == []
    assert condition("PatientName", "a_b*", case_insensitive_names=True)[1] == ["a\\_b%"]


def test_unsupported_matching_is_refused():
    with pytest.raises(UnsupportedMatch):
        condition("PatientName", ["A", "B"])
    with pytest.raises(UnsupportedMatch):
        condition("SeriesNumber", "x")

"""The archive room on its own: ingest rule, duplicates, counts, group commit, start-up repair."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pydicom
import pytest

from clinicbox.archive.ingest import Archive, IngestError, StoreOutcome
from clinicbox.archive.parse import InvalidObject, parse_file
from clinicbox.archive.repair import repair
from clinicbox.core.config import StorageSettings
from tests.support.synth import ORG_ROOT, ct_dataset, write_ct_series

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture
def archive(tmp_path):
    a = Archive(StorageSettings(data_dir=str(tmp_path / "data")))
    a.open()
    yield a
    a.close()


def _new_ct(tmp_path: Path, name: str = "x.dcm", **kw) -> Path:
    ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                    rows=8, cols=8, **kw)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_parse_extracts_index_values_and_rejects_truncation(tmp_path):
    parsed = parse_file(TEST_FILES / "CT_small.dcm")
    assert parsed.get("Modality") == "CT" and parsed.get("PatientID") == "1CT1"
    assert parsed.transfer_syntax == "1.2.840.10008.1.2.1"
    assert b"\xe0\x7f" not in parsed.header[-16:]  # pixel data stays out of the header
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(InvalidObject, match="truncated"):
            parse_file(TEST_FILES / name)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes()[:-1])
    with pytest.raises(InvalidObject):
        parse_file(cut)


def test_parse_header_is_readable_by_pydicom():
    parsed = parse_file(TEST_FILES / "MR_small_bigendian.dcm")
    ds = pydicom.dataset.Dataset()
    from pydicom.filereader import read_dataset
    ds = read_dataset(pydicom.filebase.DicomBytesIO(parsed.header), is_implicit_VR=False, is_little_endian=False)
    assert ds.PatientID == parsed.get("PatientID")
    assert "PixelData" not in ds


@pytest.mark.parametrize("name", ["chrFren.dcm", "chrX1.dcm", "chrRuss.dcm", "chrH31.dcm", "chrJapMulti.dcm",
                                  "chrGreek.dcm", "chrKoreanMulti.dcm"])
def test_parse_decodes_character_sets(name):
    path = TEST_FILES.parent / "charset_files" / name
    parsed = parse_file(path)
    assert parsed.get("PatientName") == str(pydicom.dcmread(path).PatientName)


def test_store_index_and_counts(archive, tmp_path):
    paths = write_ct_series(tmp_path / "s", 5, rows=8, cols=8)
    for p in paths:
        assert archive.store_file(p).outcome is StoreOutcome.STORED
    (study,) = archive.index.studies()
    assert (study["num_series"], study["num_instances"], study["modalities_in_study"]) == (1, 5, "CT")
    assert study["size_bytes"] == sum(p.stat().st_size for p in paths)
    assert archive.index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 5}
    assert not any(archive.store.incoming.iterdir())
    # the source files are untouched (import copies)
    assert all(p.exists() for p in paths)


def test_identical_duplicate_adds_nothing(archive, tmp_path):
    p = _new_ct(tmp_path)
    assert archive.store_file(p).outcome is StoreOutcome.STORED
    assert archive.store_file(p).outcome is StoreOutcome.DUPLICATE
    assert archive.index.counts()["instances"] == 1


@pytest.mark.parametrize("policy, outcome, kept_name", [("keep-first", StoreOutcome.KEPT_FIRST, "First^Sent"),
                                                          ("replace", StoreOutcome.REPLACED, "Second^Sent")])
def test_same_uid_different_content_follows_policy(tmp_path, policy, outcome, kept_name, caplog):
    a = Archive(StorageSettings(data_dir=str(tmp_path / "data"), duplicate_policy=policy))
    a.open()
    try:
        first = _new_ct(tmp_path, "a.dcm", patient_name="First^Sent")
        ds = pydicom.dcmread(first)
        ds.PatientName = "Second^Sent"
        second = tmp_path / "b.dcm"
        ds.save_as(second)
        a.store_file(first)
        with caplog.at_level("WARNING"):
            assert a.store_file(second).outcome is outcome
        assert "differs from the stored one" in caplog.text
        assert "Sent" not in caplog.text, "no patient names in logs above DEBUG"
        assert a.index.studies()[0]["patient_name"] == kept_name
        assert a.index.counts()["instances"] == 1
        stored = a.store.abspath(a.index.instance(ds.SOPInstanceUID)["path"])
        assert str(pydicom.dcmread(stored).PatientName) == kept_name
        assert len(list(a.store.objects.rglob("*.dcm"))) == 1, "the replaced file is gone, only one left"
    finally:
        a.close()


def test_invalid_file_leaves_nothing(archive, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0" + b"\x08\x00")
    with pytest.raises(IngestError) as exc:
        archive.store_file(bad)
    assert exc.value.kind == "invalid"
    assert not any(archive.store.incoming.iterdir())
    assert archive.index.counts()["instances"] == 0


def test_writer_groups_concurrent_commits(archive, tmp_path):
    paths = write_ct_series(tmp_path / "s", 64, rows=8, cols=8)
    start = archive.writer.commits
    threads = [threading.Thread(target=lambda ps: [archive.store_file(p) for p in ps], args=(paths[i::8],))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert archive.index.counts()["instances"] == 64
    assert archive.writer.commits - start <= 64  # never more commits than writes; usually far fewer
    assert archive.writer.writes >= 64


def test_failed_write_in_a_batch_does_not_undo_the_others(archive):
    def boom(conn):
        raise ValueError("no")
    f1 = archive.writer.submit(lambda conn: conn.execute(
        "INSERT INTO devices (ae_title, first_seen, last_seen) VALUES ('A','x','x')"))
    f2 = archive.writer.submit(boom)
    f1.result()
    with pytest.raises(ValueError):
        f2.result()
    assert [d["ae_title"] for d in archive.index.devices()] == ["A"]


def test_repair_reconciles_disk_and_index(tmp_path):
    settings = StorageSettings(data_dir=str(tmp_path / "data"))
    a = Archive(settings)
    a.open()
    paths = write_ct_series(tmp_path / "s", 4, rows=8, cols=8)
    for p in paths[:3]:
        a.store_file(p)
    rows = sorted(a.index.instance_paths())
    a.close()
    data = tmp_path / "data"
    # 1. a leftover from an unfinished store
    (data / "incoming" / "rx-leftover.part").write_bytes(b"partial")
    # 2. a placed object whose index row never committed
    uid = pydicom.dcmread(paths[3]).SOPInstanceUID
    relpath = a.store.relpath_for(uid)
    (data / relpath).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths[3], data / relpath)
    # 3. an indexed object whose file is gone
    os.unlink(data / rows[0])
    # 4. garbage in objects/
    (data / "objects" / "00" / ("0" * 64 + ".dcm")).write_bytes(b"not dicom")

    b = Archive(settings)
    b.open()
    try:
        report = repair(b)
        assert report.incoming_removed == 1
        assert report.indexed == 1
        assert report.missing == 1
        assert len(report.quarantined) == 1 and (data / "quarantine").is_dir()
        assert b.index.counts()["instances"] == 4
        assert b.index.missing_paths() == {rows[0]}
        # a second repair finds nothing new to do
        again = repair(b)
        assert (again.incoming_removed, again.indexed, again.missing, again.quarantined) == (0, 0, 0, [])
        # re-sending the missing object restores it
        lost = next(p for p in paths[:3] if b.store.relpath_for(pydicom.dcmread(p).SOPInstanceUID) == rows[0])
        assert b.store_file(lost).outcome is StoreOutcome.REPLACED
        assert b.index.missing_paths() == set()
    finally:
        b.close()


def test_failed_replacement_keeps_the_acknowledged_object(tmp_path):
    import sqlite3
    a = Archive(StorageSettings(data_dir=str(tmp_path / "data"), duplicate_policy="replace"))
    a.open()
    try:
        first = _new_ct(tmp_path, "a.dcm", patient_name="First^Sent")
        a.store_file(first)
        ds = pydicom.dcmread(first)
        ds.PatientName = "Second^Sent"
        ds.save_as(tmp_path / "b.dcm")
        conn = sqlite3.connect(a.db_path)
        conn.execute("CREATE TRIGGER fail BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'injected'); END")
        conn.commit()
        conn.close()
        with pytest.raises(IngestError):
            a.store_file(tmp_path / "b.dcm")
        row = a.index.instance(ds.SOPInstanceUID)
        stored = a.store.abspath(row["path"])
        assert str(pydicom.dcmread(stored).PatientName) == "First^Sent"
        from clinicbox.archive.files import file_sha256
        from clinicbox.archive.parse import parse_file as _parse
        assert file_sha256(stored, _parse(stored).dataset_offset) == row["sha256"]
        assert len(list(a.store.objects.rglob("*.dcm"))) == 1
    finally:
        a.close()


def test_hostile_character_set_is_stored_not_crashed_on(archive, tmp_path):
    p = _new_ct(tmp_path)
    data = p.read_bytes().replace(b"ISO_IR 100", b"ISO_IR\x00100")
    bad = tmp_path / "bad-charset.dcm"
    bad.write_bytes(data)
    assert archive.store_file(bad).outcome is StoreOutcome.STORED


def test_dataset_offset_matches_the_parser_even_past_a_long_file_meta(tmp_path):
    from clinicbox.archive.parse import dataset_offset

    checked = 0
    for f in TEST_FILES.glob("*.dcm"):
        try:
            parsed = parse_file(f)
        except InvalidObject:
            continue
        with open(f, "rb") as fh:
            assert dataset_offset(fh) == parsed.dataset_offset, f
        checked += 1
    assert checked > 30
    ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                    rows=4, cols=4)
    path = tmp_path / "long-meta.dcm"
    ds.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3"
    ds.file_meta.PrivateInformation = b"x" * 6000  # pushes the data set past the first 4 KB read
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as fh:
        assert dataset_offset(fh) == parse_file(path).dataset_offset > 6000

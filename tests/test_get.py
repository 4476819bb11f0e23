"""C-GET SCP with DCMTK getscu: objects come back as stored, or decoded when the peer asks so."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from tests.support.peers import ClinicBox, dcmtk
from tests.support.synth import dataset_bytes, write_ct_series

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("get")
    b = ClinicBox(tmp / "data").start()
    b.cli("devices", "add", "GETTER", "--ae", "GETSCU", "--host", "127.0.0.1", "--port", "11113")
    b.series = write_ct_series(tmp / "ct", 5, rows=16, cols=16, patient_id="GET1")
    shutil.copy(TEST_FILES / "SC_rgb_jpeg_gdcm.dcm", tmp / "jpeg-ll.dcm")
    r = b.cli("import", str(tmp / "ct"), str(tmp / "jpeg-ll.dcm"))
    assert "rejected 0" in r.stdout, r.stdout + r.stderr
    b.tmp = tmp
    yield b
    b.stop()


def getscu(box, out: Path, *keys, extra=()):
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([dcmtk("getscu"), "-S", "-v", *extra, "-aec", "CLINICBOX", "-od", str(out), "127.0.0.1",
                        str(box.port), *[a for k in keys for a in ("-k", k)]], capture_output=True, text=True)
    return r, sorted(out.iterdir())


def test_get_study_returns_stored_bytes(box):
    study = pydicom.dcmread(box.series[0]).StudyInstanceUID
    r, files = getscu(box, box.tmp / "got-study", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    assert r.returncode == 0, r.stderr
    assert len(files) == 5, r.stderr
    sent = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in box.series}
    for f in files:
        got = pydicom.dcmread(f)
        assert dataset_bytes(f) == sent[got.SOPInstanceUID]
    assert "Completed Suboperations" in r.stderr or "Received Final C-GET Response" in r.stderr


def test_get_image_level_compressed_object_decoded_for_an_uncompressed_peer(box):
    src = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_gdcm.dcm")
    r, files = getscu(box, box.tmp / "got-jpeg", "QueryRetrieveLevel=IMAGE",
                      f"StudyInstanceUID={src.StudyInstanceUID}", f"SeriesInstanceUID={src.SeriesInstanceUID}",
                      f"SOPInstanceUID={src.SOPInstanceUID}")
    assert r.returncode == 0, r.stderr
    (f,) = files
    got = pydicom.dcmread(f)
    assert got.SOPInstanceUID == src.SOPInstanceUID, "decoding must keep the instance UID"
    assert got.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    assert np.array_equal(got.pixel_array, src.pixel_array)


def test_get_compressed_object_as_stored_when_the_peer_accepts_it(box):
    src = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_gdcm.dcm")
    r, files = getscu(box, box.tmp / "got-jpeg-raw", "QueryRetrieveLevel=IMAGE",
                      f"StudyInstanceUID={src.StudyInstanceUID}", f"SeriesInstanceUID={src.SeriesInstanceUID}",
                      f"SOPInstanceUID={src.SOPInstanceUID}", extra=("+xs",))
    assert r.returncode == 0, r.stderr
    (f,) = files
    assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert dataset_bytes(f) == dataset_bytes(TEST_FILES / "SC_rgb_jpeg_gdcm.dcm")


def test_get_without_study_uid_refused(box):
    r, files = getscu(box, box.tmp / "got-none", "QueryRetrieveLevel=SERIES", "SeriesInstanceUID=1.2.3")
    assert files == []
    assert "needs StudyInstanceUID" in box.log()

"""``clinicbox import``: files, folders, DICOM media with a DICOMDIR, data sets without file meta."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.support.peers import REPO  # noqa: F401
from tests.support.synth import write_ct_series

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def clinicbox(*args, data_dir):
    return subprocess.run([sys.executable, "-m", "clinicbox", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, cwd=REPO)


def test_import_folder_reports_imported_duplicates_rejected(tmp_path):
    folder = tmp_path / "in"
    write_ct_series(folder, 6, rows=8, cols=8, patient_id="IMP1")
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(TEST_FILES / "MR_truncated.dcm", folder / "broken.dcm")
    data = tmp_path / "data"
    r = clinicbox("import", str(folder), data_dir=data)
    assert r.returncode == 0, r.stderr
    assert "imported 6, duplicates 0, rejected 2" in r.stdout
    assert "truncated" in r.stdout and "notes.txt" in r.stderr
    r = clinicbox("import", str(folder), data_dir=data)
    assert "imported 0, duplicates 6, rejected 2" in r.stdout
    studies = json.loads(clinicbox("studies", "--json", "--patient-id", "IMP1", data_dir=data).stdout)
    assert len(studies) == 1 and studies[0]["num_instances"] == 6


def test_import_media_with_dicomdir(tmp_path):
    media = tmp_path / "cdrom"
    shutil.copytree(TEST_FILES / "dicomdirtests", media)
    for extra in media.glob("DICOMDIR?*"):  # keep the one real DICOMDIR of the test media
        extra.unlink()
    ds = pydicom.dcmread(media / "DICOMDIR")
    referenced = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    data = tmp_path / "data"
    r = clinicbox("import", str(media), data_dir=data)
    assert r.returncode == 0, r.stderr
    imported = int(r.stdout.split("imported ")[1].split(",")[0])
    rejected = int(r.stdout.split("rejected ")[1].split()[0])
    assert imported + rejected == len(referenced) and imported >= len(referenced) - 2
    studies = json.loads(clinicbox("studies", "--json", data_dir=data).stdout)
    assert sum(s["num_instances"] for s in studies) == imported


def test_import_data_set_without_file_meta(tmp_path):
    data = tmp_path / "data"
    r = clinicbox("import", str(TEST_FILES / "ExplVR_LitEndNoMeta.dcm"), str(TEST_FILES / "ExplVR_BigEndNoMeta.dcm"),
                  data_dir=data)
    assert "rejected 0" in r.stdout, r.stdout + r.stderr
    assert "imported 1, duplicates 1" in r.stdout or "imported 2" in r.stdout


def test_studies_table_and_empty(tmp_path):
    data = tmp_path / "data"
    assert clinicbox("studies", data_dir=data).stdout.strip() == "no studies"
    write_ct_series(tmp_path / "in", 2, rows=8, cols=8, patient_id="TAB1")
    clinicbox("import", str(tmp_path / "in"), data_dir=data)
    out = clinicbox("studies", data_dir=data).stdout
    assert "TAB1" in out and "CT" in out


def test_import_while_the_service_receives(server, storescu, tmp_path):
    """The CLI and the running service write the same index: both land, nothing is counted twice."""
    import os
    net = write_ct_series(tmp_path / "net", 40, rows=32, cols=32, patient_id="NET1")
    write_ct_series(tmp_path / "imp", 40, rows=32, cols=32, patient_id="IMP2")
    shutil.copy(net[0], tmp_path / "imp" / "also-sent-over-network.dcm")
    sender = subprocess.Popen([storescu, "-aec", "CLINICBOX", "127.0.0.1", str(server.port), *map(str, net)],
                              env={**os.environ, "TCP_NODELAY": "1"}, stderr=subprocess.PIPE, text=True)
    r = clinicbox("import", str(tmp_path / "imp"), data_dir=server.data_dir)
    _out, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err
    assert r.returncode == 0 and "rejected 0" in r.stdout, r.stdout + r.stderr
    studies = {s["patient_id"]: s for s in json.loads(clinicbox("studies", "--json", data_dir=server.data_dir).stdout)}
    assert studies["NET1"]["num_instances"] == 40 and studies["IMP2"]["num_instances"] == 40

"""Synthetic, patient-free DICOM objects for tests and benchmarks (no patient data in the repo)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ORG_ROOT = "1.2.826.0.1.3680043.10.1234."  # test-only UID prefix


def base_dataset(sop_class: str, study_uid: str, series_uid: str, *, modality: str,
                 patient_id: str = "SYN0001", patient_name: str = "Synthetic^Patient",
                 accession: str = "ACC0001", study_description: str = "Synthetic CT",
                 series_description: str = "Axial") -> Dataset:
    """Patient, study, series and SOP common attributes of a synthetic object (no pixel module)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(prefix=ORG_ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "ClinicBox Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def ct_dataset(study_uid: str, series_uid: str, number: int, *, rows: int = 512, cols: int = 512,
               patient_id: str = "SYN0001", patient_name: str = "Synthetic^Patient",
               seed: int | None = None) -> Dataset:
    ds = base_dataset(CTImageStorage, study_uid, series_uid, modality="CT", patient_id=patient_id,
                      patient_name=patient_name)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0, 0, float(number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    rng = np.random.default_rng(seed if seed is not None else number)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def write_ct_series(folder: Path, count: int, *, rows: int = 512, cols: int = 512, **kw) -> list[Path]:
    """Write ``count`` CT instances of one new study/series into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(prefix=ORG_ROOT), generate_uid(prefix=ORG_ROOT)
    paths = []
    for i in range(1, count + 1):
        ds = ct_dataset(study, series, i, rows=rows, cols=cols, **kw)
        ds.AccessionNumber = "A" + study.replace(".", "")[-15:]  # one per study, as an order system gives
        path = folder / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a Part 10 file (everything after the file meta), as stored bytes."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM"
    # (0002,0000) UL group length at 132: tag(4) VR(2) len(2) value(4)
    (group_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + group_length:]

"""Synthetic intake objects as EMRs and capture stations send them (no patient data in the repo):
Encapsulated PDF around a real generated PDF, VL Photographic photos, Secondary Capture scans."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.synth import ORG_ROOT, base_dataset

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_pdf(text: str) -> bytes:
    """A small, valid one-page PDF (A4) showing ``text`` (offsets in the xref table computed)."""
    stream = f"BT /F1 18 Tf 72 760 Td ({text}) Tj ET".encode("latin-1")
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R"
               b" /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _patient_study(ds: Dataset, *, patient_id: str, patient_name: str, birth_date: str, sex: str,
                   accession: str) -> None:
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1


def encapsulated_pdf(pdf: bytes, *, patient_id: str, patient_name: str, birth_date: str = "", sex: str = "",
                     accession: str = "", title: str = "Referral letter", study_uid: str | None = None) -> Dataset:
    study_uid = study_uid or generate_uid(prefix=ORG_ROOT)
    ds = base_dataset(ENCAPSULATED_PDF, study_uid, generate_uid(prefix=ORG_ROOT), modality="DOC",
                      study_description="EMR documents", series_description="Documents")
    _patient_study(ds, patient_id=patient_id, patient_name=patient_name, birth_date=birth_date, sex=sex,
                   accession=accession)
    ds.ConversionType = "WSD"
    ds.AcquisitionDateTime = "20260101120000"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


def vl_photo(*, patient_id: str, patient_name: str, birth_date: str = "", sex: str = "", accession: str = "",
             size: int = 48, seed: int = 1, study_uid: str | None = None, title: str = "Wound photo") -> Dataset:
    study_uid = study_uid or generate_uid(prefix=ORG_ROOT)
    ds = base_dataset(VL_PHOTO, study_uid, generate_uid(prefix=ORG_ROOT), modality="XC",
                      study_description="Photos", series_description=title)
    _patient_study(ds, patient_id=patient_id, patient_name=patient_name, birth_date=birth_date, sex=sex,
                   accession=accession)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.AcquisitionDateTime = "20260101120000"
    ds.AcquisitionContextSequence = []
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8).tobytes()
    return ds


def sc_scan(*, patient_id: str, patient_name: str, birth_date: str = "", sex: str = "", accession: str = "",
            size: int = 64, seed: int = 2, study_uid: str | None = None, title: str = "Scanned consent") -> Dataset:
    study_uid = study_uid or generate_uid(prefix=ORG_ROOT)
    ds = base_dataset(SECONDARY_CAPTURE, study_uid, generate_uid(prefix=ORG_ROOT), modality="OT",
                      study_description="Scanned documents", series_description=title)
    _patient_study(ds, patient_id=patient_id, patient_name=patient_name, birth_date=birth_date, sex=sex,
                   accession=accession)
    ds.ConversionType = "DF"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 256, size=(size, size), dtype=np.uint8).tobytes()
    return ds

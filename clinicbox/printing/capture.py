"""Each printed image box kept in the archive as a Secondary Capture instance (PS3.3 A.8.1).

The page itself is not stored: it is reproducible from these objects and the job's layout
(``clinicbox print reprint``).  The patient/study come from the calling device's procedure step
when there is one; otherwise the patient attributes stay empty and the archive's intake holds
the objects in the reconciliation queue until staff say whose they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class PrintPatient:
    """Who is being printed, from the device's IN PROGRESS (or just completed) procedure step."""

    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    accession: str = ""
    study_instance_uid: str = ""
    modality: str = ""

    @property
    def known(self) -> bool:
        return bool(self.patient_id)


def secondary_capture(pixels: np.ndarray, *, patient: PrintPatient, study_uid: str, series_uid: str, number: int,
                      calling_ae: str, film_label: str, when: datetime) -> Dataset:
    """One image box as a Secondary Capture data set (8-bit MONOCHROME2 or RGB), ready to store."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate, ds.StudyTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    ds.AccessionNumber = patient.accession
    ds.Modality = patient.modality or "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "ClinicBox"
    ds.SecondaryCaptureDeviceManufacturer = "ClinicBox"
    ds.SecondaryCaptureDeviceManufacturerModelName = "print relay"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Printed films"
    ds.SeriesDescription = f"Printed by {calling_ae}"[:64]
    ds.DerivationDescription = f"Image box {number} of a film printed by {calling_ae}"[:1024] + (
        f" ({film_label})" if film_label else "")
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 9000  # apart from the modality's own series
    ds.InstanceNumber = number
    ds.Laterality = ""          # Type 2C; dciodvfy cannot evaluate the condition and wants it present
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"  # films carry the modality's burnt-in text
    ds.ImageType = ["DERIVED", "SECONDARY", "PRINT"]
    rows, cols = pixels.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")
    return ds

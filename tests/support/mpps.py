"""MPPS N-CREATE data sets as a modality fills them from the worklist item it picked."""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset


def worklist_item(*, patient_id: str, patient_name: str, study_uid: str, accession: str, procedure_id: str,
                  step_id: str, procedure: str = "", birth_date: str = "", sex: str = "") -> Dataset:
    """The worklist item a modality would have received for an order (without asking the worklist)."""
    item = Dataset()
    item.PatientName, item.PatientID = patient_name, patient_id
    item.PatientBirthDate, item.PatientSex = birth_date, sex
    item.StudyInstanceUID, item.AccessionNumber = study_uid, accession
    item.RequestedProcedureID, item.RequestedProcedureDescription = procedure_id, procedure
    sps = Dataset()
    sps.ScheduledProcedureStepID, sps.ScheduledProcedureStepDescription = step_id, procedure
    item.ScheduledProcedureStepSequence = [sps]
    return item


def in_progress(item: Dataset, *, station_ae: str, modality: str, description: str = "", station_name: str = "",
                location: str = "") -> Dataset:
    """N-CREATE (IN PROGRESS) of the procedure step the worklist ``item`` schedules."""
    sps = item.ScheduledProcedureStepSequence[0]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ssa = Dataset()
    ssa.StudyInstanceUID = item.StudyInstanceUID
    ssa.ReferencedStudySequence = []
    ssa.AccessionNumber = item.AccessionNumber
    ssa.RequestedProcedureID = item.RequestedProcedureID
    ssa.RequestedProcedureDescription = item.RequestedProcedureDescription
    ssa.ScheduledProcedureStepID = sps.ScheduledProcedureStepID
    ssa.ScheduledProcedureStepDescription = sps.ScheduledProcedureStepDescription
    ssa.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PatientName, ds.PatientID = item.PatientName, item.PatientID
    ds.PatientBirthDate, ds.PatientSex = item.PatientBirthDate, item.PatientSex
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = station_ae
    ds.PerformedStationName = station_name
    ds.PerformedLocation = location
    now = datetime.now()
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = f"{now:%Y%m%d}", f"{now:%H%M%S}"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = description
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ds.PerformedProcedureStepEndTime = None
    ds.Modality = modality
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds

"""DICOM print relay: film session state, rendering, PDF, outputs (CUPS, folder, DICOM printer), archive copies."""

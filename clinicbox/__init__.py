"""ClinicBox: a PACS appliance for small clinics."""

__version__ = "0.1.0"

"""Reconciliation: match incoming EMR/capture objects to patients and orders; the queue of what waits for a person."""

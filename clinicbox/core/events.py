"""Typed events one room tells the others about (they never call back up the layers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceStored:
    """An instance was durably stored and indexed (file fsync'ed, index row committed)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    size: int

"""Is an instance really kept? Indexed, state ok, and its file's data set matches the recorded SHA-256.

Used by storage commitment (a modality deletes its copy only on our word) and, later, the scrub job.
"""

from __future__ import annotations

from dataclasses import dataclass

from clinicbox.archive.files import dataset_sha256
from clinicbox.archive.ingest import Archive
from clinicbox.archive.parse import InvalidObject

# Failure Reason values, PS3.3 C.14.1.1
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Verdict:
    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None  # None: committed

    @property
    def committed(self) -> bool:
        return self.failure_reason is None


def verify_instance(archive: Archive, sop_class_uid: str, sop_instance_uid: str) -> Verdict:
    row = archive.index.instance(sop_instance_uid)
    if row is None or row["state"] != "ok":
        return Verdict(sop_class_uid, sop_instance_uid, NO_SUCH_OBJECT_INSTANCE)
    if row["sop_class_uid"] != sop_class_uid:
        return Verdict(sop_class_uid, sop_instance_uid, CLASS_INSTANCE_CONFLICT)
    path = archive.store.abspath(row["path"])
    try:
        ok = dataset_sha256(path) == row["sha256"]  # the data set as ingest hashed it
    except (OSError, InvalidObject):
        ok = False
    return Verdict(sop_class_uid, sop_instance_uid, None if ok else PROCESSING_FAILURE)

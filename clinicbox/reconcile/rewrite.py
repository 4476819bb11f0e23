"""Rewrite a held object's patient/study attributes, keeping what they replaced (PS3.3 C.12.1.1.9).

The replaced values go into one new item of Original Attributes Sequence (0400,0561): when, by
which system, why (CORRECT: staff reconciled the object) and the Modified Attributes Sequence with
the values as they were.  The SOP Instance UID stays: a patient/study correction does not change
the object's content (PS3.3 C.12.1.1.9.2 and IHE Patient Information Reconciliation keep it); the
Study Instance UID changes only when the object is attached to an order's study.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

MODIFYING_SYSTEM = "ClinicBox"

#: what reconciliation may change, in the order written
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYWORDS = ("AccessionNumber", "StudyInstanceUID")


def _encodable(ds: Dataset, values) -> bool:
    charset = ds.get("SpecificCharacterSet", "") or ""
    charset = charset if isinstance(charset, str) else "\\".join(charset)
    if not any(isinstance(v, str) and not v.isascii() for v in values):
        return True
    if "ISO_IR 192" in charset:
        return True
    if charset.strip() == "ISO_IR 100":
        try:
            for v in values:
                if isinstance(v, str):
                    v.encode("latin-1")
            return True
        except UnicodeEncodeError:
            return False
    return False


def rewrite(src: Path, dest: Path, changes: dict[str, str], *, source: str, now: datetime | None = None) -> bool:
    """Write ``src`` with ``changes`` (keyword -> new value) applied to ``dest``.

    Returns False (and writes nothing) when every value is already what ``changes`` asks for.
    """
    ds = dcmread(src)
    modified = Dataset()
    todo = {}
    for keyword, new in changes.items():
        old = ds.get(keyword)
        old_text = "" if old is None else str(old)
        if old_text == new and (old is not None or new == ""):
            continue
        todo[keyword] = new
        if keyword in ds:
            modified.add(copy.deepcopy(ds[keyword]))  # a copy: setting the new value changes the element
        else:
            setattr(modified, keyword, "")  # was absent: recorded empty
    if not todo:
        return False
    if not _encodable(ds, todo.values()):
        ds.decode()  # every text value to str under the old character set, then re-encoded as UTF-8
        ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, new in todo.items():
        setattr(ds, keyword, new)
    item = Dataset()
    item.SourceOfPreviousValues = source[:64]
    item.AttributeModificationDateTime = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S.%f+0000")
    item.ModifyingSystem = MODIFYING_SYSTEM
    item.ReasonForTheAttributeModification = "CORRECT"
    item.ModifiedAttributesSequence = Sequence([modified])
    if "OriginalAttributesSequence" in ds:
        ds.OriginalAttributesSequence.append(item)
    else:
        ds.OriginalAttributesSequence = Sequence([item])
    ds.save_as(dest, enforce_file_format=True)
    return True

"""Which SOP classes and transfer syntaxes the Storage SCP accepts: all of them pydicom knows."""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class

VERIFICATION = Verification
#: what non-storage services (C-FIND …) accept: the uncompressed syntaxes
NATIVE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
_NOT_STORAGE = ("Storage Commitment", "Media Storage Directory")


@lru_cache(maxsize=1)
def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class pydicom or pynetdicom knows, retired ones included.

    Retired classes matter here: old ultrasound units still send the retired US Image Storage.
    """
    uids = {cx.abstract_syntax for cx in AllStoragePresentationContexts}
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind == "SOP Class" and "Storage" in name and not any(n in name for n in _NOT_STORAGE):
            uids.add(uid)
    return tuple(sorted(uids))


@lru_cache(maxsize=1)
def transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax pydicom knows: native, deflate, JPEG family, JPEG-LS, JPEG 2000,
    HTJ2K, RLE and the MPEG/HEVC video syntaxes. Objects are stored in the one the sender chose."""
    return tuple(str(ts) for ts in AllTransferSyntaxes)


def is_known_uid(uid: str) -> bool:
    """True when pydicom's dictionary knows ``uid`` (then it is not a private SOP class)."""
    return uid in UID_dictionary


_register_lock = threading.Lock()
_registered: set[str] = set()
#: pynetdicom's registry is global and permanent: a peer proposing endless made-up UIDs must not grow it
MAX_PRIVATE_CLASSES = 512


def register_private_storage_class(uid: str) -> bool:
    """Teach pynetdicom to route C-STOREs of a private/unknown SOP class to the storage service.

    Returns False (the class is then not accepted) once MAX_PRIVATE_CLASSES are known.
    """
    with _register_lock:
        if uid in _registered or uid_to_service_class(uid) is StorageServiceClass:
            return True
        if len(_registered) >= MAX_PRIVATE_CLASSES or not all(c in "0123456789." for c in uid):
            return False
        register_uid(uid, "PrivateStorage_" + re.sub(r"[^0-9]", "_", uid), StorageServiceClass)
        _registered.add(uid)
        return True

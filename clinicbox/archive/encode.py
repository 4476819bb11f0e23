"""A small DICOM writer for answers: little endian data sets of string and sequence elements.

C-FIND and worklist answers hold a handful of short string elements and a sequence or two;
pydicom's general writer costs more per element than the whole answer is worth at a few hundred
answers per query.  :func:`encode_dataset` writes such data sets directly (defined lengths
throughout) and hands any other element to pydicom; :func:`header`, :func:`text_bytes` and
:func:`item` write elements from plain Python values, for callers that never build a
:class:`~pydicom.dataset.Dataset`.
"""

from __future__ import annotations

import struct

from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})          # encoded in the character set
_ASCII = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UR"})
_LONG_LENGTH = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_PACK_TAG = struct.Struct("<HH")


def _value_bytes(elem: DataElement, encodings: list[str]) -> bytes | None:
    """The value of a string element as bytes (padded to even length), or None for other VRs."""
    vr, value = elem.VR, elem.value
    if vr not in TEXT_VRS and vr not in _ASCII and vr != "UI":
        return None
    if vr == "PN" and len(encodings) > 1:
        return None  # ISO 2022 code extensions are switched per name component: pydicom knows how
    if value is None or value == "":
        return b""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join("" if v is None else str(v) for v in value)
    else:
        text = str(value)
    if vr in TEXT_VRS:
        data = encode_string(text, encodings)
    else:
        data = text.encode("ascii", "replace")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return _PACK_TAG.pack(group, element) + struct.pack("<I", length)
    if vr in _LONG_LENGTH:
        return _PACK_TAG.pack(group, element) + vr.encode() + b"\0\0" + struct.pack("<I", length)
    return _PACK_TAG.pack(group, element) + vr.encode() + struct.pack("<H", length)


def encode_dataset(ds: Dataset, implicit: bool, encodings: list[str] | None = None) -> bytes:
    """``ds`` encoded little endian (sequences and items with defined lengths)."""
    if encodings is None:
        charset = ds.get("SpecificCharacterSet")
        encodings = convert_encodings(charset) if charset else ["iso8859"]
    out = []
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            elem = ds[tag]
        if elem.VR == "SQ":
            body = b"".join(item(encode_dataset(i, implicit, encodings)) for i in elem.value)
            out.append(header(int(tag), "SQ", len(body), implicit) + body)
            continue
        data = _value_bytes(elem, encodings)
        if data is None or (not implicit and elem.VR not in _LONG_LENGTH and len(data) > 0xFFFF):
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit
            write_data_element(fp, elem, encodings)
            out.append(fp.getvalue())
            continue
        out.append(header(int(tag), elem.VR, len(data), implicit) + data)
    return b"".join(out)


def text_bytes(text: str, vr: str, codec: str) -> bytes:
    """A string value (already joined with backslashes) as padded bytes; ``codec`` for text VRs."""
    data = text.encode(codec, "replace") if vr in TEXT_VRS else text.encode("ascii", "replace")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def item(body: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body

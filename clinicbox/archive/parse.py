"""Check a DICOM Part 10 file's structure and pull out what the index needs, without loading bulk data.

One pass over the encoded data set walks every element by its length (items and sequences of
undefined length included) and proves that the file is complete: pydicom reads a truncated last
element without complaint, so a sender that stopped mid-object would otherwise be "stored".
The walk touches only element headers; pixel data of a 1 GB multi-frame object is skipped by
arithmetic (or fragment by fragment when encapsulated), so memory stays flat.

The same pass extracts the attributes the index keeps as columns, and the *header*: the
encoded top-level elements that are not bulk data, concatenated in the file's own encoding,
which lets query answers be built later without reading the object file.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field


IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_DELIM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_MAX_DEPTH = 32
#: Top-level elements larger than this (encoded) are bulk data and stay out of the header.
BULK_LIMIT = 16 * 1024
#: Longest value taken into an index column (the longest text VR, LT, holds 10,240 characters).
MAX_INDEXED_VALUE = 16 * 1024
#: Largest data set a deflated object may inflate to (a small "deflate bomb" must not exhaust memory).
MAX_INFLATED = 128 * 1024 * 1024

# keyword -> (tag, VR); all are strings, so the value bytes read the same in either byte order.
INDEXED = {
    "SpecificCharacterSet": (0x00080005, "CS"),
    "SOPClassUID": (0x00080016, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "SeriesDate": (0x00080021, "DA"),
    "ContentDate": (0x00080023, "DA"),
    "StudyTime": (0x00080030, "TM"),
    "SeriesTime": (0x00080031, "TM"),
    "ContentTime": (0x00080033, "TM"),
    "AccessionNumber": (0x00080050, "SH"),
    "Modality": (0x00080060, "CS"),
    "Manufacturer": (0x00080070, "LO"),
    "InstitutionName": (0x00080080, "LO"),
    "ReferringPhysicianName": (0x00080090, "PN"),
    "StationName": (0x00081010, "SH"),
    "StudyDescription": (0x00081030, "LO"),
    "SeriesDescription": (0x0008103E, "LO"),
    "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"),
    "IssuerOfPatientID": (0x00100021, "LO"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientSex": (0x00100040, "CS"),
    "BodyPartExamined": (0x00180015, "CS"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "StudyID": (0x00200010, "SH"),
    "SeriesNumber": (0x00200011, "IS"),
    "InstanceNumber": (0x00200013, "IS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "DocumentTitle": (0x00420010, "ST"),
}
_BY_TAG = {tag: (kw, vr) for kw, (tag, vr) in INDEXED.items()}
_TEXT_VRS = frozenset({"LO", "SH", "PN", "ST", "LT", "UT", "UC"})


class InvalidObject(Exception):
    """The file is not a complete, well-formed DICOM object; the message says why (no patient data)."""


@dataclass
class ParsedObject:
    """What the index needs from one object, read without loading its bulk data."""

    transfer_syntax: str
    meta_sop_class_uid: str
    meta_sop_instance_uid: str
    dataset_offset: int
    size: int
    values: dict[str, str] = field(default_factory=dict)
    header: bytes = b""
    header_syntax: str = EXPLICIT_VR_LE
    #: The data set is encoded implicit VR although its transfer syntax says explicit.
    encoding_mismatch: bool = False
    #: Specific Character Set unusable: indexed text was read as Latin-1.
    charset_fallback: bool = False

    def get(self, keyword: str) -> str:
        return self.values.get(keyword, "")


class _Walker:
    """Walks encoded elements in ``buf[...:end]`` by their lengths."""

    def __init__(self, buf, end: int, little: bool) -> None:
        self.buf = buf
        self.end = end
        self.u16 = struct.Struct("<H" if little else ">H").unpack_from
        self.u32 = struct.Struct("<I" if little else ">I").unpack_from
        self.tag_s = struct.Struct("<HH" if little else ">HH").unpack_from
        self.little = little

    def _need(self, pos: int, n: int) -> None:
        if pos + n > self.end:
            raise InvalidObject(f"data set ends inside an element at byte {pos} (truncated)")

    def element(self, pos: int, implicit: bool, depth: int = 0):
        """Return (tag, vr, value_pos, length, next_pos) of the element at ``pos``."""
        self._need(pos, 8)
        g, e = self.tag_s(self.buf, pos)
        tag = (g << 16) | e
        if g == 0xFFFE or implicit:
            vr = None
            (length,) = self.u32(self.buf, pos + 4)
            value_pos = pos + 8
        else:
            vr = bytes(self.buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                self._need(pos, 12)
                (length,) = self.u32(self.buf, pos + 8)
                value_pos = pos + 12
            elif vr.isalpha() and vr.isupper():
                (length,) = self.u16(self.buf, pos + 6)
                value_pos = pos + 8
            else:
                raise InvalidObject(f"element ({g:04X},{e:04X}) at byte {pos} has no valid VR")
        if length == UNDEFINED:
            if g == 0xFFFE:
                raise InvalidObject(f"delimiter ({g:04X},{e:04X}) out of place at byte {pos}")
            # SQ (either VR), UN (content is implicit VR LE), OB/OW encapsulated pixel data.
            inner_implicit = implicit or vr == b"UN"
            walker = self if not (vr == b"UN" and not self.little) else _Walker(self.buf, self.end, True)
            next_pos = walker.sequence(value_pos, inner_implicit, depth + 1)
        else:
            next_pos = value_pos + length
            if next_pos > self.end:
                raise InvalidObject(f"element ({g:04X},{e:04X}) claims {length} bytes, "
                                    f"only {self.end - value_pos} remain (truncated)")
        return tag, vr, value_pos, length, next_pos

    def sequence(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip items until the sequence delimiter; return the position after it."""
        if depth > _MAX_DEPTH:
            raise InvalidObject("sequences nested too deeply")
        while True:
            self._need(pos, 8)
            g, e = self.tag_s(self.buf, pos)
            tag = (g << 16) | e
            (length,) = self.u32(self.buf, pos + 4)
            if tag == SEQ_DELIM:
                return pos + 8
            if tag != ITEM:
                raise InvalidObject(f"expected an item at byte {pos}, found ({g:04X},{e:04X})")
            if length == UNDEFINED:
                pos = self.item_dataset(pos + 8, implicit, depth)
            else:
                pos += 8 + length
                if pos > self.end:
                    raise InvalidObject(f"item at byte {pos - length - 8} runs past the end (truncated)")

    def item_dataset(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip the elements of an undefined-length item; return the position after its delimiter."""
        while True:
            self._need(pos, 8)
            g, e = self.tag_s(self.buf, pos)
            if (g << 16) | e == ITEM_DELIM:
                return pos + 8
            pos = self.element(pos, implicit, depth)[4]


def _decode(raw: bytes, vr: str, encodings: list[str]) -> str:
    from pydicom.charset import decode_bytes  # here, not at import: CLI commands that never parse start faster

    if vr in _TEXT_VRS:
        delimiters = {0x5E, 0x3D} if vr == "PN" else set()
        text = decode_bytes(raw, encodings, delimiters)
        if vr == "PN":  # empty trailing component groups carry nothing ("Doe^John==" is "Doe^John")
            return text.strip(" \x00").rstrip("=")
        return text.rstrip(" \x00").lstrip(" ") if vr not in ("ST", "LT", "UT") else text.rstrip(" \x00")
    return raw.decode("ascii", "replace").strip(" \x00")


def _read_meta(buf, size: int) -> tuple[dict[int, str], int]:
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        raise InvalidObject("not a DICOM Part 10 file (no DICM prefix)")
    walker = _Walker(buf, size, little=True)
    pos, meta = 132, {}
    while pos + 8 <= size:
        (group,) = walker.u16(buf, pos)
        if group != 0x0002:
            break
        tag, _vr, vpos, length, nxt = walker.element(pos, implicit=False)
        if length != UNDEFINED and tag in (0x00020002, 0x00020003, 0x00020010):
            meta[tag] = bytes(buf[vpos:vpos + length]).decode("ascii", "replace").strip(" \x00")
        pos = nxt
    if 0x00020010 not in meta:
        raise InvalidObject("file meta information has no Transfer Syntax UID")
    return meta, pos


def _walk_dataset(obj: ParsedObject, buf, start: int, end: int, syntax: str) -> None:
    implicit = syntax == IMPLICIT_VR_LE
    walker = _Walker(buf, end, little=syntax != EXPLICIT_VR_BE)
    raw_values: dict[str, tuple[bytes, str]] = {}
    header_parts = []
    pos = start
    while pos < end:
        if end - pos < 8 and not any(buf[pos:end]):
            break  # trailing NUL padding, seen from some devices' encoders
        tag, _vr, vpos, length, nxt = walker.element(pos, implicit)
        if tag >> 16 == 0x0002:
            raise InvalidObject("file meta information element inside the data set")
        wanted = _BY_TAG.get(tag)
        if wanted and length != UNDEFINED and length <= MAX_INDEXED_VALUE:
            raw_values[wanted[0]] = (bytes(buf[vpos:vpos + length]), wanted[1])
        if nxt - pos <= BULK_LIMIT and tag >> 16 != 0x7FE0 and tag != 0xFFFCFFFC:
            header_parts.append(bytes(buf[pos:nxt]))
        pos = nxt
    charset = raw_values.pop("SpecificCharacterSet", (b"", "CS"))[0].decode("ascii", "replace")
    terms = [t.strip(" \x00") for t in charset.split("\\")] if charset.strip(" \x00") else []
    try:
        from pydicom.charset import convert_encodings

        encodings = convert_encodings(terms or None)
        obj.values = {kw: _decode(raw, vr, encodings) for kw, (raw, vr) in raw_values.items()}
    except Exception:  # an unknown or hostile Specific Character Set: keep the object, read text as Latin-1
        obj.charset_fallback = True
        obj.values = {kw: _decode(raw, vr, ["latin_1"]) for kw, (raw, vr) in raw_values.items()}
    if charset.strip(" \x00"):
        obj.values["SpecificCharacterSet"] = charset.strip(" \x00")
    obj.header = b"".join(header_parts)
    obj.header_syntax = EXPLICIT_VR_LE if syntax == DEFLATED_EXPLICIT_VR_LE else (
        syntax if syntax in (IMPLICIT_VR_LE, EXPLICIT_VR_BE) else EXPLICIT_VR_LE)


def dataset_offset(fh) -> int:
    """Where the data set starts in an open stored (Part 10) file: after preamble and file meta.

    Reads the file meta (usually within its first 4 KB); leaves the file position undefined.
    """
    fh.seek(0)
    head = fh.read(4096)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidObject("not a DICOM Part 10 file")
    pos = 132
    while True:
        if pos + 12 > len(head):
            fh.seek(pos)
            head = b"\0" * pos + fh.read(4096)
        raw = head[pos:pos + 12]
        if len(raw) < 8 or int.from_bytes(raw[0:2], "little") != 0x0002:
            return pos
        if raw[4:6] in _LONG_VRS:
            pos += 12 + int.from_bytes(raw[8:12], "little")
        else:
            pos += 8 + int.from_bytes(raw[6:8], "little")


_LONG_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV")


def parse_file(path: str | os.PathLike) -> ParsedObject:
    """Validate the Part 10 file at ``path`` and extract the indexed attributes and header.

    Raises :class:`InvalidObject` when the file is not complete, well-formed DICOM.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 132:
            raise InvalidObject("file too short to be DICOM Part 10")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, ds_start = _read_meta(buf, size)
            obj = ParsedObject(
                transfer_syntax=meta[0x00020010],
                meta_sop_class_uid=meta.get(0x00020002, ""),
                meta_sop_instance_uid=meta.get(0x00020003, ""),
                dataset_offset=ds_start,
                size=size,
            )
            if obj.transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
                data = _inflate(memoryview(buf)[ds_start:])
                _walk_dataset(obj, data, 0, len(data), DEFLATED_EXPLICIT_VR_LE)
            else:
                try:
                    _walk_dataset(obj, buf, ds_start, size, obj.transfer_syntax)
                except InvalidObject:
                    # Some encoders write implicit VR under an explicit transfer syntax; pydicom
                    # reads such files the same way. Accept them only if they walk cleanly so.
                    if obj.transfer_syntax in (IMPLICIT_VR_LE, EXPLICIT_VR_BE) or not _looks_implicit(buf, ds_start):
                        raise
                    _walk_dataset(obj, buf, ds_start, size, IMPLICIT_VR_LE)
                    obj.encoding_mismatch = True
    return obj


def _inflate(compressed) -> bytearray:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        for start in range(0, len(compressed), 1 << 20):
            out += inflater.decompress(compressed[start:start + (1 << 20)], MAX_INFLATED + 1 - len(out))
            if len(out) > MAX_INFLATED or inflater.unconsumed_tail:
                raise InvalidObject(f"deflated data set inflates beyond {MAX_INFLATED >> 20} MB")
        out += inflater.flush()
    except zlib.error as exc:
        raise InvalidObject(f"deflated data set does not inflate: {exc}") from None
    finally:
        compressed.release()
    if not inflater.eof:
        raise InvalidObject("deflated data set is truncated")
    return out


def _looks_implicit(buf, pos: int) -> bool:
    vr = bytes(buf[pos + 4:pos + 6])
    return not (vr.isalpha() and vr.isupper())

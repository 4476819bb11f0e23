"""Documents and photos in the archive: which objects they are, and the file inside each one.

EMRs and capture stations send referral letters, reports and consent forms as Encapsulated PDF
or CDA, and photos/scans as VL Photographic, VL Endoscopic or Secondary Capture images.  Staff
need the PDF (or picture) itself: :func:`export` writes it to a file any office program opens.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: SOP classes that are documents or photos rather than acquired images
DOCUMENT_PREFIXES = ("1.2.840.10008.5.1.4.1.1.104.",   # Encapsulated PDF, CDA, STL, OBJ, MTL
                     "1.2.840.10008.5.1.4.1.1.7",       # Secondary Capture (all flavours)
                     "1.2.840.10008.5.1.4.1.1.77.1.")   # VL endoscopic/microscopic/photographic, video

_KIND = {"1.2.840.10008.5.1.4.1.1.104.1": "PDF", "1.2.840.10008.5.1.4.1.1.104.2": "CDA"}
_EXTENSIONS = {"application/pdf": "pdf", "text/xml": "xml", "model/stl": "stl", "model/obj": "obj",
               "model/mtl": "mtl"}
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def is_document(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(DOCUMENT_PREFIXES)


def kind_of(sop_class_uid: str) -> str:
    if sop_class_uid in _KIND:
        return _KIND[sop_class_uid]
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.77.1."):
        return "photo"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "scan"
    return "doc"


class DocumentError(Exception):
    """The object cannot be exported; the message says why."""


@dataclass(frozen=True)
class Written:
    path: Path
    kind: str
    size: int


def list_documents(conn: sqlite3.Connection, patient_id: str | None = None) -> list[dict]:
    """Every document/photo instance (newest study first), with its patient and title."""
    where = " OR ".join("i.sop_class_uid LIKE ?" for _ in DOCUMENT_PREFIXES)
    args: list = [p + "%" for p in DOCUMENT_PREFIXES]
    sql = ("SELECT p.patient_id, p.patient_name, s.study_date, s.accession_number, s.study_instance_uid,"
           " i.sop_instance_uid, i.sop_class_uid, i.document_title, i.content_date, se.series_description"
           " FROM instances i JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
           f" JOIN patients p ON p.id = s.patient_pk WHERE ({where})")
    if patient_id is not None:
        sql += " AND p.patient_id = ?"
        args.append(patient_id)
    sql += " ORDER BY s.study_date DESC, i.id DESC"
    return [{"patient_id": r["patient_id"], "patient_name": r["patient_name"],
             "date": r["content_date"] or r["study_date"], "accession_number": r["accession_number"],
             "study_instance_uid": r["study_instance_uid"], "sop_instance_uid": r["sop_instance_uid"],
             "kind": kind_of(r["sop_class_uid"]), "title": r["document_title"] or r["series_description"]}
            for r in conn.execute(sql, args)]


def _locate(archive, uid: str) -> Path:
    path = archive.object_path(uid)
    if path is None:
        raise DocumentError(f"no stored or held object with SOP Instance UID {uid}")
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG file of an 8-bit grayscale (rows × cols) or RGB (rows × cols × 3) array."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    rows, cols = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    lines = np.zeros((rows, cols * channels + 1), dtype=np.uint8)  # filter byte 0 (None) per line
    lines[:, 1:] = pixels.reshape(rows, cols * channels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(lines.tobytes(), 6))
            + chunk(b"IEND", b""))


def to_8bit(ds, pixels: np.ndarray) -> np.ndarray:
    """Display values: colour as it is (8-bit), grayscale through its window (or full range)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if pixels.dtype != np.uint8:
            pixels = (pixels.astype(np.float64) * (255.0 / max(1.0, float(pixels.max())))).astype(np.uint8)
        return pixels
    from pydicom.pixels import apply_voi_lut

    values = pixels.astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(pixels, ds).astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255.0 - out
    return out.astype(np.uint8)


def export(archive, uid: str, to: Path) -> Written:
    """Write the document (or the first image frame) of object ``uid`` to ``to`` (a file or a folder)."""
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    try:
        ds = dcmread(_locate(archive, uid))
    except (OSError, ValueError) as exc:
        raise DocumentError(f"cannot read object {uid}: {exc}") from None
    if "EncapsulatedDocument" in ds:
        data = bytes(ds.EncapsulatedDocument)
        length = ds.get("EncapsulatedDocumentLength")
        if length and 0 < int(length) <= len(data):
            data = data[:int(length)]
        elif data.endswith(b"\x00") and ds.get("MIMETypeOfEncapsulatedDocument", "") == "application/pdf":
            data = data[:-1]  # the pad byte of an odd-length PDF
        ext = _EXTENSIONS.get(str(ds.get("MIMETypeOfEncapsulatedDocument", "")).lower(), "bin")
        kind = ext.upper() if ext != "bin" else "document"
    elif "PixelData" in ds:
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if ts == _JPEG_BASELINE:
            data = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
            ext, kind = "jpg", "JPEG image"
        else:
            try:
                pixels = ds.pixel_array
            except Exception as exc:
                raise DocumentError(f"cannot decode the image of {uid}: {exc}") from None
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                pixels = pixels[0]
            data, ext, kind = png_bytes(to_8bit(ds, pixels)), "png", "PNG image"
    else:
        raise DocumentError(f"object {uid} holds neither a document nor an image")
    dest = to / f"{uid}.{ext}" if to.is_dir() else to
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DocumentError(f"cannot write {dest}: {exc}") from None
    return Written(dest, kind, len(data))

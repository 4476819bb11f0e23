"""Forward a print job to a real DICOM film printer: ClinicBox as Basic Grayscale Print SCU.

One association per job: N-CREATE film session (copies, priority, medium), per film an N-CREATE
film box (its display format, orientation, size, magnification), N-SET of each image box with an
8-bit MONOCHROME2 image (colour images are converted to luminance: film printers are grayscale),
N-ACTION print, N-DELETE of the session.  Any refusal or timeout raises OutputError with the
printer's status, so the job waits and is retried.
"""

from __future__ import annotations

import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from clinicbox.archive.index import Index
from clinicbox.printing import film as pf
from clinicbox.printing.relay import OutputError

log = logging.getLogger(__name__)


def _luminance(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    return (img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114 + 0.5).astype(np.uint8)


def _check(what: str, status) -> Dataset | None:
    if status is None or "Status" not in status:
        raise OutputError(f"{what}: no answer from the printer (timeout or association lost)")
    code = int(status.Status)
    if code not in (0x0000,) and not 0xB000 <= code <= 0xBFFF:
        comment = str(status.get("ErrorComment", "")) if "ErrorComment" in status else ""
        raise OutputError(f"{what} refused with 0x{code:04X}{': ' + comment if comment else ''}")
    if code:
        log.warning("print forward: %s answered warning 0x%04X", what, code)
    return status


class PrintForwarder:
    """The ``dicom:DEVICE`` output of the print relay (registered by the composition root)."""

    def __init__(self, index: Index, our_ae_title: str, timeout: float = 30.0) -> None:
        self.index = index
        self.our_ae_title = our_ae_title
        self.timeout = timeout

    def __call__(self, device: str, films: list[dict], images: list[list], copies: int) -> None:
        row = self.index.conn.execute("SELECT ae_title, host, port FROM devices WHERE (name=? OR ae_title=?)"
                                      " AND added_at IS NOT NULL", (device, device)).fetchone()
        if row is None or not row["port"]:
            raise OutputError(f"no device {device!r} with host and port (clinicbox devices add)")
        ae = AE(ae_title=self.our_ae_title)
        ae.add_requested_context(pf.GRAYSCALE_META)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        assoc = ae.associate(row["host"], int(row["port"]), ae_title=row["ae_title"])
        if not assoc.is_established:
            raise OutputError(f"printer {row['ae_title']} at {row['host']}:{row['port']} did not accept an association")
        meta = pf.GRAYSCALE_META
        try:
            session_uid = generate_uid()
            fs = Dataset()
            fs.NumberOfCopies = copies
            fs.PrintPriority = "MED"
            fs.MediumType = "BLUE FILM"
            fs.FilmDestination = "MAGAZINE"
            status, _attrs = assoc.send_n_create(fs, pf.FILM_SESSION, session_uid, meta_uid=meta)
            _check("film session N-CREATE", status)
            for film, pixels in zip(films, images):
                self._film(assoc, meta, session_uid, film, pixels)
            status = assoc.send_n_delete(pf.FILM_SESSION, session_uid, meta_uid=meta)
            _check("film session N-DELETE", status)
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("print forward to %s: %d film(s) printed", row["ae_title"], len(films))

    def _film(self, assoc, meta: str, session_uid: str, film: dict, pixels: list) -> None:
        fb = Dataset()
        fb.ImageDisplayFormat = film["display_format"]
        fb.FilmOrientation = film["orientation"]
        fb.FilmSizeID = film["film_size"]
        fb.MagnificationType = film["magnification"]
        ref = Dataset()
        ref.ReferencedSOPClassUID = pf.FILM_SESSION
        ref.ReferencedSOPInstanceUID = session_uid
        fb.ReferencedFilmSessionSequence = [ref]
        box_uid = generate_uid()
        status, attrs = assoc.send_n_create(fb, pf.FILM_BOX, box_uid, meta_uid=meta)
        _check("film box N-CREATE", status)
        refs = attrs.get("ReferencedImageBoxSequence", []) if attrs is not None else []
        if len(refs) < len(pixels):
            raise OutputError(f"the printer made {len(refs)} image boxes for {len(pixels)} images "
                              f"({film['display_format']})")
        for ref_item, entry, img in zip(refs, film["boxes"], pixels):
            if img is None:
                continue
            gray = np.ascontiguousarray(_luminance(img))
            if entry.get("polarity") == "REVERSE":
                gray = 255 - gray
            item = Dataset()
            item.SamplesPerPixel = 1
            item.PhotometricInterpretation = "MONOCHROME2"
            item.Rows, item.Columns = gray.shape
            item.PixelAspectRatio = [1, 1]
            item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
            item.PixelData = gray.tobytes() + (b"\x00" if gray.size % 2 else b"")
            ib = Dataset()
            ib.ImageBoxPosition = entry["position"]
            ib.BasicGrayscaleImageSequence = [item]
            status, _ = assoc.send_n_set(ib, str(ref_item.ReferencedSOPClassUID),
                                         str(ref_item.ReferencedSOPInstanceUID), meta_uid=meta)
            _check(f"image box {entry['position']} N-SET", status)
        status, _ = assoc.send_n_action(None, 1, pf.FILM_BOX, box_uid, meta_uid=meta)
        _check("film box N-ACTION print", status)

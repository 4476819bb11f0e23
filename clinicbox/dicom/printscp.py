"""Print SCP doors (Basic Grayscale / Color Print Management Meta SOP Classes, PS3.4 H).

Each N-CREATE / N-SET / N-GET / N-ACTION / N-DELETE of a print SOP class becomes one call on the
association's :class:`~clinicbox.printing.film.PrintSession` (pure state) or, for N-ACTION print,
on :meth:`~clinicbox.printing.relay.PrintRelay.submit`; the outcome becomes the DIMSE status with
an Error Comment.  No film data outlives the association except what ``submit`` made durable.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from clinicbox.core.config import PrintSettings
from clinicbox.dicom.session import session_of
from clinicbox.printing import film as pf
from clinicbox.printing.relay import PrintRelay

log = logging.getLogger(__name__)

META_CLASSES = (pf.GRAYSCALE_META, pf.COLOR_META)
PRINT_SOP_CLASSES = (pf.FILM_SESSION, pf.FILM_BOX, pf.GRAYSCALE_IMAGE_BOX, pf.COLOR_IMAGE_BOX)
_ATTR = "_clinicbox_print"
PRINT_ACTION = 1


def _print_session(event) -> pf.PrintSession:
    session = getattr(event.assoc, _ATTR, None)
    if session is None:
        color = str(event.context.abstract_syntax) == pf.COLOR_META
        session = pf.PrintSession(color)
        setattr(event.assoc, _ATTR, session)
    return session


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _refused(event, what: str, exc: pf.PrintRefusal):
    log.warning("print %s from %s refused (0x%04X): %s", what, session_of(event.assoc).who, exc.status, exc.comment)
    return _status(exc.status, exc.comment), None


def handle_n_create(event):
    req = event.request
    cls = str(req.AffectedSOPClassUID)
    uid = str(req.AffectedSOPInstanceUID or "") or generate_uid()  # the SCP assigns UIDs the SCU omits
    ps = _print_session(event)
    ds = event.attribute_list
    try:
        if cls == pf.FILM_SESSION:
            outcome = ps.create_session(uid, ds)
            reply = Dataset()
            if ds is not None:
                reply.update(ds)
        elif cls == pf.FILM_BOX:
            box, outcome = ps.create_film_box(uid, ds, generate_uid)
            reply = Dataset()
            reply.update(ds)
            image_class = pf.COLOR_IMAGE_BOX if ps.color else pf.GRAYSCALE_IMAGE_BOX
            refs = []
            for image_box in box.boxes:
                item = Dataset()
                item.ReferencedSOPClassUID = image_class
                item.ReferencedSOPInstanceUID = image_box.uid
                refs.append(item)
            reply.ReferencedImageBoxSequence = refs
            reply.FilmOrientation, reply.FilmSizeID = box.orientation, box.film_size
            reply.MagnificationType = box.magnification
            reply.BorderDensity, reply.EmptyImageDensity = box.border_density, box.empty_density
            reply.MinDensity, reply.MaxDensity = int(box.min_density), int(box.max_density)
            reply.Trim = box.trim
        else:
            return _status(0x0118, f"N-CREATE of {cls} is not supported"), None
    except pf.PrintRefusal as exc:
        return _refused(event, f"N-CREATE {cls}", exc)
    log.info("print N-CREATE %s %s from %s", "film session" if cls == pf.FILM_SESSION else "film box", uid,
             session_of(event.assoc).who)
    if not req.AffectedSOPInstanceUID:
        reply.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the N-CREATE-RSP ...
        if outcome.status:  # ... on Success only: the SCU needs the UID more than the warning
            log.warning("print N-CREATE from %s: warning 0x%04X (%s) answered as Success so the response can "
                        "carry the UID ClinicBox assigned", session_of(event.assoc).who, outcome.status,
                        outcome.comment)
            return 0x0000, reply
    return _status(outcome.status, outcome.comment) if outcome.status else 0x0000, reply


def handle_n_set(event):
    req = event.request
    cls, uid = str(req.RequestedSOPClassUID), str(req.RequestedSOPInstanceUID)
    ps = _print_session(event)
    ds = event.modification_list
    try:
        if cls == pf.FILM_SESSION:
            outcome = ps.set_session(uid, ds)
        elif cls == pf.FILM_BOX:
            outcome = ps.set_film_box(uid, ds)
        elif cls in (pf.GRAYSCALE_IMAGE_BOX, pf.COLOR_IMAGE_BOX):
            outcome = ps.set_image_box(uid, ds)
        else:
            return _status(0x0118, f"N-SET of {cls} is not supported"), None
    except pf.PrintRefusal as exc:
        return _refused(event, f"N-SET {cls}", exc)
    reply = Dataset()
    if ds is not None:
        reply.update({e.tag: e for e in ds if e.keyword not in ("BasicGrayscaleImageSequence",
                                                                 "BasicColorImageSequence")})
    return _status(outcome.status, outcome.comment) if outcome.status else 0x0000, reply


def handle_n_get(event, settings: PrintSettings):
    req = event.request
    if str(req.RequestedSOPClassUID) != pf.PRINTER:
        return _status(0x0118, "N-GET is supported for the Printer only"), None
    ds = Dataset()
    ds.PrinterStatus = "NORMAL"
    ds.PrinterStatusInfo = "NORMAL"
    ds.PrinterName = settings.printer_name[:16]
    ds.Manufacturer = "ClinicBox"
    ds.ManufacturerModelName = "print relay"
    ds.DeviceSerialNumber = ""
    ds.SoftwareVersions = "ClinicBox"
    ds.DateOfLastCalibration = ""
    ds.TimeOfLastCalibration = ""
    wanted = req.AttributeIdentifierList or []
    if not isinstance(wanted, (list, tuple)):
        wanted = [wanted]  # pynetdicom gives a single tag bare
    if wanted:
        keep = Dataset()
        for tag in wanted:
            if tag in ds:
                keep[tag] = ds[tag]
        ds = keep
    return 0x0000, ds


def handle_n_action(event, relay: PrintRelay):
    req = event.request
    cls, uid = str(req.RequestedSOPClassUID), str(req.RequestedSOPInstanceUID)
    ps = _print_session(event)
    session = session_of(event.assoc)
    if req.ActionTypeID != PRINT_ACTION:
        return _status(pf.NO_SUCH_ACTION, f"action type {req.ActionTypeID} (only 1, print)"), None
    try:
        if cls == pf.FILM_SESSION:
            fs = ps._check_session(uid)
            boxes = ps.unprinted()
            if not boxes:
                raise pf.PrintRefusal(pf.FAIL_NO_FILM_BOX, "the film session has no film box to print")
        elif cls == pf.FILM_BOX:
            fs = ps._session()
            boxes = [ps.film_box(uid)]
        else:
            return _status(0x0118, f"N-ACTION of {cls} is not supported"), None
    except pf.PrintRefusal as exc:
        return _refused(event, "N-ACTION", exc)
    empty = all(b.pixels is None for box in boxes for b in box.boxes)
    try:
        job_id = relay.submit(boxes, fs, session.calling_ae)
    except Exception as exc:  # not durable: the modality must not think it printed
        log.exception("print job from %s not accepted", session.who)
        code = pf.FAIL_SESSION_QUEUE_FULL if cls == pf.FILM_SESSION else pf.FAIL_QUEUE_FULL
        return _status(code, f"print job not accepted: {exc}"[:64]), None
    for box in boxes:
        box.printed = True
    log.info("print N-ACTION from %s: job %d queued (%d film(s))", session.who, job_id, len(boxes))
    if empty:
        code = pf.WARN_EMPTY_SESSION if cls == pf.FILM_SESSION else pf.WARN_EMPTY_FILM_BOX
        return _status(code, "no image box has an image (empty page)"), None
    return 0x0000, None


def handle_n_delete(event):
    """N-DELETE answers a status only (pynetdicom's EVT_N_DELETE)."""
    req = event.request
    cls, uid = str(req.RequestedSOPClassUID), str(req.RequestedSOPInstanceUID)
    ps = _print_session(event)
    try:
        if cls == pf.FILM_SESSION:
            ps.delete_session(uid)
        elif cls == pf.FILM_BOX:
            ps.delete_film_box(uid)
        else:
            return _status(0x0118, f"N-DELETE of {cls} is not supported")
    except pf.PrintRefusal as exc:
        return _refused(event, "N-DELETE", exc)[0]
    return 0x0000

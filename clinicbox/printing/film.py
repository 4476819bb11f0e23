"""Film session, film box and image box state as a print SCU builds it (PS3.4 H), without I/O.

A :class:`PrintSession` belongs to one association.  The DICOM door turns each N-CREATE / N-SET /
N-ACTION / N-DELETE into one call here and the :class:`Outcome` back into a status; every value a
modality may send is checked against what ClinicBox supports, with the status PS3.4 H.4 names:
an unsupported value of a settable attribute is a failure 0x0106 (invalid attribute value) naming
it; a density outside the printer's range is warning 0xB605 and the nearest supported value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

FILM_SESSION = "1.2.840.10008.5.1.1.1"
FILM_BOX = "1.2.840.10008.5.1.1.2"
GRAYSCALE_IMAGE_BOX = "1.2.840.10008.5.1.1.4"
COLOR_IMAGE_BOX = "1.2.840.10008.5.1.1.4.1"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
GRAYSCALE_META = "1.2.840.10008.5.1.1.9"
COLOR_META = "1.2.840.10008.5.1.1.18"

#: Film Size ID -> (width, height) in inches, portrait (PS3.3 C.13.8)
FILM_SIZES = {
    "8INX10IN": (8.0, 10.0), "8_5INX11IN": (8.5, 11.0), "10INX12IN": (10.0, 12.0), "10INX14IN": (10.0, 14.0),
    "11INX14IN": (11.0, 14.0), "11INX17IN": (11.0, 17.0), "14INX14IN": (14.0, 14.0), "14INX17IN": (14.0, 17.0),
    "24CMX24CM": (24 / 2.54, 24 / 2.54), "24CMX30CM": (24 / 2.54, 30 / 2.54), "A4": (8.27, 11.69),
    "A3": (11.69, 16.54),
}
MAGNIFICATIONS = ("REPLICATE", "BILINEAR", "CUBIC", "NONE")
MEDIUM_TYPES = ("PAPER", "CLEAR FILM", "BLUE FILM", "MAMMO CLEAR FILM", "MAMMO BLUE FILM")
PRIORITIES = ("HIGH", "MED", "LOW")
ORIENTATIONS = ("PORTRAIT", "LANDSCAPE")
POLARITIES = ("NORMAL", "REVERSE")
DESTINATIONS = ("MAGAZINE", "PROCESSOR", "BIN_1", "BIN_2", "BIN_3", "BIN_4", "BIN_5", "BIN_6", "BIN_7", "BIN_8",
                "BIN_9", "BIN_10")
MIN_DENSITY, MAX_DENSITY = 20, 300   # hundredths of optical density this "printer" claims to cover
MAX_BOXES = 60
MAX_COPIES = 99

WARN_MEMORY_ALLOCATION = 0xB600
WARN_EMPTY_SESSION = 0xB602
WARN_EMPTY_FILM_BOX = 0xB603
WARN_DENSITY = 0xB605
FAIL_NO_FILM_BOX = 0xC600
FAIL_SESSION_QUEUE_FULL = 0xC601  # N-ACTION of a Film Session
FAIL_QUEUE_FULL = 0xC602          # N-ACTION of a Film Box
FAIL_IMAGE_TOO_LARGE = 0xC603
INVALID_VALUE = 0x0106
NO_SUCH_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION = 0x0123
PROCESSING_FAILURE = 0x0110


class PrintRefusal(Exception):
    """A request ClinicBox answers with a failure ``status``; ``comment`` says why (Error Comment)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass
class Outcome:
    status: int = 0x0000
    comment: str = ""

    def warn(self, status: int, comment: str) -> None:
        if self.status == 0x0000:
            self.status, self.comment = status, comment


def _text(ds, keyword: str, default: str = "") -> str:
    value = ds.get(keyword, default) if ds is not None else default
    if value is None:
        return default
    return str(value).strip().upper() if not isinstance(value, (list, tuple)) else "\\".join(map(str, value))


def _choice(ds, keyword: str, choices, default: str) -> str:
    value = _text(ds, keyword, default) or default
    if value not in choices:
        raise PrintRefusal(INVALID_VALUE, f"{keyword} {value!r} is not supported (one of {', '.join(choices)})")
    return value


_FORMAT = re.compile(r"^(STANDARD|ROW|COL)\\(\d+(?:,\d+)*)$")


def display_cells(image_display_format: str) -> list[tuple[float, float, float, float]]:
    """Image box rectangles (x, y, width, height, as fractions of the film's image area), in image
    box position order, for STANDARD\\C,R, ROW\\n1,n2… (a row per number) and COL\\n1,n2…."""
    m = _FORMAT.match(image_display_format.replace(" ", "").upper())
    if not m:
        raise PrintRefusal(INVALID_VALUE, f"Image Display Format {image_display_format!r} is not supported "
                                          "(STANDARD\\C,R, ROW\\n,… or COL\\n,…)")
    kind, numbers = m.group(1), [int(n) for n in m.group(2).split(",")]
    if any(n < 1 for n in numbers):
        raise PrintRefusal(INVALID_VALUE, f"Image Display Format {image_display_format!r}: zero boxes")
    if kind == "STANDARD":
        if len(numbers) != 2:
            raise PrintRefusal(INVALID_VALUE, f"Image Display Format {image_display_format!r}: STANDARD\\C,R")
        cols, rows = numbers
        cells = [(c / cols, r / rows, 1 / cols, 1 / rows) for r in range(rows) for c in range(cols)]
    elif kind == "ROW":
        rows = len(numbers)
        cells = [(c / n, r / rows, 1 / n, 1 / rows) for r, n in enumerate(numbers) for c in range(n)]
    else:
        cols = len(numbers)
        cells = [(c / cols, r / n, 1 / cols, 1 / n) for c, n in enumerate(numbers) for r in range(n)]
    if len(cells) > MAX_BOXES:
        raise PrintRefusal(INVALID_VALUE, f"Image Display Format {image_display_format!r}: more than {MAX_BOXES} boxes")
    return cells


def _density(ds, keyword: str, default: str, outcome: Outcome, *, named=("BLACK", "WHITE")) -> str:
    value = _text(ds, keyword, default) or default
    if value in named:
        return value
    try:
        number = int(value)
    except ValueError:
        raise PrintRefusal(INVALID_VALUE, f"{keyword} {value!r} is neither BLACK, WHITE nor a density") from None
    clamped = min(max(number, MIN_DENSITY), MAX_DENSITY)
    if clamped != number:
        outcome.warn(WARN_DENSITY, f"{keyword} {number} outside {MIN_DENSITY}-{MAX_DENSITY}; {clamped} used")
    return str(clamped)


@dataclass
class ImageBox:
    uid: str
    position: int
    color: bool
    pixels: np.ndarray | None = None     # uint8 (rows, cols) MONOCHROME2 or (rows, cols, 3) RGB
    source_bits: int = 8
    polarity: str = "NORMAL"
    magnification: str = ""
    requested_size_mm: float | None = None


@dataclass
class FilmBox:
    uid: str
    display_format: str
    orientation: str
    film_size: str
    magnification: str
    border_density: str
    empty_density: str
    min_density: str
    max_density: str
    trim: str
    resolution: str
    cells: list
    boxes: list[ImageBox] = field(default_factory=list)
    printed: bool = False

    def describe(self) -> dict:
        return {"film_box": self.uid, "display_format": self.display_format, "orientation": self.orientation,
                "film_size": self.film_size, "magnification": self.magnification,
                "border_density": self.border_density, "empty_density": self.empty_density,
                "min_density": self.min_density, "max_density": self.max_density, "trim": self.trim,
                "resolution": self.resolution}


@dataclass
class FilmSession:
    uid: str
    color: bool
    copies: int = 1
    priority: str = "MED"
    medium: str = "PAPER"
    destination: str = "MAGAZINE"
    label: str = ""
    owner: str = ""
    film_boxes: list[FilmBox] = field(default_factory=list)


class PrintSession:
    """The print objects of one association (film sessions live only as long as it)."""

    def __init__(self, color: bool) -> None:
        self.color = color
        self.session: FilmSession | None = None
        self.boxes: dict[str, ImageBox] = {}

    # --- Basic Film Session ------------------------------------------------------------------

    def create_session(self, uid: str, ds) -> Outcome:
        if self.session is not None:
            raise PrintRefusal(PROCESSING_FAILURE, "a film session already exists on this association")
        outcome = Outcome()
        self.session = FilmSession(uid, self.color)
        self._set_session(ds, outcome)
        if ds is not None and "MemoryAllocation" in ds:
            outcome.warn(WARN_MEMORY_ALLOCATION, "Memory Allocation is not supported")
        return outcome

    def _set_session(self, ds, outcome: Outcome) -> None:
        s = self._session()
        if ds is None:
            return
        copies = ds.get("NumberOfCopies", s.copies)
        try:
            copies = int(copies if copies not in (None, "") else 1)
        except (TypeError, ValueError):
            raise PrintRefusal(INVALID_VALUE, f"Number of Copies {copies!r} is not a number") from None
        if not 1 <= copies <= MAX_COPIES:
            raise PrintRefusal(INVALID_VALUE, f"Number of Copies {copies} is not in 1-{MAX_COPIES}")
        s.copies = copies
        s.priority = _choice(ds, "PrintPriority", PRIORITIES, s.priority)
        s.medium = _choice(ds, "MediumType", MEDIUM_TYPES, s.medium)
        s.destination = _choice(ds, "FilmDestination", DESTINATIONS, s.destination)
        s.label = str(ds.get("FilmSessionLabel", s.label) or "")
        s.owner = str(ds.get("OwnerID", s.owner) or "")

    def set_session(self, uid: str, ds) -> Outcome:
        self._check_session(uid)
        outcome = Outcome()
        self._set_session(ds, outcome)
        return outcome

    def delete_session(self, uid: str) -> None:
        self._check_session(uid)
        self.session = None
        self.boxes.clear()

    def _session(self) -> FilmSession:
        if self.session is None:
            raise PrintRefusal(NO_SUCH_INSTANCE, "no film session on this association (N-CREATE it first)")
        return self.session

    def _check_session(self, uid: str) -> FilmSession:
        s = self._session()
        if uid != s.uid:
            raise PrintRefusal(NO_SUCH_INSTANCE, f"no film session {uid}")
        return s

    # --- Basic Film Box ----------------------------------------------------------------------

    def create_film_box(self, uid: str, ds, new_uid) -> tuple[FilmBox, Outcome]:
        s = self._session()
        if ds is None or "ImageDisplayFormat" not in ds:
            raise PrintRefusal(MISSING_ATTRIBUTE, "Image Display Format (2010,0010) is required")
        ref = ds.get("ReferencedFilmSessionSequence")
        if not ref or str(ref[0].get("ReferencedSOPInstanceUID", "")) != s.uid:
            raise PrintRefusal(MISSING_ATTRIBUTE if not ref else INVALID_VALUE,
                               "Referenced Film Session Sequence must name this association's film session")
        outcome = Outcome()
        display_format = str(ds.ImageDisplayFormat)
        cells = display_cells(display_format)
        film_size = _choice(ds, "FilmSizeID", tuple(FILM_SIZES), "8INX10IN")
        box = FilmBox(
            uid=uid, display_format=display_format, orientation=_choice(ds, "FilmOrientation", ORIENTATIONS, "PORTRAIT"),
            film_size=film_size, magnification=_choice(ds, "MagnificationType", MAGNIFICATIONS, "BILINEAR"),
            border_density=_density(ds, "BorderDensity", "BLACK", outcome),
            empty_density=_density(ds, "EmptyImageDensity", "BLACK", outcome),
            min_density=_density(ds, "MinDensity", str(MIN_DENSITY), outcome, named=()),
            max_density=_density(ds, "MaxDensity", str(MAX_DENSITY), outcome, named=()),
            trim=_choice(ds, "Trim", ("YES", "NO"), "NO"),
            resolution=_choice(ds, "RequestedResolutionID", ("STANDARD", "HIGH"), "STANDARD"), cells=cells)
        for position in range(1, len(cells) + 1):
            image_box = ImageBox(new_uid(), position, s.color)
            box.boxes.append(image_box)
            self.boxes[image_box.uid] = image_box
        s.film_boxes.append(box)
        return box, outcome

    def film_box(self, uid: str) -> FilmBox:
        for box in self._session().film_boxes:
            if box.uid == uid:
                return box
        raise PrintRefusal(NO_SUCH_INSTANCE, f"no film box {uid}")

    def set_film_box(self, uid: str, ds) -> Outcome:
        box = self.film_box(uid)
        outcome = Outcome()
        if ds is None:
            return outcome
        if "MagnificationType" in ds:
            box.magnification = _choice(ds, "MagnificationType", MAGNIFICATIONS, box.magnification)
        if "BorderDensity" in ds:
            box.border_density = _density(ds, "BorderDensity", box.border_density, outcome)
        if "EmptyImageDensity" in ds:
            box.empty_density = _density(ds, "EmptyImageDensity", box.empty_density, outcome)
        if "MinDensity" in ds:
            box.min_density = _density(ds, "MinDensity", box.min_density, outcome, named=())
        if "MaxDensity" in ds:
            box.max_density = _density(ds, "MaxDensity", box.max_density, outcome, named=())
        if "Trim" in ds:
            box.trim = _choice(ds, "Trim", ("YES", "NO"), box.trim)
        return outcome

    def delete_film_box(self, uid: str) -> None:
        box = self.film_box(uid)
        self._session().film_boxes.remove(box)
        for image_box in box.boxes:
            self.boxes.pop(image_box.uid, None)

    # --- Image Box ------------------------------------------------------------------------------

    def set_image_box(self, uid: str, ds) -> Outcome:
        box = self.boxes.get(uid)
        if box is None:
            raise PrintRefusal(NO_SUCH_INSTANCE, f"no image box {uid}")
        outcome = Outcome()
        if ds is None:
            return outcome
        if "ImageBoxPosition" in ds and int(ds.ImageBoxPosition) != box.position:
            raise PrintRefusal(INVALID_VALUE, f"Image Box Position {ds.ImageBoxPosition} is not this box's "
                                              f"({box.position})")
        box.polarity = _choice(ds, "Polarity", POLARITIES, box.polarity)
        if "MagnificationType" in ds:
            box.magnification = _choice(ds, "MagnificationType", MAGNIFICATIONS, "BILINEAR")
        if ds.get("RequestedImageSize") not in (None, ""):
            size = float(ds.RequestedImageSize)
            if size <= 0:
                raise PrintRefusal(INVALID_VALUE, f"Requested Image Size {size} mm is not positive")
            box.requested_size_mm = size
        key = "BasicColorImageSequence" if box.color else "BasicGrayscaleImageSequence"
        other = "BasicGrayscaleImageSequence" if box.color else "BasicColorImageSequence"
        if other in ds and key not in ds:
            raise PrintRefusal(INVALID_VALUE, f"{other} sent to a {'color' if box.color else 'grayscale'} image box")
        if key in ds and ds[key].value:
            box.pixels, box.source_bits = _pixels(ds[key].value[0], box.color)
        return outcome

    def unprinted(self) -> list[FilmBox]:
        return [b for b in self._session().film_boxes if not b.printed]


def _pixels(item, color: bool) -> tuple[np.ndarray, int]:
    """The image of a Basic Grayscale/Color Image Sequence item, as display-ready uint8."""
    try:
        rows, cols = int(item.Rows), int(item.Columns)
        allocated, stored = int(item.BitsAllocated), int(item.get("BitsStored", item.BitsAllocated))
        photometric = str(item.get("PhotometricInterpretation", "RGB" if color else "MONOCHROME2"))
        data = item.PixelData
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PrintRefusal(MISSING_ATTRIBUTE, f"image sequence incomplete: {exc}") from None
    if rows < 1 or cols < 1 or rows * cols > 8192 * 8192:
        raise PrintRefusal(FAIL_IMAGE_TOO_LARGE, f"image of {cols}x{rows} pixels is not printable")
    if color:
        if allocated != 8 or photometric != "RGB":
            raise PrintRefusal(INVALID_VALUE, f"color image must be 8-bit RGB, not {allocated}-bit {photometric}")
        planar = int(item.get("PlanarConfiguration", 0) or 0)
        need = rows * cols * 3
        if len(data) < need:
            raise PrintRefusal(INVALID_VALUE, f"Pixel Data has {len(data)} bytes, {need} needed")
        arr = np.frombuffer(data, dtype=np.uint8, count=need)
        arr = arr.reshape(3, rows, cols).transpose(1, 2, 0) if planar else arr.reshape(rows, cols, 3)
        return np.ascontiguousarray(arr), 8
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PrintRefusal(INVALID_VALUE, f"grayscale image must be MONOCHROME1/2, not {photometric}")
    if allocated == 8:
        if len(data) < rows * cols:
            raise PrintRefusal(INVALID_VALUE, f"Pixel Data has {len(data)} bytes, {rows * cols} needed")
        out = np.frombuffer(data, dtype=np.uint8, count=rows * cols).reshape(rows, cols).copy()
    elif allocated == 16:
        if len(data) < rows * cols * 2:
            raise PrintRefusal(INVALID_VALUE, f"Pixel Data has {len(data)} bytes, {rows * cols * 2} needed")
        arr = np.frombuffer(data, dtype="<u2", count=rows * cols).reshape(rows, cols)
        stored = min(max(stored, 1), 16)
        top = (1 << stored) - 1
        lut = (np.arange(1 << 16, dtype=np.uint32) & top) * 255 // top      # bits above Bits Stored ignored
        out = lut.astype(np.uint8)[arr]
    else:
        raise PrintRefusal(INVALID_VALUE, f"Bits Allocated {allocated} is not 8 or 16")
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out, stored

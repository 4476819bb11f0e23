"""A small PDF writer for film pages: one image per page (Flate-compressed, gray or RGB) and a few
lines of header text in Helvetica.  PDF 1.4, written in one pass with a correct xref table.

Written here rather than adding a PDF library: a page is one image and some text, which is ~80
lines, and the appliance keeps one dependency fewer to patch for ten years.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Page:
    pixels: np.ndarray            # uint8 (H, W) gray or (H, W, 3) RGB, covering the whole page
    width_pt: float
    height_pt: float
    header: list[str] = field(default_factory=list)   # lines printed at the top left
    header_pt: float = 0.0                              # height of the header strip (white in pixels)


def _pdf_text(text: str) -> bytes:
    raw = text.encode("latin-1", "replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def pdf_bytes(pages: list[Page], *, title: str = "", compress_level: int = 3) -> bytes:
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in at the end
    pages_obj = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    kids = []
    for page in pages:
        px = np.ascontiguousarray(page.pixels, dtype=np.uint8)
        h, w = px.shape[:2]
        space = b"/DeviceRGB" if px.ndim == 3 else b"/DeviceGray"
        packer = zlib.compressobj(compress_level)
        flat = memoryview(px).cast("B")
        data = b"".join([*(packer.compress(flat[i:i + (1 << 20)]) for i in range(0, len(flat), 1 << 20)),
                         packer.flush()])
        image = add(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace %s /BitsPerComponent 8"
                    b" /Filter /FlateDecode /Length %d >>\nstream\n" % (w, h, space, len(data)) + data
                    + b"\nendstream")
        ops = [b"q %.3f 0 0 %.3f 0 0 cm /Im0 Do Q" % (page.width_pt, page.height_pt)]
        if page.header:
            size = max(6.0, min(10.0, page.header_pt / (len(page.header) + 1)))
            y = page.height_pt - size * 1.3
            ops.append(b"BT /F1 %.1f Tf 0 g" % size)
            for line in page.header:
                ops.append(b"1 0 0 1 %.2f %.2f Tm (%s) Tj" % (size, y, _pdf_text(line)))
                y -= size * 1.25
            ops.append(b"ET")
        content = b"\n".join(ops)
        stream = add(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %.2f %.2f] /Contents %d 0 R"
                        b" /Resources << /XObject << /Im0 %d 0 R >> /Font << /F1 %d 0 R >> >> >>"
                        % (pages_obj, page.width_pt, page.height_pt, stream, image, font)))
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_obj
    objects[pages_obj - 1] = (b"<< /Type /Pages /Kids [%s] /Count %d >>"
                              % (b" ".join(b"%d 0 R" % k for k in kids), len(kids)))
    info = add(b"<< /Title (%s) /Producer (ClinicBox print relay) >>" % _pdf_text(title))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += (b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
            % (len(objects) + 1, catalog, info, xref))
    return bytes(out)


def write_pdf(path: Path, pages: list[Page], *, title: str = "") -> int:
    """Write the PDF atomically (temp file, fsync, rename); return its size."""
    data = pdf_bytes(pages, title=title)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(data)

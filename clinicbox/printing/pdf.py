"""A small PDF writer for film pages: one image per page (Flate-compressed, gray or RGB) and a few
lines of header text in Helvetica.  PDF 1.4, written in one pass with a correct xref table.

Written here rather than adding a PDF library: a page is one image and some text, which is ~80
lines, and the appliance keeps one dependency fewer to patch for ten years.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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


def write_pages(fh: BinaryIO, pages: list[Page], *, title: str = "", compress_level: int = 3) -> None:
    """Write the PDF to ``fh``; each page's image is compressed once and written chunk by chunk
    (no whole-file copies in memory: a 300 dpi 14×17 in film is a 21 MB raster)."""
    n_pages = len(pages)
    # object numbers: 1 catalog, 2 pages, 3 font, then image/content/page per page, then info
    page_objs = [6 + 3 * i for i in range(n_pages)]
    info = 4 + 3 * n_pages
    offsets: list[int] = []
    pos = 0

    def emit(*parts) -> None:
        nonlocal pos
        for part in parts:
            fh.write(part)
            pos += len(part)

    def obj(number: int, *parts) -> None:
        assert number == len(offsets) + 1
        offsets.append(pos)
        emit(b"%d 0 obj\n" % number, *parts, b"\nendobj\n")

    emit(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    obj(1, b"<< /Type /Catalog /Pages 2 0 R >>")
    obj(2, b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in page_objs), n_pages))
    obj(3, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for i, page in enumerate(pages):
        image, contents, page_obj = 4 + 3 * i, 5 + 3 * i, 6 + 3 * i
        px = np.ascontiguousarray(page.pixels, dtype=np.uint8)
        h, w = px.shape[:2]
        space = b"/DeviceRGB" if px.ndim == 3 else b"/DeviceGray"
        packer = zlib.compressobj(compress_level)
        flat = memoryview(px).cast("B")
        chunks = [packer.compress(flat[j:j + (1 << 20)]) for j in range(0, len(flat), 1 << 20)]
        chunks.append(packer.flush())
        length = sum(len(c) for c in chunks)
        obj(image, b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace %s /BitsPerComponent 8"
                   b" /Filter /FlateDecode /Length %d >>\nstream\n" % (w, h, space, length), *chunks, b"\nendstream")
        del chunks
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
        obj(contents, b"<< /Length %d >>\nstream\n" % len(content), content, b"\nendstream")
        obj(page_obj, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.2f %.2f] /Contents %d 0 R"
                      b" /Resources << /XObject << /Im0 %d 0 R >> /Font << /F1 3 0 R >> >> >>"
                      % (page.width_pt, page.height_pt, contents, image))
    obj(info, b"<< /Title (%s) /Producer (ClinicBox print relay) >>" % _pdf_text(title))
    xref = pos
    emit(b"xref\n0 %d\n0000000000 65535 f \n" % (len(offsets) + 1))
    emit(b"".join(b"%010d 00000 n \n" % off for off in offsets))
    emit(b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(offsets) + 1, info, xref))


def pdf_bytes(pages: list[Page], *, title: str = "") -> bytes:
    buf = io.BytesIO()
    write_pages(buf, pages, title=title)
    return buf.getvalue()


def write_pdf(path: Path, pages: list[Page], *, title: str = "") -> int:
    """Write the PDF atomically (temp file, fsync, rename); return its size."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        write_pages(fh, pages, title=title)
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    os.replace(tmp, path)
    return size

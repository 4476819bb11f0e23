"""A film box as one page raster (numpy, no per-pixel Python loops).

The page has the film's size and orientation at ``dpi``; a header strip at the top is left for the
text the PDF writer puts there.  Each image box gets its cell of the display format; its image is
scaled to fit the cell keeping its aspect ratio (REPLICATE: nearest neighbour, BILINEAR/CUBIC:
bilinear, NONE: 1 image pixel = 1 page pixel, cropped to the cell), or to its Requested Image
Size; REVERSE polarity inverts it; border and empty boxes get their densities.
"""

from __future__ import annotations

import numpy as np

from clinicbox.printing.film import FILM_SIZES, MAX_DENSITY, MIN_DENSITY, FilmBox

CELL_GAP = 0.01  # of the image area's shorter side, between and around image boxes
_STRIP = 128     # output rows resized at once


def page_inches(film_size: str, orientation: str) -> tuple[float, float]:
    w, h = FILM_SIZES[film_size]
    return (max(w, h), min(w, h)) if orientation == "LANDSCAPE" else (min(w, h), max(w, h))


def density_value(density: str, min_density: str = str(MIN_DENSITY), max_density: str = str(MAX_DENSITY)) -> int:
    """Display value (0 black … 255 white) of a density: BLACK, WHITE, or hundredths of optical density."""
    if density == "BLACK":
        return 0
    if density == "WHITE":
        return 255
    lo, hi = int(min_density), int(max_density)
    d = min(max(int(density), lo), hi)
    return int(round(255 * (hi - d) / max(1, hi - lo)))


def resize(img: np.ndarray, height: int, width: int, method: str, out: np.ndarray | None = None) -> np.ndarray:
    """``img`` (rows, cols[, 3], uint8) scaled to height × width (into ``out`` when given)."""
    h, w = img.shape[:2]
    if out is None:
        out = np.empty((height, width) + img.shape[2:], dtype=np.uint8)
    if (h, w) == (height, width):
        out[...] = img
        return out
    if method == "REPLICATE" or height < 2 or width < 2 or h < 2 or w < 2:
        ys = np.minimum((np.arange(height) * h) // height, h - 1)
        xs = np.minimum((np.arange(width) * w) // width, w - 1)
        for start in range(0, height, _STRIP):
            rows = slice(start, min(start + _STRIP, height))
            out[rows] = img[ys[rows]][:, xs]
        return out
    # bilinear: sample at pixel centres, a strip of output rows at a time (bounded temporaries)
    y = (np.arange(height, dtype=np.float32) + 0.5) * (h / height) - 0.5
    x = (np.arange(width, dtype=np.float32) + 0.5) * (w / width) - 0.5
    y0 = np.clip(np.floor(y).astype(np.int32), 0, h - 1)
    x0 = np.clip(np.floor(x).astype(np.int32), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = np.clip(y - y0, 0, 1)
    wx = np.clip(x - x0, 0, 1)[None, :]
    if img.ndim == 3:
        wx = wx[..., None]
    for start in range(0, height, _STRIP):
        rows = slice(start, min(start + _STRIP, height))
        top, bottom = img[y0[rows]], img[y1[rows]]          # uint8 strips of source rows
        a = top[:, x0].astype(np.float32)
        a += (top[:, x1] - a) * wx                           # (top[:, x1] promoted to float32)
        b = bottom[:, x0].astype(np.float32)
        b += (bottom[:, x1] - b) * wx
        wyr = wy[rows][:, None] if img.ndim == 2 else wy[rows][:, None, None]
        a += (b - a) * wyr
        a += 0.5
        np.clip(a, 0, 255, out=a)
        out[rows] = a.astype(np.uint8)
    return out


def render(box: FilmBox, *, dpi: int, header_inches: float = 0.0) -> np.ndarray:
    """The page of ``box``: uint8 (H, W) for grayscale films, (H, W, 3) when any image is colour."""
    width_in, height_in = page_inches(box.film_size, box.orientation)
    width, height = int(round(width_in * dpi)), int(round(height_in * dpi))
    header = int(round(header_inches * dpi))
    color = any(b.pixels is not None and b.pixels.ndim == 3 for b in box.boxes)
    border = density_value(box.border_density, box.min_density, box.max_density)
    empty = density_value(box.empty_density, box.min_density, box.max_density)
    page = np.full((height, width, 3) if color else (height, width), border, dtype=np.uint8)
    if header:
        page[:header] = 255  # the header strip is white paper
    area_h = height - header
    gap = max(1, int(min(width, area_h) * CELL_GAP))
    for image_box, (fx, fy, fw, fh) in zip(box.boxes, box.cells):
        x0 = int(round(fx * width)) + gap
        y0 = header + int(round(fy * area_h)) + gap
        cw = int(round((fx + fw) * width)) - gap - x0
        ch = header + int(round((fy + fh) * area_h)) - gap - y0
        if cw < 1 or ch < 1:
            continue
        if image_box.pixels is None:
            page[y0:y0 + ch, x0:x0 + cw] = empty
            continue
        img = image_box.pixels
        if image_box.polarity == "REVERSE":
            img = 255 - img
        if color and img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        method = image_box.magnification or box.magnification
        ih, iw = img.shape[:2]
        if image_box.requested_size_mm:
            target_w = image_box.requested_size_mm / 25.4 * dpi
            scale = min(target_w / iw, cw / iw, ch / ih)
        elif method == "NONE":
            scale = 1.0
        else:
            scale = min(cw / iw, ch / ih)
        tw, th = max(1, int(round(iw * scale))), max(1, int(round(ih * scale)))
        if th > ch or tw > cw:  # NONE with an image larger than its box: centre crop
            scaled = resize(img, th, tw, method)
            oy, ox = max(0, (th - ch) // 2), max(0, (tw - cw) // 2)
            scaled = scaled[oy:oy + ch, ox:ox + cw]
            th, tw = scaled.shape[:2]
            py, px = y0 + (ch - th) // 2, x0 + (cw - tw) // 2
            page[py:py + th, px:px + tw] = scaled
        else:  # straight into the page: no second copy of a large image
            py, px = y0 + (ch - th) // 2, x0 + (cw - tw) // 2
            resize(img, th, tw, method, out=page[py:py + th, px:px + tw])
        if box.trim == "YES":
            edge = 255 - border
            page[py:py + th, [px, px + tw - 1]] = edge
            page[[py, py + th - 1], px:px + tw] = edge
    return page

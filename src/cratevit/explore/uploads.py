"""Reading an uploaded file safely: its size is checked in the header before a pixel is decoded, and only the
decoders of :data:`UPLOAD_FORMATS` are tried (none of them hands the data to an external program, as Pillow's EPS
plugin does to Ghostscript). Pillow's ``Image.open`` is lazy: it reads the header and returns, so a 177-byte PNG that
claims 100000x1 pixels is refused in microseconds."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from ..analysis.images import to_rgb
from ..errors import UserError

__all__ = ["MAX_ASPECT", "MAX_PIXELS", "MAX_SIDE", "UPLOAD_FORMATS", "check_geometry", "read_upload"]

MAX_PIXELS = 40_000_000
"""Most pixels of an upload; larger ones are refused with a message (decompression bombs included)."""
MAX_SIDE = 8192
"""Most pixels on the long side of an upload (checked in the file's header, before decoding)."""
MAX_ASPECT = 10.0
"""Largest aspect ratio (long side / short side) of an upload."""
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
"""The PIL formats an upload may have: the only decoders an upload reaches."""


def check_geometry(width: int, height: int, name: str) -> None:
    """Refuse a picture whose size alone makes it unreasonable: a long side over :data:`MAX_SIDE`, more than
    :data:`MAX_PIXELS`, or an aspect ratio over :data:`MAX_ASPECT` (a 100000x1 PNG is 177 bytes)."""
    long, short = max(width, height), min(width, height)
    if short < 1 or long > MAX_SIDE:
        raise UserError(
            f"{name}: {width}x{height} pixels; this page opens images of 1..{MAX_SIDE} pixels a side; scale it first"
        )
    if width * height > MAX_PIXELS:
        raise UserError(
            f"{name}: {width}x{height} pixels is more than this page opens ({MAX_PIXELS // 1_000_000} megapixels); "
            "scale it down first"
        )
    if long > MAX_ASPECT * short:
        raise UserError(
            f"{name}: {width}x{height} has an aspect ratio of {long / short:.0f}:1; this page opens up to "
            f"{MAX_ASPECT:.0f}:1; crop it first"
        )


def read_upload(data: bytes, filename: str = "upload", check: Callable[[int, int], None] | None = None) -> Image.Image:
    """An uploaded file as an RGB image; anything else gets a one-line ``UserError`` for the page.

    Only the decoders of :data:`UPLOAD_FORMATS` are tried (none hands data to an external program, as EPS does to
    Ghostscript). The header's size is checked (:func:`check_geometry`, then ``check(width, height)``, e.g. the
    model's token budget) before a single pixel is decoded: PIL's ``open`` reads the header only."""
    if not data:
        raise UserError(f"{filename}: the file is empty; choose an image file (PNG, JPEG, ...)")
    formats = ", ".join(UPLOAD_FORMATS)
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as img:
            check_geometry(img.width, img.height, filename)
            if check is not None:
                check(img.width, img.height)
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{filename} is not an image file this page can read; choose a {formats} image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"{filename} is not an image this page can read ({reason}); choose a {formats} image") from None

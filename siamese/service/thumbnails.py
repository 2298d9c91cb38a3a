"""Thumbnails of indexed items: re-encoded small PNGs (never the file itself), kept in an LRU.

An item's file is opened as decoding opens one (regular files only; a FIFO would block), its
size checked against the pixel limit before decoding, turned upright by its EXIF tag, shrunk
to fit a ``size`` x ``size`` box and written as PNG, grey or RGB as the original is.
"""

from __future__ import annotations

import functools
import io

from siamese.data.datasets import UndecodableImage, open_regular, to_mode
from siamese.gallery import Gallery

# PIL modes shown grey; everything else is shown as RGB.
_GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


class Thumbnails:
    """``get(id)``: PNG bytes of an indexed item; LookupError for an id with no file,
    UndecodableImage for a file that can no longer be read."""

    def __init__(self, gallery: Gallery, size: int, max_pixels: int, cache: int) -> None:
        self.gallery = gallery
        self.size = size
        self.max_pixels = max_pixels
        # Failures are not cached (lru_cache keeps returned values only): a file put back
        # is served again.
        self.get = functools.lru_cache(maxsize=cache)(self._make)

    def _make(self, item_id: int) -> bytes:
        path = self.gallery.item_file(item_id)
        if path is None:
            raise LookupError(item_id)
        from PIL import Image, ImageOps

        try:
            with open_regular(path) as f, Image.open(f) as img:
                width, height = img.size
                if width * height > self.max_pixels:
                    raise UndecodableImage(
                        f"{width} x {height} pixels, over the limit of {self.max_pixels}"
                    )
                mode = "L" if img.mode in _GREY_MODES else "RGB"
                img.draft(mode, (self.size, self.size))  # JPEG only: decode at 1/2..1/8
                img.load()
                img = to_mode(ImageOps.exif_transpose(img), mode)
                img.thumbnail((self.size, self.size), Image.BILINEAR)
                out = io.BytesIO()
                img.save(out, format="PNG")
        except UndecodableImage:
            raise
        except Exception as exc:  # a damaged file can make a decoder raise almost anything
            raise UndecodableImage(type(exc).__name__) from None
        return out.getvalue()

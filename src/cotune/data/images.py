"""Decoding images into RGB, whatever they were saved as, and checking them before training.

Datasets come from strangers, so an image reference is treated as untrusted input: paths must stay
inside the image root, sizes are checked from the header before any pixel is decoded, and every
colour mode is converted deliberately (transparency on white, 16-bit range scaled, EXIF applied).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # decompression-bomb guard: larger images are rejected, not decoded
MAX_ASPECT = 100  # a 1 x 50,000 strip cannot be tiled into anything a vision encoder can use
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def resolve_image_path(ref: str, root: str | Path) -> str:
    """Joins an image path from a record to the image root, refusing paths that leave the root.

    Args:
        ref: the path as written in the record (relative to ``root``; absolute only if inside it).
        root: the configured image root (``data.image_root``, default the data file's folder).

    Returns:
        The joined, normalised path.

    Raises:
        ValueError: a URL, or a path that escapes ``root`` through '..' or an absolute path.
    """
    if "://" in ref:
        raise ValueError(
            f"image '{ref}' is a URL; cotune reads local files only (download the images and set data.image_root)"
        )
    joined = os.path.normpath(os.path.join(root, ref))
    root_abs = os.path.abspath(root)
    if os.path.commonpath([os.path.abspath(joined), root_abs]) != root_abs:
        raise ValueError(
            f"image path '{ref}' escapes the image root '{root}' (paths must stay inside it; "
            "set data.image_root to the folder that holds the images)"
        )
    return joined


def _open(ref: Any) -> Image.Image:
    if hasattr(ref, "fetch"):  # a lazy reference into a table (see formats.TableImage)
        ref = ref.fetch()
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(ref)))
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):  # a datasets Image() cell
        if ref.get("bytes"):
            return Image.open(io.BytesIO(ref["bytes"]))
        if not ref.get("path"):
            raise ValueError("image cell holds neither bytes nor a path")
        return Image.open(ref["path"])
    return Image.open(Path(ref))


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit grayscale (medical / industrial cameras often fill only 10-12 bits): scale the used
    # range to 8 bits, as a viewer's auto-window does; a flat image keeps its level.
    a = np.asarray(image, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi > lo:
        a = (a - lo) / (hi - lo) * 255.0
    else:
        a = np.full_like(a, min(max(lo / 257.0, 0.0), 255.0))
    return Image.fromarray(a.round().astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied; transparency composited on white, not black.

    Handles 1, L, LA, P (with or without transparency), PA, RGB, RGBA, RGBa, La, CMYK, YCbCr and
    16-bit / 32-bit / float grayscale.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _describe(ref: Any) -> str:
    if isinstance(ref, str | Path):
        return f"'{ref}'"
    return str(ref) if hasattr(ref, "fetch") else "in record"


def load_image(
    ref: Any,
    decode: bool = True,
    max_pixels: int = MAX_PIXELS,
    formats: tuple[str, ...] = (),
    name: str = "",
) -> Image.Image:
    """Opens a path, bytes, a datasets Image cell, a table reference or a PIL image as RGB.

    The one picture path: training, eval, generate, stage search and the server all decode here, so
    one picture is the same pixels everywhere (``to_rgb``: EXIF orientation, transparency on white,
    16-bit windowed).

    Args:
        ref: the image reference.
        decode: False stops after the header checks (size, aspect ratio) and returns the image
            undecoded, in its own mode: a fast check that finds missing, empty, unreadable and
            oversized images but not a file whose pixel data is cut short.
        max_pixels: the largest image accepted (width x height), checked from the header.
        formats: PIL format names accepted (the server's list); empty: any format PIL reads.
        name: how messages call the image (default: its path, or 'in record').

    Raises:
        ValueError: missing, empty, corrupt, oversized, absurdly shaped image or a format outside
            ``formats``, with the reason.
    """
    what = name or f"image {_describe(ref)}"
    if isinstance(ref, str | Path):
        path = Path(ref)
        if not path.is_file():
            raise ValueError(f"image '{path}' not found (set data.image_root?)")
        if path.stat().st_size == 0:
            raise ValueError(f"image '{path}' is an empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            image = _open(ref)
        _check_header(image, what, max_pixels, formats)
        if not decode:
            return image
        image.load()
        return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, KeyError) as e:
        raise ValueError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None


def _check_header(image: Image.Image, what: str, max_pixels: int, formats: tuple[str, ...]) -> None:
    """Refuses an image by its header alone: its format, pixel count and aspect ratio."""
    if formats and image.format not in formats:
        raise ValueError(f"{what} is {image.format}, not one of the accepted formats ({', '.join(formats)})")
    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise ValueError(
            f"{what} is {width}x{height}, over {max_pixels:,} pixels "
            "(a decompression bomb or a scan far larger than any vision encoder uses; resize it)"
        )
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise ValueError(f"{what} is {width}x{height}: aspect ratio over {MAX_ASPECT}:1 (crop or pad it)")


def check_image(ref: Any, decode: bool = True) -> str | None:
    """The reason ``ref`` is unusable, or None when it decodes (or, with ``decode=False``, when its
    header passes the checks)."""
    try:
        image = load_image(ref, decode=decode)
    except ValueError as e:
        return str(e)
    if not isinstance(ref, Image.Image) and not hasattr(ref, "fetch"):
        image.close()  # opened here (an undecoded one still holds its file); not the caller's object
    return None

"""Decoding images into RGB, whatever they were saved as, and checking them before training."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # decompression-bomb guard: larger images are rejected, not decoded


def _open(ref: Any) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, bytes | bytearray):
        return Image.open(io.BytesIO(ref))
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):  # a datasets Image() cell
        return Image.open(io.BytesIO(ref["bytes"])) if ref.get("bytes") else Image.open(ref["path"])
    return Image.open(Path(ref))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied; transparency composited on white, not black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (medical / industrial cameras): scale the used range to 8 bits
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(ref: Any) -> Image.Image:
    """Opens a path, bytes or PIL image and returns it decoded as RGB.

    Raises:
        ValueError: missing, empty, corrupt or absurdly large image, with the reason.
    """
    if isinstance(ref, str | Path):
        path = Path(ref)
        if not path.is_file():
            raise ValueError(f"image '{path}' not found (set data.image_root?)")
        if path.stat().st_size == 0:
            raise ValueError(f"image '{path}' is an empty file")
    try:
        image = _open(ref)
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"image {image.width}x{image.height} is larger than {MAX_PIXELS} pixels")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        name = f"'{ref}'" if isinstance(ref, str | Path) else "in record"
        raise ValueError(f"image {name} cannot be decoded ({type(e).__name__}: {e})") from None
    return to_rgb(image)


def check_image(ref: Any) -> str | None:
    """The reason ``ref`` is unusable, or None when it decodes."""
    try:
        load_image(ref)
    except ValueError as e:
        return str(e)
    return None

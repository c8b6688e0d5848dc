"""Fixed intensity windows for 16-bit pictures and scans: the same value maps to the same grey in
every file, which a per-image min-max stretch never does (one CT slice with metal in it would dim
all its soft tissue).

A window is (center, width) in the file's own units (Hounsfield units for CT after the rescale),
mapped to 0-255 by DICOM's linear VOI function (PS3.3 C.11.2.1.2), which ``pydicom``'s
``apply_windowing`` also follows; ``tests/test_sources.py`` checks the two agree.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cotune.data.sample import DataError

# Standard CT display windows (center, width) in HU, as radiology references (e.g. Radiopaedia) list them.
PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (50.0, 400.0),
}


def parse_window(text: str) -> tuple[float, float] | None:
    """``--window``: '' (None: the file's own), a preset name, or 'CENTER,WIDTH'.

    Raises:
        DataError: anything else, naming the presets.
    """
    text = text.strip().lower()
    if not text:
        return None
    if text in PRESETS:
        return PRESETS[text]
    try:
        center, width = (float(x) for x in text.split(","))
    except ValueError:
        raise DataError(
            f"window '{text}' is neither a preset ({', '.join(PRESETS)}) nor 'CENTER,WIDTH' (e.g. 40,400)"
        ) from None
    if width < 1:
        raise DataError(f"window '{text}': the width must be at least 1")
    return center, width


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window: values at or below ``center - width/2`` are black, above ``center +
    width/2`` white, linear in between; returns uint8."""
    values = np.asarray(values, dtype=np.float64)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    scaled = ((values - (center - 0.5)) / max(width - 1, 1e-9) + 0.5) * 255.0
    out = np.where(values <= low, 0.0, np.where(values > high, 255.0, scaled))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def full_range_window(low: float, high: float) -> tuple[float, float]:
    """The window that maps ``low`` to black and ``high`` to white."""
    return (low + high + 1) / 2, high - low + 1


_TYPE_RANGE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def sixteen_bit_to_8bit(image: Image.Image, window: tuple[float, float] | None) -> Image.Image:
    """A 16-bit (or 32-bit integer) grayscale picture as 8-bit grayscale through a fixed window.

    Without ``window`` the file type's full range is used (0-65535 for 16-bit): every file of the
    set gets the same mapping, whatever its own minimum and maximum.

    Raises:
        DataError: a float or 32-bit image without a window (its range is not defined by its type).
    """
    if window is None:
        top = _TYPE_RANGE.get(image.mode)
        if top is None and image.mode == "I":
            # PIL opens 16-bit PNGs as 'I'; values above 65535 mean real 32-bit data
            top = 65535 if np.asarray(image).max(initial=0) <= 65535 else None
        if top is None:
            raise DataError(
                f"a {image.mode} image has no fixed range: give --window CENTER,WIDTH or a preset"
            )
        window = full_range_window(0, top)
    return Image.fromarray(apply_window(np.asarray(image), *window), mode="L")


def is_high_bit_depth(image: Image.Image) -> bool:
    """True for 16-bit, 32-bit integer and float grayscale modes."""
    return image.mode in ("I", "F") or image.mode.startswith("I;16")

"""Images named in a request: ``data:`` URLs, or files inside ``--allowed_media_dir`` when an operator
names one. The server never fetches a URL. Pictures are decoded by training's own decoder
(``cotune.data.images.load_image``): the format, pixel count and aspect ratio are checked from the
header, before the image is decoded (a decompression bomb is refused without being expanded)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from PIL import Image

from cotune.data.images import load_image
from cotune.serve.protocol import APIError

FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")  # MPO: what many phones' JPEGs open as


def load_image_url(url: str, param: str, max_pixels: int, media_dir: str = "") -> Image.Image:
    """The RGB image at ``url`` (a ``data:image/...;base64,`` URL or, with ``media_dir``, a path in it).

    Raises:
        APIError: 400 naming ``param`` for any other URL, bad base64, an unreadable image, a format
            outside ``FORMATS`` or more than ``max_pixels`` pixels.
    """
    if not isinstance(url, str) or not url:
        raise APIError(400, "expected an image URL string", param)
    if url.startswith("data:"):
        data = _data_url_bytes(url, param)
    elif media_dir:
        data = _media_file_bytes(url, param, media_dir)
    else:
        raise APIError(
            400,
            "only data: URLs are accepted (data:image/png;base64,...); the server fetches no URL and "
            "opens no file unless started with --allowed_media_dir",
            param,
        )
    return _decode(data, param, max_pixels)


def _data_url_bytes(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise APIError(400, "expected a data URL of the form data:image/<type>;base64,<data>", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data URL's base64 payload does not decode", param) from None


def _media_file_bytes(url: str, param: str, media_dir: str) -> bytes:
    path_text = url[len("file://") :] if url.startswith("file://") else url
    if "://" in path_text:
        raise APIError(400, "only data: URLs and files under the allowed media directory are accepted", param)
    root = Path(media_dir).resolve()
    path = (root / path_text).resolve()  # an absolute path_text replaces root
    if not path.is_relative_to(root):
        raise APIError(400, "the image path is outside the allowed media directory", param)
    if not path.is_file():
        raise APIError(400, "no such image file in the allowed media directory", param)
    return path.read_bytes()


def _decode(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """The picture through training's own decoder (``cotune.data.images.load_image``): the same pixels
    as ``cotune generate`` gets from the same file."""
    try:
        return load_image(data, max_pixels=max_pixels, formats=FORMATS, name="the image")
    except ValueError as e:
        raise APIError(400, str(e), param) from None
    except Exception as e:  # PIL raises many kinds for broken data
        raise APIError(400, f"the image does not decode: {type(e).__name__}", param) from None

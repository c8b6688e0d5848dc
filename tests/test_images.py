"""Every colour mode becomes the right RGB; EXIF orientation; bombs, absurd shapes, escaping paths."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cotune.data.images import MAX_PIXELS, check_image, load_image, resolve_image_path


def saved(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def pixel(path, xy=(0, 0)):
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_grayscale_and_bilevel(tmp_path):
    assert pixel(saved(tmp_path, Image.new("L", (4, 4), 100), "l.png")) == (100, 100, 100)
    assert pixel(saved(tmp_path, Image.new("1", (4, 4), 1), "one.png")) == (255, 255, 255)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    path = saved(tmp_path, rgba, "rgba.png")
    assert pixel(path, (0, 0)) == (255, 255, 255)  # fully transparent: white, not black
    assert pixel(path, (1, 0)) == (255, 0, 0)
    assert all(126 <= c <= 128 for c in pixel(path, (2, 0)))  # half-transparent black on white: grey
    la = Image.new("LA", (2, 1), (100, 0))
    la.putpixel((1, 0), (100, 255))
    path = saved(tmp_path, la, "la.png")
    assert pixel(path, (0, 0)) == (255, 255, 255) and pixel(path, (1, 0)) == (100, 100, 100)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    plain = saved(tmp_path, p, "p.png")
    assert pixel(plain, (0, 0)) == (0, 0, 0) and pixel(plain, (1, 0)) == (10, 200, 30)
    transparent = saved(tmp_path, p, "pt.png", transparency=0)
    assert pixel(transparent, (0, 0)) == (255, 255, 255) and pixel(transparent, (1, 0)) == (10, 200, 30)
    gif = saved(tmp_path, p, "pt.gif", transparency=0)
    assert pixel(gif, (0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("suffix", ["jpg", "tif"])
def test_cmyk(tmp_path, suffix):
    path = saved(tmp_path, Image.new("CMYK", (4, 4), (0, 255, 0, 0)), f"magenta.{suffix}")
    assert all(abs(a - b) <= 2 for a, b in zip(pixel(path), (255, 0, 255)))


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_grayscale_uses_its_range(tmp_path, suffix):
    # a 12-bit sensor in a 16-bit file: values 0..4095, which a naive 8-bit cut would turn black
    values = (np.arange(64).reshape(8, 8) * 65).astype(np.uint16)
    path = saved(tmp_path, Image.fromarray(values), f"g16.{suffix}")
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[7, 7].tolist() == [255, 255, 255]
    expected = np.round(values / values.max() * 255)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    flat = saved(tmp_path, Image.fromarray(np.full((4, 4), 40000, np.uint16)), f"flat.{suffix}")
    assert pixel(flat) == (156, 156, 156)  # a flat image keeps its level (40000 / 257)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (30, 20), "red")
    stored.paste((0, 0, 255), (15, 0, 30, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = saved(tmp_path, stored, "rotated.png", exif=exif)
    image = load_image(path)
    assert image.size == (20, 30)
    assert image.getpixel((10, 2)) == (255, 0, 0) and image.getpixel((10, 27)) == (0, 0, 255)


def png_header_only(path, width, height):
    """A PNG whose header claims ``width`` x ``height``: the sizes are refused before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    data += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    path.write_bytes(data + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    return path


def test_decompression_bombs_and_absurd_shapes_are_refused(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    reason = check_image(png_header_only(tmp_path / "big.png", side, side))
    assert reason and f"over {MAX_PIXELS:,} pixels" in reason and "decompression bomb" in reason
    reason = check_image(png_header_only(tmp_path / "bomb.png", 50_000, 50_000))  # past Pillow's own guard
    assert reason and ("DecompressionBomb" in reason or "pixels" in reason)
    reason = check_image(png_header_only(tmp_path / "strip.png", 20_000, 10))
    assert reason and "aspect ratio over 100:1" in reason


def test_paths_escaping_the_image_root_are_refused(tmp_path):
    root = tmp_path / "images"
    assert resolve_image_path("a/b.png", root) == str(root / "a" / "b.png")
    assert resolve_image_path(str(root / "c.png"), root) == str(root / "c.png")  # absolute, inside
    assert resolve_image_path("a/../c.png", root) == str(root / "c.png")
    for bad in ("../secret.png", "a/../../secret.png", "/etc/passwd", str(tmp_path / "images2" / "x.png")):
        with pytest.raises(ValueError, match="escapes the image root"):
            resolve_image_path(bad, root)
    with pytest.raises(ValueError, match="is a URL"):
        resolve_image_path("https://example.com/a.png", root)


def test_missing_empty_and_corrupt_files_are_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    assert "not found" in check_image(tmp_path / "none.png")
    assert "empty file" in check_image(tmp_path / "empty.png")
    assert "cannot be decoded" in check_image(tmp_path / "bad.png")

"""Safe image I/O: every hostile case on a real file the test writes (data_recipes.image_io)."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from data_recipes.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, probe_image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _noise(width: int = 64, height: int = 48) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR claims width x height (the pixel data is absent)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _expect_error(source, *fragments: str, **options) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as caught:
        load_image(source, **options)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def test_good_png_round_trips_exactly(tmp_path):
    image = _noise()
    path = _write(tmp_path, "ok.png", _encode(image, "PNG"))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)
    path.unlink()  # fully decoded: nothing still reads the file
    assert np.array_equal(np.asarray(loaded), np.asarray(image))
    assert probe_image(_encode(image, "PNG")) == (64, 48)


def test_error_fields_and_pickling(tmp_path):
    path = _write(tmp_path, "notes.png", b"this is a text file, not a picture\n")
    error = _expect_error(path, str(path), "not a recognized image", "expected one of PNG, JPEG")
    assert isinstance(error, ValueError)
    assert error.source == str(path) and str(error) == f"{error.source}: {error.reason}"
    again = pickle.loads(pickle.dumps(error))
    assert (again.source, again.reason) == (error.source, error.reason)


@pytest.mark.parametrize("keep", ["half", "header"])
def test_truncated_png(tmp_path, keep):
    data = _encode(_noise(), "PNG")
    cut = len(data) // 2 if keep == "half" else 60
    path = _write(tmp_path, "cut.png", data[:cut])
    error = _expect_error(path, str(path))
    assert "truncated" in error.reason or "cut short" in error.reason


def test_png_missing_only_its_end_chunk_is_still_truncated(tmp_path):
    data = _encode(_noise(), "PNG")
    path = _write(tmp_path, "no_iend.png", data[:-12])  # every pixel present, IEND gone
    _expect_error(path, str(path), "truncated")


@pytest.mark.parametrize("cut", [0.5, 0.9, "eoi"])
def test_truncated_jpeg(tmp_path, cut):
    data = _encode(_noise(), "JPEG", quality=90)
    keep = len(data) - 2 if cut == "eoi" else int(len(data) * cut)
    path = _write(tmp_path, "cut.jpg", data[:keep])
    _expect_error(path, str(path), "truncated", "expected a complete JPEG file")
    with pytest.raises(ImageLoadError, match="truncated"):
        probe_image(path)


def test_corrupt_png_data_and_header(tmp_path):
    data = bytearray(_encode(_noise(), "PNG"))
    data[200:260] = b"\xff" * 60  # inside the compressed pixel stream
    path = _write(tmp_path, "garbled.png", bytes(data))
    _expect_error(path, str(path), "corrupt")
    header = bytearray(_encode(_noise(), "PNG"))
    header[18] ^= 0xFF  # width byte of IHDR: its CRC no longer matches
    path = _write(tmp_path, "bad_header.png", bytes(header))
    _expect_error(path, "starts like a PNG file but its header is invalid")


def test_random_bytes_with_jpeg_extension(tmp_path):
    path = _write(tmp_path, "noise.jpg", np.random.default_rng(1).bytes(4096))
    _expect_error(path, "not a recognized image")


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow: red
    path = _write(tmp_path, "cmyk.jpg", _encode(cmyk, "JPEG", quality=100))
    assert Image.open(path).mode == "CMYK"
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded).astype(int) - [255, 0, 0]).max() <= 3


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue
    path = _write(tmp_path, "rgba.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    out = np.asarray(load_image(path)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert np.abs(out[0, 2] - [127, 127, 255]).max() <= 1


def test_la_composited_on_white(tmp_path):
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (100, 255)])
    path = _write(tmp_path, "la.png", _encode(la, "PNG"))
    assert Image.open(path).mode == "LA"
    out = np.asarray(load_image(path))
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0], [100, 100, 100]]


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2])
    path = _write(tmp_path, "p.png", _encode(palette, "PNG", transparency=1))
    assert Image.open(path).info.get("transparency") == 1
    out = np.asarray(load_image(path))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 255]]  # index 1 (red) is transparent


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = _write(tmp_path, "gray16.png", _encode(Image.fromarray(values), "PNG"))
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 4, 128, 255] and (out[..., 0] == out[..., 2]).all()


def test_float_and_out_of_range_int_modes(tmp_path):
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    path = _write(tmp_path, "float.tif", _encode(floats, "TIFF"))
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[70000]], dtype=np.int32))
    path = _write(tmp_path, "wide.tif", _encode(wide, "TIFF"))
    _expect_error(path, "expected 0..65535")


def test_one_bit_and_other_formats(tmp_path):
    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    assert np.asarray(load_image(_encode(bilevel, "PNG")))[0, :, 0].tolist() == [0, 255]
    for fmt in ("GIF", "BMP", "WEBP", "TIFF", "PPM"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        loaded = load_image(_encode(Image.new("RGB", (5, 4), (10, 20, 30)), fmt, **options))
        assert loaded.size == (5, 4)
        assert np.abs(np.asarray(loaded).astype(int) - [10, 20, 30]).max() <= 2, fmt


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _write(tmp_path, "rotated.jpg", _encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # width and height swapped
    top, bottom = np.asarray(loaded)[5, 10].astype(int), np.asarray(loaded)[35, 10].astype(int)
    assert np.abs(top - [255, 0, 0]).max() <= 8  # the left (red) column is now on top
    assert np.abs(bottom - [0, 0, 255]).max() <= 8
    assert probe_image(path) == (20, 40)


def test_decompression_bomb_header_beyond_pillow_limit(tmp_path):
    path = _write(tmp_path, "bomb.png", _png_header_only(100_000, 100_000))
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    _expect_error(
        path, str(path), "decompression-bomb", f"max_pixels={DEFAULT_MAX_PIXELS}", "MAX_IMAGE_PIXELS"
    )
    assert Image.MAX_IMAGE_PIXELS == limit_before and warnings.filters == filters_before


def test_decompression_bomb_header_under_pillow_hard_limit(tmp_path):
    # 90 M pixels: above Pillow's warning threshold and our default limit, below Pillow's hard error.
    path = _write(tmp_path, "big.png", _png_header_only(10_000, 9_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        _expect_error(path, "10000x9000 = 90000000 pixels", f"limit of {DEFAULT_MAX_PIXELS}", "max_pixels")


def test_configurable_pixel_limit_on_a_real_image(tmp_path):
    path = _write(tmp_path, "plain.png", _encode(Image.new("RGB", (300, 200), (1, 2, 3)), "PNG"))
    _expect_error(path, "300x200 = 60000 pixels", "limit of 59999", "max_pixels", max_pixels=59_999)
    assert load_image(path, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageLoadError, match="limit of 100 pixels"):
        probe_image(path, max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_zero_size_and_one_pixel_images(tmp_path):
    path = _write(tmp_path, "zero.png", _png_header_only(0, 0))
    _expect_error(path, "zero-size image (0x0)")
    tiny = _write(tmp_path, "one.png", _encode(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"))
    loaded = load_image(tiny)
    assert loaded.size == (1, 1) and loaded.getpixel((0, 0)) == (7, 8, 9)
    _expect_error(tiny, "image is 1x1; expected at least 2x2 pixels", min_size=2)


def test_missing_empty_and_directory_sources(tmp_path):
    missing = tmp_path / "nowhere.png"
    _expect_error(missing, str(missing), "file not found")
    empty = _write(tmp_path, "empty.jpg", b"")
    _expect_error(empty, str(empty), "empty file (0 bytes)")
    _expect_error(tmp_path, "not a regular file")
    _expect_error(b"", "<bytes>", "empty data")
    with pytest.raises(ImageLoadError, match="file not found"):
        probe_image(missing)


def test_bytes_and_stream_sources_with_names():
    data = _encode(Image.new("RGB", (3, 2), (9, 9, 9)), "PNG")
    assert load_image(data).size == (3, 2)
    assert load_image(io.BytesIO(data)).size == (3, 2)
    error = _expect_error(data[:40], name="shard-0001.tar:000042.png")
    assert error.source == "shard-0001.tar:000042.png"
    error = _expect_error(io.BytesIO(b"not an image"))
    assert error.source == "<bytes>"


def test_unsupported_format_is_refused_not_rendered(tmp_path):
    # EPS would run Ghostscript inside Pillow; it is outside SUPPORTED_FORMATS.
    path = _write(tmp_path, "drawing.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _expect_error(path, "not a recognized image")

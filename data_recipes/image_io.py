"""Safe image I/O in one place: every image the project reads from disk or a shard goes through `load_image`.

Input is hostile (DESIGN.md section 5). `load_image` returns a fully decoded, EXIF-transposed, 8-bit RGB image or
raises `ImageLoadError` naming the source and what was expected: missing, empty or non-image files, formats outside
`SUPPORTED_FORMATS` (no Ghostscript-backed EPS and similar), truncated or corrupt data, decompression bombs (pixel
count read from the header, before decoding, against a per-call `max_pixels`), images below `min_size`.
Modes: RGBA/LA/PA and P/L/RGB with a transparency key are composited on white; CMYK, YCbCr, 1 and L are
converted; 16-bit (I;16*, I) is scaled from 0..65535 and float (F) from 0..1 (or taken as 0..255).

No global Pillow state is changed: `Image.MAX_IMAGE_PIXELS` and `ImageFile.LOAD_TRUNCATED_IMAGES` are left
alone. Pillow's own hard bomb limit (2 x `Image.MAX_IMAGE_PIXELS`) still applies; a `max_pixels` above it also
needs that raised by the application (the error message says so).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS: int = 64_000_000
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG covers MPO
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)
_WHITE = (255, 255, 255, 255)


class ImageLoadError(ValueError):
    """An image that cannot be used; `source` is the file path (or the caller's name, or "<bytes>")."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")

    def __reduce__(self):  # keep the two fields through pickling (DataLoader workers)
        return (type(self), (self.source, self.reason))


def _read_source(source: str | os.PathLike | bytes | BinaryIO, name: str | None) -> tuple[bytes | Path, str]:
    """The raw input (bytes, or a path known to be a non-empty file) and its display name."""
    if isinstance(source, bytes | bytearray | memoryview):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageLoadError(label, "empty data (0 bytes); expected an encoded image")
        return data, label
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise ImageLoadError(label, "file not found; expected an existing image file")
        if not path.is_file():
            raise ImageLoadError(label, "not a regular file; expected an image file")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageLoadError(label, f"cannot read file ({exc})") from exc
        if size == 0:
            raise ImageLoadError(label, "empty file (0 bytes); expected an encoded image")
        return path, label
    if hasattr(source, "read"):
        label = name or (source.name if isinstance(getattr(source, "name", None), str) else "<bytes>")
        try:
            data = source.read()
        except (OSError, ValueError) as exc:
            raise ImageLoadError(label, f"cannot read stream ({exc})") from exc
        if not isinstance(data, bytes):
            raise TypeError(f"load_image: stream {label} must be opened in binary mode")
        if not data:
            raise ImageLoadError(label, "empty data (0 bytes); expected an encoded image")
        return data, label
    raise TypeError(f"load_image: expected a path, bytes or a binary stream, got {type(source).__name__}")


def _check_limits(max_pixels: int, min_size: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive integer, got {max_pixels!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size: expected an integer >= 1, got {min_size!r}")


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),
)


def _unidentified_reason(stream: BinaryIO) -> str:
    """Why Pillow could not identify the data: a known signature with a bad header (e.g. a 0x0 PNG), or no image."""
    stream.seek(0)
    head = stream.read(32)
    expected = f"expected one of {', '.join(SUPPORTED_FORMATS)}"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            if fmt == "PNG" and len(head) >= 24 and head[12:16] == b"IHDR":
                width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
                if width == 0 or height == 0:
                    return f"PNG header declares a zero-size image ({width}x{height}); expected at least 1x1 pixels"
            return f"starts like a {fmt} file but its header is invalid or cut short; expected a valid {fmt} header"
    return f"not a recognized image; {expected}"


def _bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} pixels "
        "(decompression-bomb guard); pass a larger max_pixels to load it if the file is trusted"
    )


def _decode(raw: bytes | Path, label: str, max_pixels: int, min_size: int) -> Image.Image:
    """Open, check the header size, fully decode and EXIF-transpose; every failure becomes ImageLoadError."""
    stream = io.BytesIO(raw) if isinstance(raw, bytes) else open(raw, "rb")  # closed in finally
    try:
        with warnings.catch_warnings():
            # The size check below governs; Pillow's warning at its own (different) limit would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream, formats=SUPPORTED_FORMATS)
            except Image.DecompressionBombError as exc:
                raise ImageLoadError(
                    label,
                    f"image header claims more pixels than Pillow's hard limit ({exc}); the limit is "
                    f"max_pixels={max_pixels} (decompression-bomb guard); if the file is trusted, pass a larger "
                    "max_pixels and raise PIL.Image.MAX_IMAGE_PIXELS in the application",
                ) from exc
            except UnidentifiedImageError as exc:
                raise ImageLoadError(label, _unidentified_reason(stream)) from exc
            except Exception as exc:  # corrupt headers raise all sorts (SyntaxError, struct.error, ...)
                raise ImageLoadError(label, f"corrupt image header ({type(exc).__name__}: {exc})") from exc
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(label, _bomb_reason(width, height, max_pixels))
            if width < min_size or height < min_size:
                raise ImageLoadError(
                    label, f"image is {width}x{height}; expected at least {min_size}x{min_size} pixels"
                )
            try:
                image.load()
            except Exception as exc:
                raise ImageLoadError(
                    label,
                    f"truncated or corrupt image data ({type(exc).__name__}: {exc}); "
                    f"expected a complete {image.format} file",
                ) from exc
            _verify_structure(stream, label)
            try:
                transposed = ImageOps.exif_transpose(image)
            except Exception as exc:
                raise ImageLoadError(
                    label, f"unreadable EXIF orientation ({type(exc).__name__}: {exc})"
                ) from exc
            return transposed if transposed is not None else image
    finally:
        stream.close()


def _verify_structure(stream: BinaryIO, label: str) -> None:
    """Pillow's structural check on a second parse (for PNG: every chunk's CRC up to IEND), so a file cut after
    its pixel data is still reported as truncated."""
    stream.seek(0)
    try:
        with Image.open(stream, formats=SUPPORTED_FORMATS) as again:
            again.verify()
    except Exception as exc:
        raise ImageLoadError(
            label, f"truncated or corrupt file structure ({type(exc).__name__}: {exc})"
        ) from exc


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        return _composite_on_white(image)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageLoadError(
                label, f"{mode} image with values in [{values.min()}, {values.max()}]; expected 0..65535"
            )
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 255):
            raise ImageLoadError(
                label, "float image with values outside 0..255 (or NaN/inf); expected 0..1 or 0..255"
            )
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise ImageLoadError(label, f"cannot convert mode {mode} to RGB ({exc})") from exc


def load_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
    name: str | None = None,
) -> Image.Image:
    """A fully decoded, EXIF-transposed 8-bit RGB image, or ImageLoadError saying why not.

    `name` replaces the source in messages (e.g. "shard-0001.tar:000042.jpg" for bytes read from a tar).
    """
    _check_limits(max_pixels, min_size)
    raw, label = _read_source(source, name)
    image = _decode(raw, label, max_pixels, min_size)
    return _to_rgb(image, label)


def probe_image(
    source: str | os.PathLike | bytes | BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) as `load_image` would return it, after fully decoding the data; same errors."""
    _check_limits(max_pixels, 1)
    raw, label = _read_source(source, None)
    image = _decode(raw, label, max_pixels, 1)
    _to_rgb(image, label)  # the same mode checks as load_image (e.g. out-of-range 16-bit data)
    return image.size

"""Safe image decoding: validate untrusted image files and turn them into RGB.

Every image that enters a canonical dataset goes through :func:`prepare_image`, which
rejects what training could not use (missing, empty, not an image, truncated,
decompression bomb, too small, aspect ratio over 200:1, or anything else PIL fails on) with an :class:`ImageError` whose ``reason`` is one of the
short phrases below, and returns the bytes to store. Readers decode stored bytes with
:func:`decode_image`, which applies the same rules and always returns an RGB image.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485
"""Largest width * height accepted by default (PIL's own ``MAX_IMAGE_PIXELS``)."""

# Reasons an image is rejected (``ImageError.reason``); the preprocessing report counts them.
MISSING_FILE = "missing file"
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image"
TRUNCATED_IMAGE = "truncated image"
CORRUPT_IMAGE = "corrupt image"
DECOMPRESSION_BOMB = "decompression bomb"
IMAGE_TOO_SMALL = "image under minimum side"
EXTREME_ASPECT_RATIO = "aspect ratio over 200:1"
UNSUPPORTED_MODE = "unsupported image mode"

MAX_ASPECT_RATIO = 200
"""Longest side / shortest side accepted: the Qwen-VL processors refuse anything wider."""

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_KEEP_FORMATS = ("JPEG", "PNG")

ImageSource = bytes | bytearray | memoryview | str | Path


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is a short phrase, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep both fields when sent between processes
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class PreparedImage:
    """A validated image: the bytes to store and its size after EXIF orientation."""

    data: bytes
    width: int
    height: int


def check_and_decode(
    data: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 8
) -> Image.Image:
    """Decode ``data`` (encoded bytes or a file path) into an upright RGB image.

    The pixel count is checked from the header before any pixel is decoded
    (``max_pixels=None`` disables the check), the whole first frame is then decoded so a
    truncated file is caught here, EXIF orientation is applied and the mode is converted
    with :func:`to_rgb`. Raises :class:`ImageError` for anything unusable.
    """
    return _decode(_read_bytes(data), max_pixels, min_side)[0]


def prepare_image(
    data: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 8
) -> PreparedImage:
    """Validate an image like :func:`check_and_decode` and return the bytes to store.

    The original bytes are kept when they already are a single-frame RGB JPEG or PNG
    that needs no EXIF rotation; anything else is re-encoded as PNG. The result depends
    only on the input bytes, so preprocessing the same data twice gives the same bytes.
    """
    raw = _read_bytes(data)
    img, keep_original = _decode(raw, max_pixels, min_side)
    try:
        stored = raw if keep_original else encode_image(img)
    except (OSError, ValueError) as err:  # PIL could decode it but not write it back
        raise ImageError(CORRUPT_IMAGE, f"cannot re-encode: {err}"[:500]) from err
    return PreparedImage(stored, img.width, img.height)


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode stored image bytes (e.g. one entry of a canonical row's ``images``) to RGB."""
    return check_and_decode(data, max_pixels=max_pixels, min_side=1)


def encode_image(img: Image.Image, format: str = "PNG") -> bytes:
    """Encode ``img`` as RGB without metadata; the same pixels always give the same bytes."""
    rgb = to_rgb(img)
    if rgb is img:  # do not strip the caller's metadata in place
        rgb = img.copy()
    rgb.info.clear()  # no ICC profile, EXIF or text chunks from the source
    options = {"quality": 95} if format.upper() in ("JPEG", "JPG") else {}
    buffer = io.BytesIO()
    rgb.save(buffer, format=format, **options)
    return buffer.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; returns ``img`` itself when it already is RGB.

    Transparent images (LA, RGBA, palette with transparency, ...) are composited over
    white; 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is read as 16-bit data
    and scaled to 8 bits (65535 -> 255); CMYK, 1-bit, L, YCbCr use PIL's conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    try:
        if _has_transparency(img):
            return _flatten_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    except ValueError as err:  # PIL has no conversion for this mode
        raise ImageError(UNSUPPORTED_MODE, f"cannot convert mode {img.mode} to RGB") from err


def _read_bytes(data: ImageSource) -> bytes:
    """The encoded bytes of ``data``, a file path or bytes; missing and empty are errors."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        path = Path(data)
        try:
            if not path.exists():
                raise ImageError(MISSING_FILE, str(path))
            if not path.is_file():
                raise ImageError(NOT_AN_IMAGE, f"{path} is not a regular file")
            raw = path.read_bytes()
        except ImageError:
            raise
        except (OSError, ValueError) as err:  # name too long, NUL byte, unreadable
            raise ImageError(MISSING_FILE, f"{type(err).__name__}: {err}"[:500]) from err
    if not raw:
        raise ImageError(EMPTY_FILE, "0 bytes")
    return raw


@contextmanager
def _strict_pil() -> Iterator[None]:
    """Let PIL fail on truncated data, and leave the pixel-count check to us.

    PIL's own bomb check warns or raises at a fixed global limit; ours runs on the header
    with the caller's ``max_pixels`` instead. Both settings are process-wide: they are
    restored afterwards, but threads decoding at the same moment see them too.
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode(raw: bytes, max_pixels: int | None, min_side: int) -> tuple[Image.Image, bool]:
    """RGB image of ``raw``'s first frame, and whether ``raw`` can be stored unchanged.

    Any error PIL raises on hostile bytes that the steps below do not classify (a broken
    EXIF block, a frame count that cannot be read, a failed mode conversion) is a
    ``corrupt image``, never an exception of another type.
    """
    try:
        return _decode_checked(raw, max_pixels, min_side)
    except ImageError:
        raise
    except Exception as err:  # hostile bytes: whatever PIL raised, the image is unusable
        raise ImageError(CORRUPT_IMAGE, f"{type(err).__name__}: {err}"[:500]) from err


def _decode_checked(raw: bytes, max_pixels: int | None, min_side: int) -> tuple[Image.Image, bool]:
    with _strict_pil():
        img = _open(raw)
        _check_size(img, max_pixels, min_side)
        _load(img)
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    keep_original = (
        img.format in _KEEP_FORMATS
        and img.mode == "RGB"
        and orientation == 1
        and getattr(img, "n_frames", 1) == 1
    )
    upright = ImageOps.exif_transpose(img) if orientation != 1 else img
    return to_rgb(upright), keep_original


def _open(raw: bytes) -> Image.Image:
    """Read only the header of ``raw``."""
    try:
        return Image.open(io.BytesIO(raw))
    except UnidentifiedImageError as err:
        raise ImageError(NOT_AN_IMAGE, f"unrecognised format (starts with {raw[:8]!r})") from err
    except (OSError, SyntaxError, ValueError) as err:  # a known format with a broken header
        raise ImageError(NOT_AN_IMAGE, str(err) or type(err).__name__) from err


def _check_size(img: Image.Image, max_pixels: int | None, min_side: int) -> None:
    """Reject by the header's size, before any pixel is decoded."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} pixels > {max_pixels}"
        )
    if min(width, height) < min_side:
        raise ImageError(IMAGE_TOO_SMALL, f"{width}x{height}, minimum side is {min_side}")
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise ImageError(
            EXTREME_ASPECT_RATIO, f"{width}x{height}; the Qwen-VL processors refuse over 200:1"
        )


def _load(img: Image.Image) -> None:
    """Decode every pixel of the current (first) frame."""
    try:
        img.load()
    except EOFError as err:
        raise ImageError(TRUNCATED_IMAGE, str(err) or "unexpected end of data") from err
    except (OSError, SyntaxError, ValueError) as err:
        message = str(err) or type(err).__name__
        reason = TRUNCATED_IMAGE if "truncated" in message.lower() else CORRUPT_IMAGE
        raise ImageError(reason, message) from err


def _has_transparency(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale to 8 bits with rounding: 0 -> 0, 257 -> 1, 65535 -> 255."""
    values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")

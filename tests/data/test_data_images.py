"""Safe image decoding: every rejection reason, orientation, modes, animation, bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlreason.data import images
from vlreason.data.images import (
    ImageError,
    check_and_decode,
    decode_image,
    encode_image,
    prepare_image,
    to_rgb,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _reason(data, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        check_and_decode(data, **kwargs)
    return info.value.reason


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- rejections


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.png") == images.MISSING_FILE


def test_empty_file_and_empty_bytes(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert _reason(tmp_path / "empty.png") == images.EMPTY_FILE
    assert _reason(b"") == images.EMPTY_FILE


def test_not_an_image(tmp_path):
    (tmp_path / "text.png").write_text("hello, not a picture")
    assert _reason(tmp_path / "text.png") == images.NOT_AN_IMAGE
    assert _reason(str(tmp_path)) == images.NOT_AN_IMAGE  # a folder


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    assert _reason(data[: len(data) // 2]) == images.TRUNCATED_IMAGE


def test_decompression_bomb_checked_from_header_before_decoding():
    # 100000 x 100000 claimed by a 33-byte file: decoding would need 30 GB.
    assert _reason(_png_header_only(100_000, 100_000)) == images.DECOMPRESSION_BOMB


def test_pixel_cap_is_configurable():
    data = _encode(Image.new("RGB", (40, 40)))
    assert _reason(data, max_pixels=40 * 40 - 1) == images.DECOMPRESSION_BOMB
    assert check_and_decode(data, max_pixels=40 * 40).size == (40, 40)


def test_our_cap_replaces_pils_global_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 40x40
    data = _encode(Image.new("RGB", (40, 40)))
    assert check_and_decode(data, max_pixels=10_000).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored afterwards


def test_image_under_min_side():
    data = _encode(Image.new("RGB", (20, 4)))
    assert _reason(data, min_side=8) == images.IMAGE_TOO_SMALL
    assert check_and_decode(data, min_side=4).size == (20, 4)


def test_image_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageError(images.EMPTY_FILE, "0 bytes")))
    assert (err.reason, err.detail) == (images.EMPTY_FILE, "0 bytes")


# ----------------------------------------------------------------------------- orientation


def test_exif_orientation_is_applied():
    # Stored 20 wide x 10 high, red on the left half; orientation 6 = rotate 90 deg clockwise.
    stored = Image.new("RGB", (20, 10), BLUE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "PNG", exif=exif.tobytes())

    upright = check_and_decode(data)
    assert upright.size == (10, 20)
    assert upright.getpixel((5, 2)) == RED  # the left half is now on top
    assert upright.getpixel((5, 17)) == BLUE

    prepared = prepare_image(data)
    assert prepared.data != data  # re-encoded without the rotation flag
    assert (prepared.width, prepared.height) == (10, 20)
    assert decode_image(prepared.data).getpixel((5, 2)) == RED


# ----------------------------------------------------------------------------- modes


def _single_pixel(img: Image.Image) -> tuple[int, int, int]:
    rgb = check_and_decode(_encode(img))
    assert rgb.mode == "RGB"
    return rgb.getpixel((0, 0))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
        (lambda: Image.new("1", (8, 8), 1), WHITE),
        (lambda: Image.new("LA", (8, 8), (0, 0)), WHITE),  # fully transparent black
        (lambda: Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), WHITE),
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 255)), RED),
        (lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
    ],
    ids=["L", "1", "LA-clear", "LA-opaque", "RGBA-clear", "RGBA-opaque", "RGBA-half"],
)
def test_modes_to_rgb(make, expected):
    assert _single_pixel(make()) == expected


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert _single_pixel(palette) == RED
    palette.info["transparency"] = 1  # palette index 1 is transparent
    assert _single_pixel(palette) == WHITE


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    r, g, b = check_and_decode(_encode(cmyk, "JPEG", quality=100)).getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535] * 2] * 8, dtype=np.uint16)
    rgb = check_and_decode(_encode(Image.fromarray(values)))  # 16-bit PNG opens as I;16
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_thirty_two_bit_integer_mode_is_read_as_sixteen_bit():
    img = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32), mode="I")
    assert to_rgb(img).getpixel((0, 0)) == WHITE


# ----------------------------------------------------------------------------- animation


def _two_frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})],
    ids=["gif", "apng", "webp"],
)
def test_animated_takes_first_frame(fmt, options):
    first, second = _two_frames()
    data = _encode(first, fmt, save_all=True, append_images=[second], duration=100, **options)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert check_and_decode(data).getpixel((8, 8)) == RED
    prepared = prepare_image(data)
    assert prepared.data != data and Image.open(io.BytesIO(prepared.data)).n_frames == 1


# ----------------------------------------------------------------------------- stored bytes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_rgb_png_and_jpeg_keep_original_bytes(fmt):
    data = _encode(Image.new("RGB", (16, 12), RED), fmt)
    prepared = prepare_image(data)
    assert prepared.data == data
    assert (prepared.width, prepared.height) == (16, 12)


def test_other_sources_are_reencoded_as_png(tmp_path):
    path = tmp_path / "a.bmp"
    Image.new("RGB", (16, 16), RED).save(path)
    prepared = prepare_image(path)
    assert prepared.data.startswith(b"\x89PNG")
    assert decode_image(prepared.data).getpixel((0, 0)) == RED


def test_encode_is_deterministic_and_strips_metadata():
    img = Image.new("RGBA", (16, 16), (10, 20, 30, 255))
    img.info["icc_profile"] = b"not a real profile"
    first, second = encode_image(img), encode_image(img.copy())
    assert first == second
    assert "icc_profile" in img.info  # the caller's image is untouched
    assert "icc_profile" not in Image.open(io.BytesIO(first)).info
    assert decode_image(first).getpixel((0, 0)) == (10, 20, 30)


def test_encode_jpeg():
    data = encode_image(Image.new("L", (16, 16), 200), format="JPEG")
    assert Image.open(io.BytesIO(data)).format == "JPEG"

"""Fuzzing ``preprocess``: hostile images, JSONL lines and parquet rows never crash it, and
every input row is accounted for (``kept + rejected == total`` in report.json, ``total``
== the rows of the input, the dataset holds ``kept`` rows).

Inputs: random bytes as images; PNG / JPEG files truncated or bit-flipped at random
offsets; a decompression bomb (a PNG header claiming 100,000 x 100,000 pixels) and a
1700 x 8 image (aspect ratio over 200:1, which the Qwen-VL processor refuses), both
rejected with their reason; JSONL lines that are invalid JSON, not objects, have wrong
types, missing keys, huge strings, >4300-digit integers, deep nesting, lone surrogates or
NUL bytes; parquet files whose columns hold the wrong types; parquet files with flipped
bytes (a clean PreprocessError, or rows accounted for).

Found and fixed with these tests (data_pipelines/, vlreason/data/images.py): a JSONL line
with a huge integer or deep nesting raised out of the reader; lone surrogates reached
the Arrow writer and report.json; an image dict whose ``bytes`` held a string was read as
a file path; NUL bytes and over-long names in image paths raised from ``Path``; an
unreadable page in the middle of a parquet file raised a pyarrow error; a box holding an
integer too large for a float raised OverflowError; a labels.csv cell over csv's field
size limit raised csv.Error.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_pipelines.preprocess import PreprocessError, preprocess
from vlreason.data import images
from vlreason.data.images import ImageError, decode_image, prepare_image
from vlreason.data.schema import load_canonical

FUZZ = settings(
    max_examples=12,
    deadline=timedelta(seconds=30),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


PNG = _encode(_noise(), "PNG")
JPEG = _encode(_noise(), "JPEG")


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` pixels."""
    png = bytearray(_encode(Image.new("RGB", (16, 16)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(png)


WIDE = _encode(Image.new("RGB", (1700, 8), (0, 128, 0)), "PNG")


@st.composite
def mutated_images(draw) -> bytes:
    """Random bytes, or a PNG / JPEG truncated and/or with some bits flipped."""
    kind = draw(st.sampled_from(["random", "png", "jpeg"]))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    data = bytearray(PNG if kind == "png" else JPEG)
    for _ in range(draw(st.integers(0, 6))):
        offset = draw(st.integers(0, len(data) - 1))
        data[offset] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=150, deadline=timedelta(seconds=10))
@given(data=mutated_images())
def test_prepare_image_accepts_or_rejects_with_a_reason(data):
    """Hostile bytes give a PreparedImage that decodes again, or an ImageError."""
    try:
        prepared = prepare_image(data)
    except ImageError as err:
        assert err.reason
        return
    assert decode_image(prepared.data).size == (prepared.width, prepared.height)


def test_bomb_and_extreme_aspect_ratio_are_rejected_with_reasons():
    with pytest.raises(ImageError) as bomb:
        prepare_image(_bomb_png())
    assert bomb.value.reason == images.DECOMPRESSION_BOMB
    with pytest.raises(ImageError) as wide:
        prepare_image(WIDE)
    assert wide.value.reason == images.EXTREME_ASPECT_RATIO
    assert prepare_image(_encode(Image.new("RGB", (1600, 8)), "PNG")).width == 1600  # 200:1


# --------------------------------------------------------------------------- JSONL

_GOOD = {"image": "imgs/good.png", "question": "What colour?", "answer": "red"}
_IMAGE_NAMES = ["good.png", "good.jpg", "bomb.png", "wide.png", "empty.png", "fuzz.png"]

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)

_image_fields = (
    st.sampled_from([f"imgs/{n}" for n in _IMAGE_NAMES])
    | st.sampled_from(["../outside.png", "/etc/passwd", "imgs/missing.png", "imgs/\x00.png",
                       "imgs/" + "x" * 5000 + ".png", "imgs", "imgs/\ud800.png"])
    | st.lists(st.sampled_from([f"imgs/{n}" for n in _IMAGE_NAMES]), max_size=3)
    | st.fixed_dictionaries({"bytes": st.text(max_size=10) | st.none(), "path": _values})
    | _values
)

_hostile_text = st.sampled_from(
    ["", " ", "\x00", "\ud800", "\u202e", "x" * 200_000, "<image>", "<image><image>",
     "<answer>" * 20_000, "<think>a</think><answer>4</answer>"]
) | st.text(max_size=30)


@st.composite
def jsonl_lines(draw) -> str:
    """One JSONL line: a good row with some fields replaced, or raw junk."""
    kind = draw(st.sampled_from(["row", "row", "row", "junk", "value", "deep", "bigint", "bigbox"]))
    if kind == "junk":
        return draw(st.sampled_from(["{", "[1, 2", "nul\x00l", "{'a': 1}", "\ud800"]) | st.text(max_size=40))
    if kind == "value":
        return json.dumps(draw(_values))
    if kind == "deep":
        return "[" * 100_000 + "]" * 100_000
    if kind == "bigint":
        return '{"id": ' + "9" * 5000 + ', "image": "imgs/good.png", "question": "q", "answer": "a"}'
    if kind == "bigbox":  # parses (under 4300 digits) but overflows a float
        return json.dumps(dict(_GOOD, boxes=[0, 0, 10**400, 5]))
    row = dict(_GOOD)
    for key in draw(st.lists(st.sampled_from(list(_GOOD) + ["id", "boxes", "choices", "meta",
                                                          "solution", "problem", "images"]),
                             max_size=4, unique=True)):
        if draw(st.booleans()):
            row.pop(key, None)
        elif key in ("image", "images"):
            row[key] = draw(_image_fields)
        else:
            row[key] = draw(_hostile_text | _values)
    return json.dumps(row, ensure_ascii=draw(st.booleans()))


def _image_folder(root: Path, fuzz: bytes) -> None:
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    for name, data in zip(_IMAGE_NAMES, [PNG, JPEG, _bomb_png(), WIDE, b"", fuzz]):
        (imgs / name).write_bytes(data)
    (root.parent / "outside.png").write_bytes(PNG)


def _check_accounting(out: Path, expected_total: int) -> dict:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["total"] == expected_total
    assert report["kept"] + report["rejected"] == report["total"]
    assert report["rejected"] == len(report["rejected_rows"])
    assert all(isinstance(r["reason"], str) and r["reason"] for r in report["rejected_rows"])
    assert len(load_canonical(out)) == report["kept"]
    return report


def _write_lines(path: Path, lines: list[str]) -> int:
    """Write ``lines`` (surrogates as raw bytes, i.e. invalid UTF-8); the non-blank count."""
    data = b"".join(line.encode("utf-8", "surrogatepass") + b"\n" for line in lines)
    path.write_bytes(data)
    return sum(1 for line in data.split(b"\n") if line.strip())


@FUZZ
@given(lines=st.lists(jsonl_lines(), min_size=1, max_size=8), fuzz=mutated_images())
def test_fuzzed_jsonl_rows_are_all_accounted_for(lines, fuzz):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        _image_folder(root, fuzz)
        total = _write_lines(root / "rows.jsonl", lines)
        preprocess(root / "rows.jsonl", Path(tmp) / "out", progress=False)
        _check_accounting(Path(tmp) / "out", total)


def test_box_with_an_integer_too_large_for_a_float_is_rejected(tmp_path):
    """``math.isfinite(10**400)`` raised OverflowError out of the row checks."""
    root = tmp_path / "data"
    _image_folder(root, PNG)
    total = _write_lines(root / "rows.jsonl", [json.dumps(dict(_GOOD, boxes=[0, 0, 10**400, 5]))])
    preprocess(root / "rows.jsonl", tmp_path / "out", progress=False)
    report = _check_accounting(tmp_path / "out", total)
    assert report["rejected_by_reason"] == {"box not 4 numbers": 1}


def test_bomb_and_wide_rows_are_reported_with_their_reason(tmp_path):
    root = tmp_path / "data"
    _image_folder(root, PNG)
    rows = [dict(_GOOD, image=f"imgs/{name}") for name in ("good.png", "bomb.png", "wide.png")]
    total = _write_lines(root / "rows.jsonl", [json.dumps(r) for r in rows])
    preprocess(root / "rows.jsonl", tmp_path / "out", progress=False)
    report = _check_accounting(tmp_path / "out", total)
    reasons = {r["line"]: r["reason"] for r in report["rejected_rows"]}
    assert reasons == {2: images.DECOMPRESSION_BOMB, 3: images.EXTREME_ASPECT_RATIO}


# --------------------------------------------------------------------------- parquet


def _column(draw, n: int, kind: str) -> pa.Array:
    if kind == "image":
        values = draw(st.lists(mutated_images() | st.just(PNG) | st.none(), min_size=n, max_size=n))
        return pa.array(values, type=pa.binary())
    if kind == "str":
        return pa.array(draw(st.lists(_hostile_text.filter(_utf8_ok) | st.none(), min_size=n, max_size=n)))
    if kind == "int":
        return pa.array(draw(st.lists(st.integers(-(2**63), 2**63 - 1) | st.none(), min_size=n, max_size=n)))
    if kind == "list":
        return pa.array(draw(st.lists(st.lists(st.text(max_size=5).filter(_utf8_ok), max_size=3),
                                      min_size=n, max_size=n)))
    return pa.array(draw(st.lists(st.fixed_dictionaries({"bytes": st.binary(max_size=50),
                                                        "path": st.text(max_size=5).filter(_utf8_ok)}),
                                  min_size=n, max_size=n)))


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def parquet_tables(draw) -> pa.Table:
    """A table whose image / question / answer columns have random (often wrong) types."""
    n = draw(st.integers(1, 6))
    kinds = ["image", "str", "int", "list", "struct"]
    columns = {
        "image": _column(draw, n, draw(st.sampled_from(["image", "image", "struct", "str", "int"]))),
        "question": _column(draw, n, draw(st.sampled_from(kinds))),
        "answer": _column(draw, n, draw(st.sampled_from(kinds))),
    }
    for name in draw(st.lists(st.sampled_from(["id", "boxes", "choices", "meta"]), unique=True, max_size=2)):
        columns[name] = _column(draw, n, draw(st.sampled_from(kinds)))
    return pa.table(columns)


@FUZZ
@given(table=parquet_tables())
def test_fuzzed_parquet_rows_are_all_accounted_for(table):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.parquet"
        pq.write_table(table, source)
        preprocess(source, Path(tmp) / "out", progress=False)
        _check_accounting(Path(tmp) / "out", table.num_rows)


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_parquet_file_fails_cleanly_or_accounts_for_rows(flips):
    table = pa.table({"image": pa.array([PNG] * 4, type=pa.binary()),
                      "question": ["q"] * 4, "answer": ["a"] * 4})
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.parquet"
        pq.write_table(table, source)
        data = bytearray(source.read_bytes())
        for position, bit in flips:
            data[int(position * len(data))] ^= 1 << bit
        source.write_bytes(bytes(data))
        try:
            preprocess(source, Path(tmp) / "out", progress=False)
        except PreprocessError:
            assert not (Path(tmp) / "out").exists()  # nothing half-written is published
            return
        _check_accounting(Path(tmp) / "out", pq.ParquetFile(source).metadata.num_rows)


# --------------------------------------------------------------------------- folder + CSV


def test_hostile_csv_labels_are_all_accounted_for(tmp_path):
    """A cell over csv's field size limit (it raised csv.Error out of preprocess), a bad
    JSON cell, a NUL byte, a surrogate escape: each row kept or rejected, none lost."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    lines = [
        "file,answer,question,choices",
        "a.png," + "x" * 200_000 + ",q,",
        "a.png,ok,q,[not json",
        "a.png,ok,q\x00,",
        'a.png,ok,"\\ud800",',
        "a.png,good,q,",
    ]
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    preprocess(root, tmp_path / "out", fmt="folder", progress=False)
    report = _check_accounting(tmp_path / "out", len(lines) - 1)
    assert report["kept"] >= 1
    assert "invalid CSV" in report["rejected_by_reason"]

"""Fuzzing folder input: a hostile ``labels.json`` (object or list form, random values,
hostile file names, junk) or ``labels.jsonl`` never crashes ``preprocess``; either the
labels file as a whole is refused with a clean ``PreprocessError`` (not JSON, nested too
deeply, neither an object nor a list) and nothing is written, or every entry is
accounted for: ``total`` = the entries + the images no entry names, ``kept + rejected =
total``, and the dataset holds ``kept`` rows."""

from __future__ import annotations

import io
import json
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_pipelines.preprocess import NO_LABEL, PreprocessError, preprocess
from vlreason.data.schema import load_canonical

FUZZ = settings(max_examples=15, deadline=timedelta(seconds=30),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _png(side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGES = {"a.png": _png(), "b.png": _png(), "sub/c.png": _png(), "broken.png": b"\x89PNG junk", "empty.png": b""}

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_names = st.sampled_from([*IMAGES, "missing.png", "../outside.png", "/etc/passwd", "a\x00.png", "\ud800.png",
                          "x" * 5000 + ".png", "sub", "", ".", "sub/../a.png"]) | st.text(max_size=12)
_text = st.sampled_from(["", "\x00", "\ud800", "x" * 100_000, "<image>", "<image><image>", "<answer>" * 5000]) \
    | st.text(max_size=20)


@st.composite
def entries(draw) -> dict:
    """One label entry: a good one with fields replaced or dropped, or random values."""
    entry = {"file": draw(_names), "question": "What is shown?", "answer": "a"}
    for key in draw(st.lists(st.sampled_from(["file", "image", "images", "question", "answer", "id", "boxes",
                                              "choices", "meta", "solution"]), max_size=4, unique=True)):
        if draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = draw(_names | _text | _values | st.lists(_names, max_size=3))
    return entry


@st.composite
def labels_files(draw) -> tuple[str, bytes, int | None]:
    """(file name, bytes, entries) -- entries None when the file as a whole is junk."""
    kind = draw(st.sampled_from(["object", "list", "jsonl", "junk"]))
    if kind == "junk":
        junk = draw(st.sampled_from([b"[" * 100_000 + b"]" * 100_000, b"{", b"42", b'"text"', b"\xff\xfe\x00",
                                     b"null", b'{"a": ' + b"9" * 5000 + b"}"]) | st.binary(max_size=50))
        return "labels.json", junk, None
    rows = draw(st.lists(entries(), max_size=6))
    if kind == "object":  # file name -> answer or -> fields
        data = {str(r.pop("file", "")): (r if draw(st.booleans()) else r.get("answer")) for r in rows}
        return "labels.json", json.dumps(data).encode(), len(data)
    if kind == "list":
        items = [r if draw(st.booleans()) else draw(_values) for r in rows]
        return "labels.json", json.dumps(items).encode(), len(items)
    lines = [json.dumps(r) for r in rows] + draw(st.lists(st.sampled_from(["{", "[]", "[" * 50_000]), max_size=2))
    return "labels.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"), len(lines)


@FUZZ
@given(labels=labels_files())
def test_fuzzed_labels_files_are_refused_cleanly_or_all_accounted_for(labels):
    name, data, count = labels
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "out"
        for image, content in IMAGES.items():
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            (root / image).write_bytes(content)
        (Path(tmp) / "outside.png").write_bytes(_png())
        (root / name).write_bytes(data)
        try:
            preprocess(root, out, fmt="folder", progress=False)
        except PreprocessError as err:
            assert count is None or count == 0, err  # only a labels file junk as a whole is refused
            assert not out.exists()
            return
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        unlabelled = [r for r in report["rejected_rows"] if r["reason"] == NO_LABEL]
        assert {r["file"] for r in unlabelled} <= set(IMAGES)
        if count is not None:
            assert report["total"] == count + len(unlabelled)
        assert report["kept"] + report["rejected"] == report["total"]
        assert report["rejected"] == len(report["rejected_rows"])
        assert len(load_canonical(out)) == report["kept"]

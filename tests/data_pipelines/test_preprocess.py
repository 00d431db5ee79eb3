"""`preprocess`: every row kept or reported, deterministic output, all three input formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_pipelines import preprocess as pp
from data_pipelines.preprocess import PreprocessError, preprocess
from vlreason.data import images
from vlreason.data.images import decode_image
from vlreason.data.schema import load_canonical

MAX_PIXELS = 1000  # the 16x16 test images pass, the 40x40 "bomb" does not


def _png(colour=(255, 0, 0), size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(size: int = 24) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_jsonl(path: Path, rows: list) -> None:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, list[str], dict[int, str]]:
    """A JSONL file with three good rows and one row per rejection reason.

    Returns (jsonl path, ids of the kept rows in order, {line: expected reason}).
    """
    data = tmp_path / "data"
    imgs = data / "imgs"
    imgs.mkdir(parents=True)
    (imgs / "red.png").write_bytes(_png((255, 0, 0)))
    Image.new("RGB", (16, 16), (0, 0, 255)).save(imgs / "blue.jpg", quality=95)
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "text.png").write_text("not a picture")
    (imgs / "truncated.png").write_bytes(_noise_png()[:400])
    (imgs / "big.png").write_bytes(_png(size=(40, 40)))
    (imgs / "tiny.png").write_bytes(_png(size=(4, 4)))
    (tmp_path / "outside.png").write_bytes(_png())
    (imgs / "link.png").symlink_to(tmp_path / "outside.png")

    def row(image="imgs/red.png", **fields):
        return {"image": image, "question": "What colour?", "answer": "red", **fields}

    good = [
        row(id="good-1", boxes=[[0, 0, 8, 8]], choices=["red", "blue"], meta={"k": 1}),
        {
            "images": ["imgs/red.png", "imgs/blue.jpg"],
            "problem": "Which is blue?",
            "solution": "<think>the second</think><answer>2</answer>",
        },
        row(id=7, image="imgs/blue.jpg", answer=3, boxes=[0, 0, 16, 16]),
    ]
    bad = [
        (row(image="imgs/nope.png"), images.MISSING_FILE),
        (row(image="imgs/empty.png"), images.EMPTY_FILE),
        (row(image="imgs/text.png"), images.NOT_AN_IMAGE),
        (row(image="imgs/truncated.png"), images.TRUNCATED_IMAGE),
        (row(image="imgs/big.png"), images.DECOMPRESSION_BOMB),
        (row(image="imgs/tiny.png"), images.IMAGE_TOO_SMALL),
        (row(boxes=[[0, 0, 17, 8]]), pp.BOX_OUTSIDE_IMAGE),
        (row(boxes=[[8, 0, 4, 8]]), pp.BOX_INVERTED),
        (row(boxes=[[0, 0, 8]]), pp.BOX_NOT_4_NUMBERS),
        ({"image": "imgs/red.png", "answer": "red"}, pp.MISSING_QUESTION),
        (row(question="  "), pp.MISSING_QUESTION),
        ({"image": "imgs/red.png", "question": "What colour?"}, pp.MISSING_ANSWER),
        ('{"image": "imgs/red.png", "question": ', pp.INVALID_JSON),
        (row(id="good-1"), pp.DUPLICATE_ID),
        (row(image=str(imgs / "red.png")), pp.PATH_OUTSIDE_ROOT),
        (row(image="../outside.png"), pp.PATH_OUTSIDE_ROOT),
        (row(image="imgs/link.png"), pp.PATH_OUTSIDE_ROOT),
        ({"question": "What colour?", "answer": "red"}, pp.MISSING_IMAGE),
    ]
    rows = good + [r for r, _ in bad]
    source = data / "mixed.jsonl"
    _write_jsonl(source, rows)
    expected = {len(good) + i + 1: reason for i, (_, reason) in enumerate(bad)}
    return source, ["good-1", "mixed-2", "7"], expected


def _run(source, out, **kwargs) -> pp.Report:
    kwargs.setdefault("max_pixels", MAX_PIXELS)
    return preprocess(source, out, progress=False, **kwargs)


def _arrow_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.arrow"))]


def test_mixed_jsonl_keeps_good_rows_and_reports_every_bad_one(mixed, tmp_path):
    source, good_ids, expected = mixed
    report = _run(source, tmp_path / "out")

    assert {r.line: r.reason for r in report.rejected_rows} == expected
    assert (report.total, report.kept, report.rejected) == (21, 3, 18)
    ds = load_canonical(tmp_path / "out")
    assert ds["id"] == good_ids

    first, second, third = ds
    assert first["boxes"] == [[0.0, 0.0, 8.0, 8.0]] and first["choices"] == ["red", "blue"]
    assert json.loads(first["meta"]) == {"k": 1} and first["source"] == "mixed"
    assert second["question"] == "Which is blue?" and second["answer"] == "2"
    assert second["solution"].startswith("<think>") and len(second["images"]) == 2
    assert decode_image(second["images"][1]).getpixel((8, 8))[2] > 240
    assert third["answer"] == "3" and third["boxes"] == [[0.0, 0.0, 16.0, 16.0]]

    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == report.to_dict()
    assert on_disk["rejected_by_reason"][pp.PATH_OUTSIDE_ROOT] == 3
    duplicate = next(r for r in on_disk["rejected_rows"] if r["reason"] == pp.DUPLICATE_ID)
    assert duplicate["id"] == "good-1" and "line 1" in duplicate["detail"]
    missing = next(r for r in on_disk["rejected_rows"] if r["reason"] == images.MISSING_FILE)
    assert missing["file"] == "imgs/nope.png" and missing["id"] == "mixed-4"


def test_output_is_deterministic_and_num_proc_agrees(mixed, tmp_path):
    source, _, _ = mixed
    reports = [
        _run(source, tmp_path / "a"),
        _run(source, tmp_path / "b"),
        _run(source, tmp_path / "c", num_proc=2),
    ]
    assert (
        _arrow_bytes(tmp_path / "a") == _arrow_bytes(tmp_path / "b") == _arrow_bytes(tmp_path / "c")
    )
    assert reports[0].to_dict() == reports[1].to_dict() == reports[2].to_dict()
    assert _arrow_bytes(tmp_path / "a")


def test_strict_names_file_line_and_reason_and_writes_nothing(mixed, tmp_path):
    source, _, _ = mixed
    with pytest.raises(
        PreprocessError, match=r"mixed\.jsonl line 4: missing file \(imgs/nope\.png\)"
    ):
        _run(source, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.tmp-*")) == []


def test_refuses_non_empty_output_unless_overwrite(mixed, tmp_path):
    source, _, _ = mixed
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(PreprocessError, match="not empty"):
        _run(source, out)
    assert (out / "old.txt").exists()
    _run(source, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "report.json").exists()


def test_refuses_output_that_contains_the_source(mixed):
    source, _, _ = mixed
    with pytest.raises(PreprocessError, match="would contain the source"):
        _run(source, source.parent, overwrite=True)


def test_image_root_and_default_question(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png())
    source = tmp_path / "rows.jsonl"
    _write_jsonl(source, [{"image": "a.png", "answer": "red"}])
    report = _run(source, tmp_path / "out", image_root=tmp_path / "pics", question="Colour?")
    assert report.kept == 1
    assert load_canonical(tmp_path / "out")[0]["question"] == "Colour?"


def test_missing_source_and_unknown_format(tmp_path):
    with pytest.raises(PreprocessError, match="source not found"):
        _run(tmp_path / "nope.jsonl", tmp_path / "out")
    (tmp_path / "rows.txt").write_text("")
    with pytest.raises(PreprocessError, match="cannot tell the format"):
        _run(tmp_path / "rows.txt", tmp_path / "out")


# ----------------------------------------------------------------------------- hf input


def _hf_dataset() -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": _png((255, 0, 0)), "path": "red.png"},
                {"bytes": b"garbage", "path": "bad.png"},
                {"bytes": _png((0, 255, 0)), "path": None},
            ],
            "problem": ["Colour?", "Colour?", "Colour?"],
            "solution": ["red", "red", "<answer>green</answer>"],
        },
        features=features,
    )


def _check_hf_output(report: pp.Report, out: Path) -> None:
    assert report.format == "hf"
    assert [(r.line, r.reason, r.file) for r in report.rejected_rows] == [
        (1, images.NOT_AN_IMAGE, "bad.png")
    ]
    ds = load_canonical(out)
    assert ds["answer"] == ["red", "green"]
    assert ds["id"] == [f"{report.source_name}-0", f"{report.source_name}-2"]
    assert decode_image(ds[1]["images"][0]).getpixel((0, 0)) == (0, 255, 0)


def test_hf_save_to_disk_input(tmp_path):
    _hf_dataset().save_to_disk(str(tmp_path / "hf"))
    report = _run(tmp_path / "hf", tmp_path / "out")
    _check_hf_output(report, tmp_path / "out")


def test_parquet_file_and_folder_input(tmp_path):
    (tmp_path / "pq").mkdir()
    _hf_dataset().to_parquet(str(tmp_path / "pq" / "train.parquet"))
    _check_hf_output(_run(tmp_path / "pq" / "train.parquet", tmp_path / "out1"), tmp_path / "out1")
    _check_hf_output(_run(tmp_path / "pq", tmp_path / "out2"), tmp_path / "out2")


def test_hf_images_list_column_with_relative_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png())
    ds = datasets.Dataset.from_dict(
        {"images": [["pics/a.png", "pics/a.png"]], "question": ["Same?"], "answer": ["yes"]}
    )
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    report = _run(tmp_path / "rows.parquet", tmp_path / "out")
    assert report.kept == 1
    assert len(load_canonical(tmp_path / "out")[0]["images"]) == 2


# ----------------------------------------------------------------------------- folder input


def _write_labels(folder: Path, kind: str) -> None:
    if kind == "jsonl":
        _write_jsonl(
            folder / "labels.jsonl",
            [
                {"file": "a.png", "answer": "red"},
                {"file": "sub/b.png", "answer": "green", "question": "Which colour?"},
                {"file": "missing.png", "answer": "blue"},
            ],
        )
    elif kind == "csv":
        (folder / "labels.csv").write_text(
            'file,answer,question,boxes\na.png,red,,\nsub/b.png,green,Which colour?,"[[0, 0, 4, 4]]"\n'
            "missing.png,blue,,\n"
        )
    else:
        labels = {
            "a.png": "red",
            "sub/b.png": {"answer": "green", "question": "Which colour?"},
            "missing.png": "blue",
        }
        (folder / "labels.json").write_text(json.dumps(labels))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "json"])
def test_folder_with_labels(tmp_path, kind):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png((255, 0, 0)))
    (folder / "sub" / "b.png").write_bytes(_png((0, 255, 0)))
    (folder / "unlabelled.png").write_bytes(_png())
    _write_labels(folder, kind)

    report = _run(folder, tmp_path / "out", question="What colour?")

    assert report.format == "folder" and report.total == 4
    assert [(r.reason, r.file) for r in report.rejected_rows] == [
        (images.MISSING_FILE, "missing.png"),
        (pp.NO_LABEL, "unlabelled.png"),
    ]
    ds = load_canonical(tmp_path / "out")
    assert ds["answer"] == ["red", "green"]
    assert ds["question"] == ["What colour?", "Which colour?"]


def test_folder_with_separate_labels_file(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    labels = tmp_path / "answers.csv"
    labels.write_text("file,question,answer\na.png,Colour?,red\n")
    report = _run(folder, tmp_path / "out", fmt="folder", labels_file=labels)
    assert (report.kept, report.rejected) == (1, 0)

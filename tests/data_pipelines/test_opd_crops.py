"""data_pipelines/opd_crops.py: the teacher's crop written into the dataset as its own
image (teacher_images), byte-identical on a rerun, readable by load_canonical."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.opd_crops import TEACHER_COLUMN, main, teacher_crop_row, write_teacher_crops
from vlreason.data.images import decode_image, encode_image
from vlreason.data.schema import canonical_row, load_canonical, save_canonical
from vlreason.views import crop_to_box


def _rows():
    rng = np.random.default_rng(0)
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    data = encode_image(img)
    return img, [
        canonical_row(id="a", images=[data], question="Colour?", answer="red", source="t", boxes=[[40, 30, 60, 50]]),
        canonical_row(id="b", images=[data], question="Colour?", answer="red", source="t"),
    ]


def test_crop_row_holds_the_crop_and_rows_without_box_get_none():
    img, (with_box, without) = _rows()
    out = teacher_crop_row(with_box, margin=0.2, upscale=3.0, min_size=10)
    expected = crop_to_box(img, [40, 30, 60, 50], margin=0.2, upscale=3.0, min_size=10)
    got = decode_image(out[TEACHER_COLUMN][0])
    assert got.size == expected.size == (84, 84)  # 20 px + 2 x 0.2 x 20 px margin = 28 px, x 3
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert out["images"] == with_box["images"]  # the student's image untouched
    drawn = teacher_crop_row(with_box, draw=True)
    assert drawn["images"] != with_box["images"]
    assert not np.array_equal(np.asarray(decode_image(drawn["images"][0])), np.asarray(img))
    assert teacher_crop_row(without)[TEACHER_COLUMN] == []
    with pytest.raises(ValueError, match="outside"):
        teacher_crop_row({**with_box, "boxes": [[500, 500, 600, 600]]})


def test_written_dataset_loads_and_is_byte_identical_on_rerun(tmp_path, capsys):
    _, rows = _rows()
    src = save_canonical(rows, tmp_path / "src")
    counts = write_teacher_crops(src, tmp_path / "a", upscale=2.0)
    assert counts == {"rows": 2, "with_crop": 1}
    assert main([str(src), str(tmp_path / "b"), "--upscale", "2"]) == 0
    assert '"with_crop": 1' in capsys.readouterr().out
    a, b = load_canonical(tmp_path / "a"), load_canonical(tmp_path / "b")
    assert a[TEACHER_COLUMN] == b[TEACHER_COLUMN] and len(a[TEACHER_COLUMN][0]) == 1
    assert a["id"] == ["a", "b"] and a["images"] == [r["images"] for r in rows]
    with pytest.raises(FileExistsError):
        write_teacher_crops(src, tmp_path / "a")

"""The row gate: every recipe's "draw, shard, check, decode, skip and count"."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlreason.data.stream import RowStream
from vlreason.train.rows import RowGate, StepRows


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


class Tok:
    all_special_tokens = ["<|image_pad|>", "<|im_end|>"]


def rows():
    good = {"question": "<image>What colour?", "answer": "red", "images": [png()]}
    return [
        {"id": "ok1", **good},
        {"id": "bad-image", **good, "images": [b"not an image"]},
        {"id": "special", **good, "question": "<image>say <|im_end|>"},
        {"id": "no-solution", **good, "solution": ""},
        {"id": "ok2", **good},
    ]


def test_unusable_rows_are_skipped_counted_and_named(caplog):
    def needs_solution(row):
        if row["id"] == "no-solution":
            raise ValueError(f"row '{row['id']}' has no solution")

    gate = RowGate(RowStream(rows(), seed=0, shuffle=False), Tok(), check=needs_solution)
    taken = gate.draw(step=0, count=5)
    assert [r["id"] for r in taken.rows] == ["ok1", "ok2"]
    assert taken.index == [0, 4] and taken.drawn == 5 and taken.skipped == 3
    assert gate.skipped == 3
    assert all(len(images) == 1 and images[0].size == (8, 8) for images in taken.images)
    text = caplog.text
    for name in ("bad-image", "special", "no-solution"):
        assert f"skipping row '{name}'" in text


def test_prompts_over_the_limit_are_left_out_never_cut(caplog):
    gate = RowGate(RowStream(rows(), seed=0, shuffle=False), Tok())
    taken = StepRows(rows=[{"id": "a"}, {"id": "b"}, {"id": "c"}], images=[[], [], []], index=[3, 5, 7], drawn=3)
    kept = gate.within_limit(0, taken, lengths=[10, 40, 20], limit=20)
    assert [r["id"] for r in kept.rows] == ["a", "c"] and kept.index == [3, 7]
    assert gate.skipped == 1 and "40 tokens" in caplog.text
    assert gate.within_limit(0, kept, lengths=[10, 20], limit=20) is kept


def test_each_process_takes_its_share(monkeypatch):
    import vlreason.train.rows as rows_module

    data = [{"id": f"r{i}", "question": "q", "answer": "a", "images": []} for i in range(5)]
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(rows_module, "world", lambda rank=rank: (rank, 2))
        taken = RowGate(RowStream(data, seed=0, shuffle=False)).draw(0, 5)
        seen.append(taken.index)
    assert seen == [[0, 1, 2], [3, 4]]


def test_none_usable_is_an_error_naming_the_step():
    from vlreason.train.rows import none_usable

    with pytest.raises(RuntimeError, match="step 3: none of this step's rows"):
        raise none_usable(2)

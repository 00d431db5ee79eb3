"""Synthetic task generators: determinism, answers correct by construction, format."""

from __future__ import annotations

import io
import json
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image

from data_pipelines.synthetic import (
    COLOURS,
    LETTERS,
    SHAPES,
    TASKS,
    build_dataset,
    make_color,
    make_counting,
    make_fine_detail,
    make_multiple_choice,
)
from vlreason.data.schema import FEATURES, load_canonical

SOLUTION = re.compile(r"^<think>([^<>]+)</think><answer>([^<>]+)</answer>$")
SMALL = {"fine_detail": {"size": 160}}  # keep the test fast


def _rows(task: str, n: int = 12, seed: int = 0) -> list[dict]:
    return TASKS[task](n, seed, **SMALL.get(task, {}))


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["images"][0])).convert("RGB")).astype(int)


def _is_colour(arr: np.ndarray, name: str) -> np.ndarray:
    return (arr == np.array(COLOURS[name])).all(axis=-1)


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (plain BFS)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if (
                    0 <= ny < mask.shape[0]
                    and 0 <= nx < mask.shape[1]
                    and mask[ny, nx]
                    and not seen[ny, nx]
                ):
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_bytes_and_seed_dependent(task: str) -> None:
    a, b = _rows(task), _rows(task)
    assert a == b  # identical rows, PNG bytes included
    assert _rows(task, n=5) == a[:5]  # row i does not depend on n
    other = _rows(task, seed=1)
    assert [r["images"] for r in other] != [r["images"] for r in a]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_rows_are_canonical_with_solution_and_box_inside(task: str) -> None:
    rows = _rows(task)
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == set(FEATURES)
        assert row["source"] == f"synthetic/{task}"
        match = SOLUTION.match(row["solution"])
        assert match, row["solution"]
        assert match.group(2) == row["answer"]
        h, w, _ = _pixels(row).shape
        assert len(row["boxes"]) == 1
        x0, y0, x1, y1 = row["boxes"][0]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert json.loads(row["meta"])["task"] == task
        assert len(row["question"]) < 120 and len(row["solution"]) < 200


def test_color_answer_is_the_shape_colour() -> None:
    for row in make_color(20, 3):
        arr = _pixels(row)
        counts = {name: int(_is_colour(arr, name).sum()) for name in COLOURS}
        assert max(counts, key=counts.get) == row["answer"]
        assert (
            counts[row["answer"]] > 0.05 * arr.shape[0] * arr.shape[1]
        )  # a large shape (triangle >= 0.4^2 / 2)
        assert sum(counts.values()) == counts[row["answer"]]  # the only colour


def test_counting_answer_matches_connected_shapes() -> None:
    rows = make_counting(20, 5, size=112, max_count=4)
    answers = {int(r["answer"]) for r in rows}
    assert answers <= {1, 2, 3, 4} and len(answers) > 1
    for row in rows:
        arr = _pixels(row)
        coloured = np.zeros(arr.shape[:2], dtype=bool)
        for name in COLOURS:
            coloured |= _is_colour(arr, name)
        assert _components(coloured) == int(row["answer"])
        x0, y0, x1, y1 = (int(v) for v in row["boxes"][0])
        assert coloured[y0:y1, x0:x1].sum() == coloured.sum()  # the box holds every shape


def test_fine_detail_marker_inside_box_is_the_only_colour() -> None:
    marker = 6
    for row in make_fine_detail(10, 2, size=160, marker=marker):
        arr = _pixels(row)
        x0, y0, x1, y1 = (int(v) for v in row["boxes"][0])
        assert (x1 - x0, y1 - y0) == (marker, marker)
        inside = _is_colour(arr, row["answer"])[y0:y1, x0:x1]
        assert inside.sum() == marker * marker
        saturated = (arr.max(axis=-1) - arr.min(axis=-1)) > 0
        saturated[y0:y1, x0:x1] = False
        assert not saturated.any()  # everything outside the box is grey


def test_multiple_choice_letter_points_to_truth() -> None:
    rows = make_multiple_choice(30, 4)
    assert {r["answer"] for r in rows} <= set(LETTERS)
    for row in rows:
        meta = json.loads(row["meta"])
        truth = meta["colour"] if meta["asks"] == "colour" else meta["shape"]
        options = row["choices"]
        assert sorted(options) == sorted(COLOURS if meta["asks"] == "colour" else SHAPES)
        assert options[LETTERS.index(row["answer"])] == truth
        for letter, option in zip(LETTERS, options):
            assert f"{letter}. {option}" in row["question"]
        if meta["asks"] == "colour":
            assert _is_colour(_pixels(row), truth).sum() > 0


def test_build_dataset_round_trip(tmp_path) -> None:
    out = build_dataset("color", 6, 0, tmp_path / "ds", size=56)
    ds = load_canonical(out)
    assert len(ds) == 6 and ds[0]["solution"].startswith("<think>")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        build_dataset("nope", 1, 0, tmp_path / "x")


def test_bundled_demo_data(monkeypatch, tmp_path) -> None:
    from vlreason.paths import assets_dir, demo_data

    train, evaluation = load_canonical(demo_data("train")), load_canonical(demo_data("eval"))
    assert 200 <= len(train) <= 300 and 48 <= len(evaluation) <= 80
    assert {r.split("/")[1] for r in train["source"]} == set(TASKS)
    assert not set(train["id"]) & set(evaluation["id"])
    size = sum(f.stat().st_size for f in (assets_dir() / "demo").rglob("*") if f.is_file())
    assert size < 3_000_000
    with pytest.raises(ValueError, match="split"):
        demo_data("test")
    monkeypatch.setenv("VLREASON_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="build_demo_data"):
        demo_data("train")

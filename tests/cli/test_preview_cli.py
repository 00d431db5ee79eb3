"""`vlreason preview` through vlreason.cli.main."""

from __future__ import annotations

import pytest
from PIL import Image

from data_pipelines.synthetic import make_color, make_fine_detail
from vlreason.cli import main
from vlreason.cli.preview import CAPTION, PAD, layout_size, render_grid
from vlreason.data.schema import save_canonical


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rows = make_color(3, 0, size=56) + make_fine_detail(2, 0, size=112, marker=6)
    return save_canonical(rows, tmp_path_factory.mktemp("preview") / "ds")


def test_render_grid_places_each_image_in_its_cell_keeping_aspect() -> None:
    cell = 40
    solid = {c: Image.new("RGB", size, c) for c, size in
             [("red", (20, 10)), ("blue", (10, 20)), ("lime", (40, 40)), ("yellow", (80, 40))]}
    grid = render_grid([(solid["red"], "a", solid["blue"], "b"), (solid["lime"], "c", solid["yellow"], "d")], cell)
    assert grid.size == layout_size(2, cell)

    def at(i: int, j: int, x: int, y: int) -> tuple[int, int, int]:
        """Pixel (x, y) of cell (line i, column j), below its caption band."""
        return grid.getpixel((PAD + j * (cell + PAD) + x, PAD + i * (CAPTION + cell + PAD) + CAPTION + y))

    white = (255, 255, 255)
    # red 20x10 -> 40x20 (nearest, x2), centred: rows 10-29 red, rows 0-9 letterbox
    assert at(0, 0, 20, 20) == (255, 0, 0) and at(0, 0, 20, 5) == white and at(0, 0, 0, 10) == (255, 0, 0)
    # blue 10x20 -> 20x40, centred: columns 10-29 blue, columns 0-9 letterbox
    assert at(0, 1, 20, 20) == (0, 0, 255) and at(0, 1, 5, 20) == white
    # lime 40x40 fills its cell; yellow 80x40 -> 40x20 (shrunk), centred like red
    assert at(1, 0, 0, 0) == at(1, 0, 39, 39) == (0, 255, 0)
    assert at(1, 1, 20, 20) == (255, 255, 0) and at(1, 1, 20, 35) == white
    # each caption band holds dark text pixels; the gutter between cells stays blank
    band = grid.crop((PAD, PAD, PAD + cell, PAD + CAPTION)).convert("L")
    assert band.getextrema()[0] < 128
    assert grid.getpixel((PAD + cell + PAD // 2, PAD + CAPTION + cell // 2)) == white


@pytest.mark.parametrize("view", ["resize", "crop", "box", "mask", "noise"])
def test_preview_writes_grid_png(view: str, data_dir, tmp_path) -> None:
    out = tmp_path / "sub" / f"{view}.png"
    rc = main(["preview", view, "--data", str(data_dir), "--out", str(out), "--rows", "2",
               "--min-pixels", "3136", "--max-pixels", "12544", "--cell", "96", "--p", "0.5",
               "--t", "100"])
    assert rc == 0 and out.is_file()
    with Image.open(out) as img:
        assert img.size == layout_size(2, 96) == (2 * 96 + 3 * PAD, PAD + 2 * (CAPTION + 96 + PAD))
        # Not blank: the cells hold image content.
        assert len(img.convert("RGB").getcolors(1 << 16) or []) > 5


def test_preview_uses_all_rows_when_fewer(data_dir, tmp_path) -> None:
    out = tmp_path / "all.png"
    assert main(["preview", "mask", "--data", str(data_dir), "--out", str(out), "--rows", "50", "--cell", "32"]) == 0
    with Image.open(out) as img:
        assert img.size == layout_size(5, 32)


def test_unknown_view_lists_valid_views(data_dir, tmp_path, capsys) -> None:
    rc = main(["preview", "blur", "--data", str(data_dir), "--out", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "blur" in err and "box, crop, mask, noise, resize" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["preview", "resize", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert "dataset not found" in capsys.readouterr().err

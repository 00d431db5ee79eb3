"""`vlreason preview` through vlreason.cli.main."""

from __future__ import annotations

import pytest
from PIL import Image

from data_pipelines.synthetic import make_color, make_fine_detail
from vlreason.cli import main
from vlreason.cli.preview import CAPTION, PAD, layout_size
from vlreason.data.schema import save_canonical


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rows = make_color(3, 0, size=56) + make_fine_detail(2, 0, size=112, marker=6)
    return save_canonical(rows, tmp_path_factory.mktemp("preview") / "ds")


def test_layout_size_by_hand() -> None:
    # 2 cells of 100 + 3 pads of 8 wide; 8 + 2 * (16 + 100 + 8) high.
    assert (PAD, CAPTION) == (8, 16)
    assert layout_size(2, 100) == (224, 256)


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

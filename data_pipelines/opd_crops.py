"""Vision-OPD's teacher images: write each row's evidence crop into the dataset.

    python -m data_pipelines.opd_crops IN_DIR OUT_DIR [--margin 0.1] [--upscale 2]
                                       [--min-size 28] [--draw-box] [--box-color red]

The official Vision-OPD data carries the teacher's image next to the student's. This step
does the same for a canonical dataset (see :mod:`vlreason.data.schema`): for every row
with ``boxes`` it crops ``boxes[0]`` of the first image (``margin``: context on each
side as a fraction of the box; grown to ``min_size`` original pixels a side; enlarged
``upscale`` x, bicubic: :func:`vlreason.views.crop_to_box`) and stores the crop, PNG
encoded, as ``teacher_images[0]`` of the row. Rows without a box get ``teacher_images``
empty (the recipe then skips them or shows the teacher the full image:
``teacher.no_box``). With ``draw_box`` the box is also outlined on the student's image
(``images[0]``), as the official data does.

``teacher_images`` is an extra column beside the canonical ones: :func:`load_canonical`
accepts extra columns and every other recipe ignores it. ``recipes/vision_opd.py``
reads ``teacher_images[0]`` when a row has one (``teacher.view=crop``) instead of
cropping at run time; the teacher's pixel budget (``teacher.max_pixels``, by default the
student's x upscale^2) then keeps the enlargement. The same input gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import datasets

from vlreason.data.images import decode_image, encode_image
from vlreason.data.schema import FEATURES, load_canonical
from vlreason.views import crop_to_box, draw_box

TEACHER_COLUMN = "teacher_images"
FEATURES_WITH_TEACHER = datasets.Features({**FEATURES, TEACHER_COLUMN: datasets.Sequence(datasets.Value("binary"))})


def teacher_crop_row(
    row: dict[str, Any],
    *,
    margin: float = 0.1,
    upscale: float = 2.0,
    min_size: int = 28,
    draw: bool = False,
    color: str = "red",
) -> dict[str, Any]:
    """A copy of the canonical ``row`` with ``teacher_images`` (the PNG crop of ``boxes[0]``,
    or empty without a box); with ``draw`` the box outlined on ``images[0]``. A row with
    a box but no image, or a box outside its image, raises ``ValueError``."""
    out = dict(row)
    boxes = row.get("boxes") or []
    if not boxes:
        out[TEACHER_COLUMN] = []
        return out
    if not row.get("images"):
        raise ValueError(f"row '{row.get('id')}' has boxes but no image")
    image = decode_image(row["images"][0])
    box = [float(v) for v in boxes[0]]
    crop = crop_to_box(image, box, margin=margin, upscale=upscale, min_size=min_size)
    out[TEACHER_COLUMN] = [encode_image(crop)]
    if draw:
        out["images"] = [encode_image(draw_box(image, box, color=color)), *row["images"][1:]]
    return out


def add_teacher_crops(dataset: datasets.Dataset, **options: Any) -> datasets.Dataset:
    """:func:`teacher_crop_row` on every row (same order); ``options`` are its keywords."""
    rows = [teacher_crop_row(dict(row), **options) for row in dataset]
    columns = {name: [r.get(name) for r in rows] for name in FEATURES_WITH_TEACHER}
    return datasets.Dataset.from_dict(columns, features=FEATURES_WITH_TEACHER)


def write_teacher_crops(source: str | Path, out: str | Path, **options: Any) -> dict[str, int]:
    """Read the canonical dataset ``source``, write it with teacher crops to ``out`` (a new
    folder); returns counts ``rows`` and ``with_crop``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    result = add_teacher_crops(load_canonical(source), **options)
    result.save_to_disk(str(out), num_shards=1)
    with_crop = sum(1 for images in result[TEACHER_COLUMN] if images)
    return {"rows": len(result), "with_crop": with_crop}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a canonical dataset folder (vlreason preprocess output)")
    parser.add_argument("out", help="a new folder for the dataset with teacher_images")
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--upscale", type=float, default=2.0)
    parser.add_argument("--min-size", type=int, default=28)
    parser.add_argument("--draw-box", action="store_true", help="outline boxes[0] on the student's image")
    parser.add_argument("--box-color", default="red")
    args = parser.parse_args(argv)
    counts = write_teacher_crops(args.source, args.out, margin=args.margin, upscale=args.upscale,
                                 min_size=args.min_size, draw=args.draw_box, color=args.box_color)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The canonical dataset every vlreason component reads (see DESIGN.md).

A ``datasets`` Arrow dataset written with ``save_to_disk``. Required columns:
``id`` (unique str), ``images`` (list of encoded image bytes: PNG/JPEG/...),
``question``, ``answer``, ``source``. Optional columns always exist in files that
vlreason writes, with empty values when a row has none: ``boxes`` (list of
[x0, y0, x1, y1] in original pixels of the first image), ``choices`` (list of str),
``solution`` (a full reference response, e.g. chain of thought), ``meta`` (JSON string).

Image placement: ``question`` may hold :data:`IMAGE_PLACEHOLDER` (``<image>``) markers,
exactly one per image; the k-th marker is where the k-th image goes in the prompt
(images and text interleaved, as in the EasyR1 / verl layout). The prompt builder
splits the text on them, so they never reach the model as literal text. A question
without markers shows the row's images before its text. The placement lives in the
question rather than in a column of its own so that it survives every row edit that
replaces or keeps the question (a recipe that swaps in its own prompt text simply gets
the images first), and so that datasets written before it need no migration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

IMAGE_PLACEHOLDER = "<image>"

REQUIRED_COLUMNS = ("id", "images", "question", "answer", "source")
OPTIONAL_COLUMNS = ("boxes", "choices", "solution", "meta")

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Value("binary")),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "source": datasets.Value("string"),
        "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
        "choices": datasets.Sequence(datasets.Value("string")),
        "solution": datasets.Value("string"),
        "meta": datasets.Value("string"),
    }
)


def canonical_row(
    *,
    id: str,
    images: list[bytes],
    question: str,
    answer: str,
    source: str,
    boxes: list[list[float]] | None = None,
    choices: list[str] | None = None,
    solution: str | None = None,
    meta: dict[str, Any] | str | None = None,
) -> dict[str, Any]:
    """A row with every canonical column filled (optional ones empty when absent)."""
    return {
        "id": str(id),
        "images": list(images),
        "question": question,
        "answer": str(answer),
        "source": source,
        "boxes": [list(map(float, b)) for b in (boxes or [])],
        "choices": list(choices or []),
        "solution": solution or "",
        "meta": meta if isinstance(meta, str) else json.dumps(meta or {}, sort_keys=True),
    }


def image_placeholders(question: str) -> int:
    """How many images the question places (0: the images go before the text)."""
    return question.count(IMAGE_PLACEHOLDER)


def rows_to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    if not rows:  # from_list cannot infer columns from nothing
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    return datasets.Dataset.from_list(rows, features=FEATURES)


def save_canonical(rows: list[dict[str, Any]] | datasets.Dataset, out_dir: str | Path) -> Path:
    """Write rows (or a Dataset) as a canonical dataset directory."""
    ds = rows if isinstance(rows, datasets.Dataset) else rows_to_dataset(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(out), num_shards=1 if len(ds) == 0 else None)
    return out


def load_canonical(path: str | Path) -> datasets.Dataset:
    """Load a canonical dataset directory, checking its columns; clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a non-dataset folder
        raise ValueError(
            f"{path} is not a canonical vlreason dataset (datasets.save_to_disk folder); "
            f"build one with `vlreason preprocess`: {err}"
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds several splits {list(ds)}; pass one split's folder")
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: missing required columns {missing} (has {ds.column_names})")
    return ds

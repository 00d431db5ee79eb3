"""Row checks of ``vlreason preprocess``: one raw row -> a canonical row or a rejection.

:func:`process_row` runs in worker processes. It reads the usual field names (see
:mod:`data_pipelines.preprocess`), checks every field, decodes every image fully
(:func:`vlreason.data.images.prepare_image`) and checks that the ``<image>``
placeholders of the question (:data:`vlreason.data.schema.IMAGE_PLACEHOLDER`), if it
has any, are exactly as many as the row's images. Each check raises :class:`Reject`
with one of the reasons below (image-level reasons are in :mod:`vlreason.data.images`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from data_pipelines.report import RawRow, Rejection
from vlreason.data.images import ImageError, PreparedImage, prepare_image
from vlreason.data.schema import IMAGE_PLACEHOLDER, canonical_row, image_placeholders

# Row-level rejection reasons.
INVALID_FIELD = "invalid field"
MISSING_QUESTION = "missing question"
MISSING_ANSWER = "missing answer"
MISSING_IMAGE = "missing image"
PATH_OUTSIDE_ROOT = "path outside data root"
BOX_NOT_4_NUMBERS = "box not 4 numbers"
BOX_INVERTED = "box inverted"
BOX_OUTSIDE_IMAGE = "box outside image"
PLACEHOLDER_MISMATCH = "image placeholder mismatch"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs to turn a raw row into a canonical row."""

    root: Path
    source_name: str
    default_question: str | None
    max_pixels: int | None
    min_side: int


class Kept(NamedTuple):
    line: int | None
    row: dict[str, Any]


class Reject(Exception):
    """Raised by the field checks; turned into a Rejection by :func:`process_row`."""

    def __init__(self, reason: str, detail: str = "", file: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.detail, self.file = reason, detail, file


def process_row(raw: RawRow | Rejection, settings: Settings) -> Kept | Rejection:
    """Validate one row and load its images (runs in worker processes)."""
    if isinstance(raw, Rejection):
        return raw
    fields, row_id = raw.fields, None
    try:
        row_id = _row_id(fields.get("id"), default=f"{settings.source_name}-{raw.line}")
        question = _text(_first(fields, "question", "problem"), "question")
        question = question or settings.default_question
        if not question:
            raise Reject(MISSING_QUESTION, "no `question` (or `problem`) text")
        answer, solution = _answer_and_solution(fields)
        boxes = _boxes(fields.get("boxes"))
        choices = _choices(_first(fields, "choices", "options"))
        meta = _meta(fields.get("meta"))
        references = _image_references(fields, settings.root)
        _check_placeholders(question, len(references))
        images = [_prepare(file, src, settings) for file, src in references]
        _check_boxes_inside(boxes, images[0], references[0][0])
    except Reject as rej:
        return Rejection(raw.line, row_id, rej.file, rej.reason, rej.detail)
    row = canonical_row(
        id=row_id,
        images=[image.data for image in images],
        question=question,
        answer=answer,
        source=settings.source_name,
        boxes=boxes,
        choices=choices,
        solution=solution,
        meta=meta,
    )
    return Kept(raw.line, row)


def _first(fields: dict[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` present with a non-null value."""
    return next((fields[k] for k in keys if fields.get(k) is not None), None)


def _utf8(value: str, name: str) -> str:
    """``value`` if it can be written as UTF-8 (no lone surrogates, which JSON's ``\\ud800``
    escapes produce), else a Reject: Arrow and report.json could not store it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise Reject(INVALID_FIELD, f"`{name}` is not valid Unicode text: {err.reason}") from err
    return value


def _text(value: Any, name: str) -> str | None:
    """A non-blank string (numbers are written as text), or None when absent or blank."""
    if value is None or isinstance(value, str):
        return _utf8(value, name) if value and value.strip() else None
    if isinstance(value, (int, float)):
        return str(value)
    raise Reject(INVALID_FIELD, f"`{name}` must be text, got {type(value).__name__}")


def _row_id(value: Any, default: str) -> str:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return _utf8(value, "id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Reject(INVALID_FIELD, f"`id` must be a string or integer, got {_short(value)}")


def _short(value: Any) -> str:
    """``repr(value)`` cut to 200 characters, for a report detail (hostile rows are huge)."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _answer_and_solution(fields: dict[str, Any]) -> tuple[str, str]:
    """(answer, solution); a tagged ``solution`` supplies the answer when there is none."""
    answer = _text(fields.get("answer"), "answer")
    solution = _text(fields.get("solution"), "solution")
    if answer is None and solution is not None:
        # Only up to the last closing tag: after it no block can close, and scanning there
        # from every unclosed <answer> is quadratic in a hostile solution.
        end = solution.rfind("</answer>")
        tagged = _ANSWER_TAG.findall(solution[: end + len("</answer>")]) if end >= 0 else []
        answer, solution = (tagged[-1].strip(), solution) if tagged else (solution, None)
    if not answer:
        raise Reject(MISSING_ANSWER, "no `answer` (or `solution`) text")
    return answer, solution or ""


def _check_placeholders(question: str, num_images: int) -> None:
    """A question with ``<image>`` placeholders needs exactly one per image."""
    count = image_placeholders(question)
    if count and count != num_images:
        raise Reject(
            PLACEHOLDER_MISMATCH,
            f"the question has {count} {IMAGE_PLACEHOLDER} placeholder{'s' * (count != 1)} "
            f"for {num_images} image{'s' * (num_images != 1)}",
        )


def _is_number(value: Any) -> bool:
    """A finite int or float that fits a float (``math.isfinite(10**400)`` raises)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _boxes(value: Any) -> list[list[float]]:
    """A list of [x0, y0, x1, y1] with x0 < x1 and y0 < y1; one bare box is accepted."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Reject(
            BOX_NOT_4_NUMBERS, f"`boxes` must be a list of [x0, y0, x1, y1], got {_short(value)}"
        )
    boxes = [value] if len(value) == 4 and all(map(_is_number, value)) else value
    for box in boxes:
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            raise Reject(BOX_NOT_4_NUMBERS, f"{_short(box)} is not [x0, y0, x1, y1]")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise Reject(BOX_INVERTED, f"{box}: needs x0 < x1 and y0 < y1")
    return [[float(v) for v in box] for box in boxes]


def _check_boxes_inside(boxes: list[list[float]], image: PreparedImage, file: str | None) -> None:
    for x0, y0, x1, y1 in boxes:
        if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
            raise Reject(
                BOX_OUTSIDE_IMAGE,
                f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}] outside the {image.width}x{image.height} image",
                file,
            )


def _choices(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(c, (str, int, float)) for c in value):
        return [_utf8(str(c), "choices") for c in value]
    raise Reject(INVALID_FIELD, f"`choices` must be a list of strings, got {_short(value)}")


def _meta(value: Any) -> dict[str, Any]:
    """``meta`` as a dict: an object, or a string holding a JSON object."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise Reject(INVALID_FIELD, f"`meta` is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise Reject(INVALID_FIELD, f"`meta` must be a JSON object, got {_short(value)}")
    try:
        _utf8(json.dumps(value, ensure_ascii=False, sort_keys=True), "meta")
    except (TypeError, ValueError, RecursionError) as err:  # e.g. non-string keys mixed
        raise Reject(INVALID_FIELD, f"`meta` cannot be stored as JSON: {err}") from err
    return value


def _image_references(fields: dict[str, Any], root: Path) -> list[tuple[str | None, bytes | Path]]:
    """(name for the report, path or bytes) for each image of the row."""
    value = _first(fields, "images", "image")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise Reject(MISSING_IMAGE, "no `image` or `images`")
    return [_image_reference(v, root) for v in values]


def _image_reference(value: Any, root: Path) -> tuple[str | None, bytes | Path]:
    if isinstance(value, dict):  # datasets.Image storage: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        name = _utf8(path, "image path") if isinstance(path, str) else None
        if isinstance(data, (bytes, bytearray)) and data:
            return name, bytes(data)
        if data:  # a string here must not be read as a file path
            raise Reject(INVALID_FIELD, f"image `bytes` must be bytes, got {type(data).__name__}")
        value = path
    if isinstance(value, (bytes, bytearray)) and value:
        return None, bytes(value)
    if isinstance(value, str) and value:
        return value, _inside(root, _utf8(value, "image path"))
    if value is None or value in ("", b""):
        raise Reject(MISSING_IMAGE, "empty image entry")
    raise Reject(INVALID_FIELD, f"an image must be a path or bytes, got {type(value).__name__}")


def _inside(root: Path, relative: str) -> Path:
    """``root / relative`` with symlinks resolved; rejected unless it stays within ``root``."""
    if "\x00" in relative:
        raise Reject(INVALID_FIELD, "NUL byte in the image path", repr(relative)[:200])
    if Path(relative).is_absolute():
        raise Reject(PATH_OUTSIDE_ROOT, f"absolute path; paths are relative to {root}", relative)
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError) as err:  # name too long, symlink loop
        raise Reject(MISSING_IMAGE, f"cannot resolve: {err}"[:300], relative[:200]) from err
    if not resolved.is_relative_to(root):
        raise Reject(PATH_OUTSIDE_ROOT, f"resolves to {resolved}, outside {root}", relative)
    return resolved


def _prepare(file: str | None, source: bytes | Path, settings: Settings) -> PreparedImage:
    try:
        return prepare_image(source, max_pixels=settings.max_pixels, min_side=settings.min_side)
    except ImageError as err:
        raise Reject(err.reason, err.detail, file) from err

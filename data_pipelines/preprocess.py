"""Raw data -> canonical dataset + ``report.json``: the library behind ``vlreason preprocess``.

Every input row either lands in the output dataset (see :mod:`vlreason.data.schema`) or
gets an entry in the report with a reason; a bad row never stops the run unless
``strict=True``. Output rows keep the input order, and the same input gives
byte-identical Arrow files.

Input formats (``fmt``; ``"auto"`` picks by what the path is):

``jsonl``
    A ``.jsonl`` file, one JSON object a line::

        {"id": "q1", "image": "imgs/a.png", "question": "What colour?", "answer": "red",
         "boxes": [[4, 4, 20, 20]], "choices": ["red", "blue"], "meta": {"level": 1}}

    ``image`` (a path) or ``images`` (a list of paths), relative to the JSONL file's
    folder, or to ``image_root`` when given; ``question`` (or ``problem``); ``answer``
    (or ``solution``: when there is no ``answer`` and ``solution`` holds a full
    ``<think>...</think><answer>X</answer>`` response, ``X`` becomes the answer and the
    full text is kept as ``solution``; a ``solution`` without answer tags is the answer).
    Optional: ``id``, ``choices``, ``boxes`` (list of ``[x0, y0, x1, y1]`` in pixels of the
    first image after EXIF orientation; one bare box is accepted too), ``meta`` (object),
    ``solution``. Blank lines are skipped. ``line`` in the report is the 1-based line.

``hf``
    A ``datasets.save_to_disk`` folder (one split), a ``.parquet`` file, or a folder of
    ``.parquet`` files (read in sorted path order). The images are in ``image_column``
    (default ``image``, falling back to ``images``): a ``datasets.Image`` column (or a
    list of them), raw bytes, ``{"bytes", "path"}`` dicts, or paths relative to
    ``image_root`` (default: the dataset's folder). Other columns as for ``jsonl``.
    ``line`` in the report is the 0-based row index.

``folder``
    A folder of images plus a labels file: ``labels.jsonl``, ``labels.csv`` or
    ``labels.json`` inside it (first found), or ``labels_file``. File names are relative
    to the folder (or ``image_root``).

    - ``labels.jsonl``: as ``jsonl`` above, with the image under ``file`` (or ``image``).
    - ``labels.csv``: a header row with ``file`` and ``answer``, optional ``question``,
      ``id``, ``solution``; ``choices``, ``boxes``, ``meta`` cells hold JSON text. Empty
      cells count as absent. ``line`` is the line in the file (the header is line 1).
    - ``labels.json``: either ``{"a.png": "answer", ...}``, ``{"a.png": {"question": ...,
      "answer": ...}, ...}``, or a list of ``jsonl``-style objects. ``line`` is the
      1-based entry number.

    Images in the folder that no label names are reported as ``image without label``
    (with ``line`` null).

In every format ``question`` (the argument) is the question for rows that have none,
and a row without ``id`` gets ``{source_name}-{line}``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import pyarrow.parquet as pq
from datasets.arrow_writer import ArrowWriter
from tqdm import tqdm

from vlreason.data.images import DEFAULT_MAX_PIXELS, ImageError, PreparedImage, prepare_image
from vlreason.data.schema import FEATURES, canonical_row, save_canonical

FORMATS = ("auto", "jsonl", "hf", "folder")
LABEL_FILES = ("labels.jsonl", "labels.csv", "labels.json")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
REPORT_NAME = "report.json"

# Row-level rejection reasons; image-level ones are in vlreason.data.images.
INVALID_JSON = "invalid JSON"
INVALID_FIELD = "invalid field"
MISSING_QUESTION = "missing question"
MISSING_ANSWER = "missing answer"
MISSING_IMAGE = "missing image"
PATH_OUTSIDE_ROOT = "path outside data root"
BOX_NOT_4_NUMBERS = "box not 4 numbers"
BOX_INVERTED = "box inverted"
BOX_OUTSIDE_IMAGE = "box outside image"
DUPLICATE_ID = "duplicate id"
NO_LABEL = "image without label"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CSV_JSON_COLUMNS = ("choices", "boxes", "meta")
_WRITER_BATCH_SIZE = 64  # rows buffered before an Arrow write; rows hold image bytes
_POOL_CHUNKSIZE = 8


class PreprocessError(RuntimeError):
    """A fatal problem: bad arguments, an unreadable source, or a bad row in strict mode."""


@dataclass(frozen=True)
class Rejection:
    """One rejected row: where it is, which image (if any) and why."""

    line: int | None
    id: str | None
    file: str | None
    reason: str
    detail: str = ""


@dataclass
class Report:
    """What a preprocessing run kept and rejected; written as ``report.json``."""

    source: str
    format: str
    source_name: str
    total: int = 0
    kept: int = 0
    rejected_rows: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejected_rows)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        """Counts per reason, most frequent first (ties by name)."""
        counts = Counter(r.reason for r in self.rejected_rows)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_name": self.source_name,
            "format": self.format,
            "total": self.total,
            "kept": self.kept,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason,
            "rejected_rows": [asdict(r) for r in self.rejected_rows],
        }


@dataclass(frozen=True)
class _RawRow:
    """A row as read from the source, not yet validated."""

    line: int | None
    fields: dict[str, Any]


class _Kept(NamedTuple):
    line: int | None
    row: dict[str, Any]


@dataclass(frozen=True)
class _Source:
    """An opened input: its rows, how many (when cheap to know) and the file holding them."""

    rows: Iterable[_RawRow | Rejection]
    length: int | None
    where: str  # the file named in strict-mode errors
    unit: str  # "line" or "row": what Rejection.line counts


@dataclass(frozen=True)
class _Settings:
    """Everything a worker needs to turn a raw row into a canonical row."""

    root: Path
    source_name: str
    default_question: str | None
    max_pixels: int | None
    min_side: int


class _Reject(Exception):
    """Raised by the row validators; turned into a Rejection by _process_row."""

    def __init__(self, reason: str, detail: str = "", file: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.detail, self.file = reason, detail, file


# ----------------------------------------------------------------------------- public API


def preprocess(
    source: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "auto",
    image_root: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = 8,
    strict: bool = False,
    num_proc: int = 1,
    source_name: str | None = None,
    labels_file: str | Path | None = None,
    image_column: str = "image",
    question: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Report:
    """Validate ``source`` and write the canonical dataset plus ``report.json`` to ``out_dir``.

    ``fmt``: ``auto|jsonl|hf|folder`` (see the module docstring). ``image_root``: folder
    that image paths are relative to; a path outside it (absolute, ``..``, or a symlink
    leading out) is rejected. ``max_pixels``/``min_side``: image size limits.
    ``strict``: raise :class:`PreprocessError` at the first bad row instead of reporting
    it. ``num_proc``: processes that decode images (same output as 1). ``source_name``:
    the ``source`` column and id prefix (default: the source's file or folder name).
    ``labels_file``: labels for ``folder`` input. ``image_column``: image column of
    ``hf`` input. ``question``: the question for rows that have none. ``overwrite``:
    replace a non-empty ``out_dir``. ``progress``: show a progress bar (default: when
    stderr is a terminal). The output appears only when complete (written to a
    temporary folder, then moved).
    """
    source, out = Path(source), Path(out_dir)
    if not source.exists():
        raise PreprocessError(f"source not found: {source}")
    fmt = detect_format(source) if fmt == "auto" else _checked_format(fmt, source)
    _check_out_dir(out, source, overwrite)
    root = Path(image_root) if image_root is not None else _default_root(source)
    if not root.is_dir():
        raise PreprocessError(f"image root is not a folder: {root}")
    root = root.resolve()
    opened = _open_source(
        source, fmt, root=root, labels_file=labels_file, image_column=image_column
    )
    name = source_name or (source.stem if source.is_file() else source.resolve().name)
    settings = _Settings(root, name, question, max_pixels, min_side)
    report = Report(source=str(source), format=fmt, source_name=name)
    show = sys.stderr.isatty() if progress is None else progress

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rows_file = work / "rows.arrow"
        _write_rows(
            opened, settings, report, rows_file, num_proc=num_proc, strict=strict, show=show
        )
        _publish(rows_file, report, work / "dataset", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def detect_format(path: Path) -> str:
    """``jsonl``, ``hf`` or ``folder``, from what ``path`` is; PreprocessError if unclear."""
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl"
        if path.suffix == ".parquet":
            return "hf"
    elif path.is_dir():
        if _is_saved_dataset(path) or any(path.rglob("*.parquet")):
            return "hf"
        if any((path / name).is_file() for name in LABEL_FILES):
            return "folder"
    raise PreprocessError(
        f"cannot tell the format of {path}: expected a .jsonl file, a .parquet file or "
        f"folder, a datasets.save_to_disk folder, or an image folder with one of "
        f"{', '.join(LABEL_FILES)}; pass the format explicitly"
    )


# ----------------------------------------------------------------------------- reading


def _checked_format(fmt: str, source: Path) -> str:
    if fmt not in FORMATS:
        raise PreprocessError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "jsonl" and not source.is_file():
        raise PreprocessError(f"format jsonl needs a file, got the folder {source}")
    if fmt == "folder" and not source.is_dir():
        raise PreprocessError(f"format folder needs a folder, got the file {source}")
    return fmt


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def _default_root(source: Path) -> Path:
    """Image paths are relative to the source folder, or to the source file's folder."""
    return source if source.is_dir() else source.parent


def _open_source(
    source: Path, fmt: str, *, root: Path, labels_file: str | Path | None, image_column: str
) -> _Source:
    if fmt == "jsonl":
        return _Source(_read_jsonl(source), _count_lines(source), str(source), "line")
    if fmt == "hf":
        return _open_hf(source, image_column)
    labels = Path(labels_file) if labels_file is not None else _find_labels(source)
    rows = _read_folder(root, labels)
    return _Source(rows, len(rows), str(labels), "line")


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _read_jsonl(path: Path) -> Iterator[_RawRow | Rejection]:
    """One raw row per non-blank line; a line that is not a JSON object is rejected."""
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                yield Rejection(
                    line_no, None, None, INVALID_JSON, f"{err.msg} at column {err.colno}"
                )
                continue
            except UnicodeDecodeError:
                yield Rejection(line_no, None, None, INVALID_JSON, "the line is not UTF-8 text")
                continue
            if isinstance(fields, dict):
                yield _RawRow(line_no, fields)
            else:
                yield Rejection(line_no, None, None, INVALID_JSON, "the line is not a JSON object")


def _open_hf(source: Path, image_column: str) -> _Source:
    """Rows of a save_to_disk folder or parquet file(s), images left undecoded."""
    if source.is_dir() and _is_saved_dataset(source):
        columns, length, batches = _saved_dataset_batches(source)
    else:
        columns, length, batches = _parquet_batches(source)
    column = _image_column(columns, image_column, source)
    rows = (
        _RawRow(index, _rename_images(row, column))
        for index, row in enumerate(chain.from_iterable(batches))
    )
    return _Source(rows, length, str(source), "row")


def _saved_dataset_batches(path: Path) -> tuple[list[str], int, Iterator[list[dict]]]:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a broken folder
        raise PreprocessError(f"cannot load the dataset at {path}: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        raise PreprocessError(
            f"{path} holds the splits {list(ds)}; pass one split's folder, e.g. {path / next(iter(ds))}"
        )
    # The arrow format skips datasets' image decoding: bad images must reach our checks.
    batches = (table.to_pylist() for table in ds.with_format("arrow").iter(batch_size=256))
    return ds.column_names, len(ds), batches


def _parquet_batches(path: Path) -> tuple[list[str], int, Iterator[list[dict]]]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise PreprocessError(f"no .parquet files in {path}")
    try:
        opened = [pq.ParquetFile(f) for f in files]
    except Exception as err:  # pyarrow raises several types for a non-parquet file
        raise PreprocessError(f"cannot read parquet {path}: {err}") from err
    batches = (b.to_pylist() for f in opened for b in f.iter_batches(batch_size=256))
    return opened[0].schema_arrow.names, sum(f.metadata.num_rows for f in opened), batches


def _image_column(columns: list[str], wanted: str, source: Path) -> str:
    for name in (wanted, "images"):
        if name in columns:
            return name
    raise PreprocessError(f"{source} has no image column {wanted!r} (columns: {columns})")


def _rename_images(row: dict[str, Any], column: str) -> dict[str, Any]:
    fields = dict(row)
    fields["images"] = fields.pop(column)
    return fields


def _find_labels(folder: Path) -> Path:
    for name in LABEL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PreprocessError(f"{folder} has none of {', '.join(LABEL_FILES)}; pass a labels file")


def _read_folder(folder: Path, labels: Path) -> list[_RawRow | Rejection]:
    """The label rows, then one rejection per image under ``folder`` that no label names."""
    if not labels.is_file():
        raise PreprocessError(f"labels file not found: {labels}")
    rows = list(_read_labels(labels))
    named = {
        (folder / r.fields["image"]).resolve()
        for r in rows
        if isinstance(r, _RawRow) and isinstance(r.fields.get("image"), str)
    }
    unlabelled = [
        Rejection(None, None, p.relative_to(folder).as_posix(), NO_LABEL, f"not in {labels.name}")
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve() not in named
    ]
    return rows + unlabelled


def _read_labels(labels: Path) -> Iterator[_RawRow | Rejection]:
    readers: dict[str, Callable[[Path], Iterator[_RawRow | Rejection]]] = {
        ".jsonl": _read_jsonl,
        ".csv": _read_labels_csv,
        ".json": _read_labels_json,
    }
    if labels.suffix not in readers:
        raise PreprocessError(f"labels file must be .jsonl, .csv or .json: {labels}")
    for raw in readers[labels.suffix](labels):
        yield _file_as_image(raw) if isinstance(raw, _RawRow) else raw


def _file_as_image(raw: _RawRow) -> _RawRow:
    """Labels name the image under ``file``; validation reads ``image``."""
    if "file" not in raw.fields or "image" in raw.fields or "images" in raw.fields:
        return raw
    fields = dict(raw.fields)
    fields["image"] = fields.pop("file")
    return _RawRow(raw.line, fields)


def _read_labels_csv(path: Path) -> Iterator[_RawRow | Rejection]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for row in reader:
            fields: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
            try:
                for column in _CSV_JSON_COLUMNS:
                    if column in fields:
                        fields[column] = json.loads(fields[column])
            except ValueError as err:
                yield Rejection(
                    reader.line_num,
                    None,
                    fields.get("file"),
                    INVALID_JSON,
                    f"column {column}: {err}",
                )
                continue
            yield _RawRow(reader.line_num, fields)


def _read_labels_json(path: Path) -> Iterator[_RawRow | Rejection]:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:
        raise PreprocessError(f"{path} is not valid JSON: {err}") from err
    if isinstance(data, dict):  # file name -> answer, or file name -> fields
        for position, (name, value) in enumerate(data.items(), start=1):
            fields = value if isinstance(value, dict) else {"answer": value}
            yield _RawRow(position, {"image": name, **fields})
    elif isinstance(data, list):  # jsonl-style objects
        for position, value in enumerate(data, start=1):
            if isinstance(value, dict):
                yield _RawRow(position, value)
            else:
                yield Rejection(position, None, None, INVALID_JSON, "the entry is not an object")
    else:
        raise PreprocessError(f"{path} must hold a JSON object or list")


# ----------------------------------------------------------------------------- validation


def _process_row(raw: _RawRow | Rejection, settings: _Settings) -> _Kept | Rejection:
    """Validate one row and load its images (runs in worker processes)."""
    if isinstance(raw, Rejection):
        return raw
    fields, row_id = raw.fields, None
    try:
        row_id = _row_id(fields.get("id"), default=f"{settings.source_name}-{raw.line}")
        question = _text(_first(fields, "question", "problem"), "question")
        question = question or settings.default_question
        if not question:
            raise _Reject(MISSING_QUESTION, "no `question` (or `problem`) text")
        answer, solution = _answer_and_solution(fields)
        boxes = _boxes(fields.get("boxes"))
        choices = _choices(fields.get("choices"))
        meta = _meta(fields.get("meta"))
        references = _image_references(fields, settings.root)
        images = [_prepare(file, src, settings) for file, src in references]
        _check_boxes_inside(boxes, images[0], references[0][0])
    except _Reject as rej:
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
    return _Kept(raw.line, row)


def _first(fields: dict[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` present with a non-null value."""
    return next((fields[k] for k in keys if fields.get(k) is not None), None)


def _text(value: Any, name: str) -> str | None:
    """A non-blank string (numbers are written as text), or None when absent or blank."""
    if value is None or isinstance(value, str):
        return value if value and value.strip() else None
    if isinstance(value, (int, float)):
        return str(value)
    raise _Reject(INVALID_FIELD, f"`{name}` must be text, got {type(value).__name__}")


def _row_id(value: Any, default: str) -> str:
    if value is None or value == "":
        return default
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise _Reject(INVALID_FIELD, f"`id` must be a string or integer, got {value!r}")


def _answer_and_solution(fields: dict[str, Any]) -> tuple[str, str]:
    """(answer, solution); a tagged ``solution`` supplies the answer when there is none."""
    answer = _text(fields.get("answer"), "answer")
    solution = _text(fields.get("solution"), "solution")
    if answer is None and solution is not None:
        tagged = _ANSWER_TAG.findall(solution)
        answer, solution = (tagged[-1].strip(), solution) if tagged else (solution, None)
    if not answer:
        raise _Reject(MISSING_ANSWER, "no `answer` (or `solution`) text")
    return answer, solution or ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _boxes(value: Any) -> list[list[float]]:
    """A list of [x0, y0, x1, y1] with x0 < x1 and y0 < y1; one bare box is accepted."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Reject(
            BOX_NOT_4_NUMBERS, f"`boxes` must be a list of [x0, y0, x1, y1], got {value!r}"
        )
    boxes = [value] if len(value) == 4 and all(map(_is_number, value)) else value
    for box in boxes:
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            raise _Reject(BOX_NOT_4_NUMBERS, f"{box!r} is not [x0, y0, x1, y1]")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise _Reject(BOX_INVERTED, f"{box}: needs x0 < x1 and y0 < y1")
    return [[float(v) for v in box] for box in boxes]


def _check_boxes_inside(boxes: list[list[float]], image: PreparedImage, file: str | None) -> None:
    for x0, y0, x1, y1 in boxes:
        if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
            raise _Reject(
                BOX_OUTSIDE_IMAGE,
                f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}] outside the {image.width}x{image.height} image",
                file,
            )


def _choices(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(c, (str, int, float)) for c in value):
        return [str(c) for c in value]
    raise _Reject(INVALID_FIELD, f"`choices` must be a list of strings, got {value!r}")


def _meta(value: Any) -> dict[str, Any]:
    """``meta`` as a dict: an object, or a string holding a JSON object."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise _Reject(INVALID_FIELD, f"`meta` is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise _Reject(INVALID_FIELD, f"`meta` must be a JSON object, got {value!r}")
    return value


def _image_references(fields: dict[str, Any], root: Path) -> list[tuple[str | None, bytes | Path]]:
    """(name for the report, path or bytes) for each image of the row."""
    value = _first(fields, "images", "image")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _Reject(MISSING_IMAGE, "no `image` or `images`")
    return [_image_reference(v, root) for v in values]


def _image_reference(value: Any, root: Path) -> tuple[str | None, bytes | Path]:
    if isinstance(value, dict):  # datasets.Image storage: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value.get("path"), value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return None, bytes(value)
    if isinstance(value, str) and value:
        return value, _inside(root, value)
    if value is None or value in ("", b""):
        raise _Reject(MISSING_IMAGE, "empty image entry")
    raise _Reject(INVALID_FIELD, f"an image must be a path or bytes, got {type(value).__name__}")


def _inside(root: Path, relative: str) -> Path:
    """``root / relative`` with symlinks resolved; rejected unless it stays within ``root``."""
    if Path(relative).is_absolute():
        raise _Reject(PATH_OUTSIDE_ROOT, f"absolute path; paths are relative to {root}", relative)
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise _Reject(PATH_OUTSIDE_ROOT, f"resolves to {resolved}, outside {root}", relative)
    return resolved


def _prepare(file: str | None, source: bytes | Path, settings: _Settings) -> PreparedImage:
    try:
        return prepare_image(source, max_pixels=settings.max_pixels, min_side=settings.min_side)
    except ImageError as err:
        raise _Reject(err.reason, err.detail, file) from err


# ----------------------------------------------------------------------------- writing


def _check_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    resolved_out, resolved_source = out.resolve(), source.resolve()
    if resolved_out == resolved_source or resolved_out in resolved_source.parents:
        raise PreprocessError(f"the output {out} would contain the source {source}")
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() and not overwrite:
        raise PreprocessError(f"{out} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def _ordered_map(num_proc: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """``map`` in this process, or an order-keeping map over ``num_proc`` processes."""
    if num_proc <= 1:
        yield map
        return
    with multiprocessing.Pool(num_proc) as pool:
        yield functools.partial(pool.imap, chunksize=_POOL_CHUNKSIZE)


def _write_rows(
    opened: _Source,
    settings: _Settings,
    report: Report,
    path: Path,
    *,
    num_proc: int,
    strict: bool,
    show: bool,
) -> None:
    """Validate every row (in order) into the Arrow file at ``path``, filling ``report``."""
    first_line: dict[str, int | None] = {}  # id -> line of the kept row that has it
    process = functools.partial(_process_row, settings=settings)
    with (
        ArrowWriter(
            features=FEATURES, path=str(path), writer_batch_size=_WRITER_BATCH_SIZE
        ) as writer,
        _ordered_map(num_proc) as ordered_map,
    ):
        results = ordered_map(process, opened.rows)
        for result in tqdm(
            results, total=opened.length, disable=not show, desc="preprocess", unit="row"
        ):
            report.total += 1
            if isinstance(result, _Kept) and result.row["id"] in first_line:
                first = first_line[result.row["id"]]
                result = Rejection(
                    result.line,
                    result.row["id"],
                    None,
                    DUPLICATE_ID,
                    f"first at {opened.unit} {first}",
                )
            if isinstance(result, Rejection):
                if strict:
                    raise PreprocessError(_describe(result, opened))
                report.rejected_rows.append(result)
            else:
                first_line[result.row["id"]] = result.line
                writer.write(result.row)
                report.kept += 1
        writer.finalize()


def _describe(rejection: Rejection, opened: _Source) -> str:
    """E.g. ``data.jsonl line 7: missing file (imgs/a.png): imgs/a.png not found``."""
    where = (
        opened.where if rejection.line is None else f"{opened.where} {opened.unit} {rejection.line}"
    )
    file = f" ({rejection.file})" if rejection.file else ""
    detail = f": {rejection.detail}" if rejection.detail else ""
    return f"{where}: {rejection.reason}{file}{detail}"


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' own "Saving the dataset" bar; ours already showed progress."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _publish(rows_file: Path, report: Report, staging: Path, out: Path) -> None:
    """Save the dataset and report in ``staging``, then move it to ``out`` in one rename."""
    with _quiet_datasets():
        save_canonical(datasets.Dataset.from_file(str(rows_file)), staging)
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    (staging / REPORT_NAME).write_text(text + "\n", encoding="utf-8")
    if out.is_dir() and not out.is_symlink():
        out.rename(staging.parent / "replaced")  # removed with the rest of the work folder
    elif out.exists() or out.is_symlink():
        out.unlink()
    staging.rename(out)

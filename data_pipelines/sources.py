"""Source readers of ``vlreason preprocess``: one per input layout, each yielding raw rows.

A reader turns its input into :class:`~data_pipelines.report.RawRow` objects whose
fields use the names the row checks read (``image``/``images``, ``question``/``problem``,
``answer``/``solution``, ``choices``/``options``, ...), or into a
:class:`~data_pipelines.report.Rejection` for an entry it cannot parse. Nothing is
decoded or validated here; see :mod:`data_pipelines.preprocess` for the layouts.
:class:`Columns` renames other column names to those before the checks see them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.report import PreprocessError, RawRow, Rejection

FORMATS = ("auto", "jsonl", "hf", "folder")
LABEL_FILES = ("labels.jsonl", "labels.csv", "labels.json")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})

# Rejection reasons given while reading.
INVALID_JSON = "invalid JSON"
INVALID_CSV = "invalid CSV"
NO_LABEL = "image without label"

_CSV_JSON_COLUMNS = ("choices", "options", "boxes", "meta")
_BATCH_ROWS = 256


@dataclass(frozen=True)
class Columns:
    """Input column names to read as ``question``, ``answer`` and the images.

    None keeps the usual names: ``question`` else ``problem``; ``answer`` else
    ``solution``; ``images`` else ``image`` (for ``hf`` input: ``image`` else ``images``).
    A named column replaces those names: when a row lacks it, the row has no value.
    """

    question: str | None = None
    answer: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class Source:
    """An opened input: its rows, how many (when cheap to know) and the file holding them."""

    rows: Iterable[RawRow | Rejection]
    length: int | None
    where: str  # the file named in strict-mode errors
    unit: str  # "line" or "row": what Rejection.line counts


def detect_format(path: Path) -> str:
    """``jsonl``, ``hf`` or ``folder``, from what ``path`` is; PreprocessError if unclear."""
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl"
        if path.suffix == ".parquet":
            return "hf"
    elif path.is_dir():
        if is_saved_dataset(path) or any(path.rglob("*.parquet")):
            return "hf"
        if any((path / name).is_file() for name in LABEL_FILES):
            return "folder"
    raise PreprocessError(
        f"cannot tell the format of {path}: expected a .jsonl file, a .parquet file or "
        f"folder, a datasets.save_to_disk folder, or an image folder with one of "
        f"{', '.join(LABEL_FILES)}; pass the format explicitly"
    )


def checked_format(fmt: str, source: Path) -> str:
    if fmt not in FORMATS:
        raise PreprocessError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "jsonl" and not source.is_file():
        raise PreprocessError(f"format jsonl needs a file, got the folder {source}")
    if fmt == "folder" and not source.is_dir():
        raise PreprocessError(f"format folder needs a folder, got the file {source}")
    return fmt


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def default_root(source: Path) -> Path:
    """Image paths are relative to the source folder, or to the source file's folder."""
    return source if source.is_dir() else source.parent


def open_source(
    source: Path,
    fmt: str,
    *,
    root: Path,
    labels_file: str | Path | None,
    columns: Columns,
) -> Source:
    """The rows of ``source`` in format ``fmt``, with ``columns`` mapped to the usual names."""
    if fmt == "hf":
        return _open_hf(source, columns)
    if fmt == "jsonl":
        opened = Source(read_jsonl(source), _count_lines(source), str(source), "line")
    else:
        labels = Path(labels_file) if labels_file is not None else _find_labels(source)
        rows = _read_folder(root, labels)
        opened = Source(rows, len(rows), str(labels), "line")
    mapped = (map_columns(r, columns) if isinstance(r, RawRow) else r for r in opened.rows)
    return Source(mapped, opened.length, opened.where, opened.unit)


def map_columns(raw: RawRow, columns: Columns) -> RawRow:
    """``raw`` with the named columns moved to ``question``, ``answer`` and ``images``."""
    if columns == Columns():
        return raw
    fields = dict(raw.fields)
    for column, target, replaced in (
        (columns.question, "question", ("question", "problem")),
        (columns.answer, "answer", ("answer",)),
        (columns.image, "images", ("image", "images")),
    ):
        if column is None:
            continue
        value = fields.pop(column, None)
        for name in replaced:
            fields.pop(name, None)
        if value is not None:
            fields[target] = value
    return RawRow(raw.line, fields)


# ----------------------------------------------------------------------------- jsonl


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def read_jsonl(path: Path) -> Iterator[RawRow | Rejection]:
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
            except ValueError as err:  # e.g. an integer over Python's 4300-digit limit
                yield Rejection(line_no, None, None, INVALID_JSON, str(err)[:200])
                continue
            except RecursionError:
                yield Rejection(line_no, None, None, INVALID_JSON, "nested too deeply")
                continue
            if isinstance(fields, dict):
                yield RawRow(line_no, fields)
            else:
                yield Rejection(line_no, None, None, INVALID_JSON, "the line is not a JSON object")


# ----------------------------------------------------------------------------- hf / parquet


def _open_hf(source: Path, columns: Columns) -> Source:
    """Rows of a save_to_disk folder or parquet file(s), images left undecoded."""
    if source.is_dir() and is_saved_dataset(source):
        names, length, batches = _saved_dataset_batches(source)
    else:
        names, length, batches = _parquet_batches(source)
    for wanted in (columns.question, columns.answer, columns.image):
        if wanted is not None and wanted not in names:
            raise PreprocessError(f"{source} has no column {wanted!r} (columns: {names})")
    image = columns.image or next((n for n in ("image", "images") if n in names), None)
    if image is None:
        raise PreprocessError(f"{source} has no image column 'image' or 'images' (columns: {names})")
    mapped = Columns(columns.question, columns.answer, image)
    rows = (
        map_columns(RawRow(index, row), mapped)
        for index, row in enumerate(chain.from_iterable(batches))
    )
    return Source(rows, length, str(source), "row")


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
    arrow = ds.with_format("arrow")
    batches = (table.to_pylist() for table in arrow.iter(batch_size=_BATCH_ROWS))
    return ds.column_names, len(ds), batches


def _parquet_batches(path: Path) -> tuple[list[str], int, Iterator[list[dict]]]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise PreprocessError(f"no .parquet files in {path}")
    try:
        opened = [pq.ParquetFile(f) for f in files]
    except Exception as err:  # pyarrow raises several types for a non-parquet file
        raise PreprocessError(f"cannot read parquet {path}: {err}") from err
    batches = _checked_batches(
        path, (b.to_pylist() for f in opened for b in f.iter_batches(batch_size=_BATCH_ROWS))
    )
    return opened[0].schema_arrow.names, sum(f.metadata.num_rows for f in opened), batches


def _checked_batches(path: Path, batches: Iterator[list[dict]]) -> Iterator[list[dict]]:
    """``batches``, with a read error in the middle of a file (a corrupt page) turned into
    a PreprocessError: no output is published for a source that cannot be read whole."""
    try:
        yield from batches
    except (OSError, ValueError, pa.ArrowException) as err:
        raise PreprocessError(f"cannot read parquet {path}: {err}") from err


# ----------------------------------------------------------------------------- folder


def _find_labels(folder: Path) -> Path:
    for name in LABEL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PreprocessError(f"{folder} has none of {', '.join(LABEL_FILES)}; pass a labels file")


def _read_folder(folder: Path, labels: Path) -> list[RawRow | Rejection]:
    """The label rows, then one rejection per image under ``folder`` that no label names."""
    if not labels.is_file():
        raise PreprocessError(f"labels file not found: {labels}")
    rows = list(_read_labels(labels))
    named = {
        path
        for r in rows
        if isinstance(r, RawRow) and isinstance(r.fields.get("image"), str)
        and (path := _resolved(folder, r.fields["image"])) is not None
    }
    unlabelled = [
        Rejection(None, None, p.relative_to(folder).as_posix(), NO_LABEL, f"not in {labels.name}")
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve() not in named
    ]
    return rows + unlabelled


def _resolved(folder: Path, name: str) -> Path | None:
    """``folder / name`` resolved, or None for a name no file can have (a NUL byte, a
    lone surrogate); the row check rejects such a row with its reason."""
    try:
        return (folder / name).resolve()
    except (ValueError, OSError):  # UnicodeEncodeError is a ValueError
        return None


def _read_labels(labels: Path) -> Iterator[RawRow | Rejection]:
    readers: dict[str, Callable[[Path], Iterator[RawRow | Rejection]]] = {
        ".jsonl": read_jsonl,
        ".csv": _read_labels_csv,
        ".json": _read_labels_json,
    }
    if labels.suffix not in readers:
        raise PreprocessError(f"labels file must be .jsonl, .csv or .json: {labels}")
    for raw in readers[labels.suffix](labels):
        yield _file_as_image(raw) if isinstance(raw, RawRow) else raw


def _file_as_image(raw: RawRow) -> RawRow:
    """Labels name the image under ``file``; validation reads ``image``."""
    if "file" not in raw.fields or "image" in raw.fields or "images" in raw.fields:
        return raw
    fields = dict(raw.fields)
    fields["image"] = fields.pop("file")
    return RawRow(raw.line, fields)


def _read_labels_csv(path: Path) -> Iterator[RawRow | Rejection]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for row in _csv_rows(reader):
            if isinstance(row, Rejection):
                yield row
                continue
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
            yield RawRow(reader.line_num, fields)


def _csv_rows(reader: csv.DictReader) -> Iterator[dict[str, Any] | Rejection]:
    """The rows of ``reader``; a row csv cannot parse (e.g. a cell over its field size
    limit) becomes a Rejection and reading goes on with the next line."""
    while True:
        before = reader.line_num
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield Rejection(reader.line_num, None, None, INVALID_CSV, str(err)[:200])
            if reader.line_num == before:  # no progress: stop rather than loop
                return


def _read_labels_json(path: Path) -> Iterator[RawRow | Rejection]:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:
        raise PreprocessError(f"{path} is not valid JSON: {str(err)[:200]}") from err
    except RecursionError:
        raise PreprocessError(f"{path} is not usable: JSON nested too deeply") from None
    if isinstance(data, dict):  # file name -> answer, or file name -> fields
        for position, (name, value) in enumerate(data.items(), start=1):
            fields = value if isinstance(value, dict) else {"answer": value}
            yield RawRow(position, {"image": name, **fields})
    elif isinstance(data, list):  # jsonl-style objects
        for position, value in enumerate(data, start=1):
            if isinstance(value, dict):
                yield RawRow(position, value)
            else:
                yield Rejection(position, None, None, INVALID_JSON, "the entry is not an object")
    else:
        raise PreprocessError(f"{path} must hold a JSON object or list")

"""Raw data -> canonical dataset + ``report.json``: the library behind ``vlreason preprocess``.

Every input row either lands in the output dataset (see :mod:`vlreason.data.schema`) or
gets an entry in the report with a reason; a bad row never stops the run unless
``strict=True``. Output rows keep the input order, and the same input gives
byte-identical Arrow files.

The pipeline has three stages, one module each: a reader per input layout yields raw
rows (:mod:`data_pipelines.sources`), the row checks turn each into a canonical row or a
rejection (:mod:`data_pipelines.validate`, in ``num_proc`` worker processes), and this
module writes the kept rows in order, rejects repeated ids, and publishes the dataset
with its :class:`~data_pipelines.report.Report` in one rename.

Fields read from every row (whatever the format):

- images: ``images`` (a list) or ``image`` (one), as paths relative to the source's
  folder (or ``image_root``), raw bytes, or ``{"bytes", "path"}`` dicts (the storage
  of a ``datasets.Image`` column);
- ``question`` (or ``problem``); ``question`` (the argument) for rows that have none;
- ``answer`` (or ``solution``: when there is no ``answer`` and ``solution`` holds a full
  ``<think>...</think><answer>X</answer>`` response, ``X`` becomes the answer and the
  full text is kept as ``solution``; a ``solution`` without answer tags is the answer);
- optional ``id`` (default ``{source_name}-{line}``), ``choices`` (or ``options``), a
  list; ``boxes`` (list of ``[x0, y0, x1, y1]`` in pixels of the first image after EXIF
  orientation; one bare box is accepted too); ``meta`` (object); ``solution``.

``Columns`` (``question_column``, ``answer_column``, ``image_column``) reads those three
from other column names instead.

Image placement: ``<image>`` in the question marks where an image goes, the k-th
placeholder the k-th image (the EasyR1 / verl convention). The canonical question keeps
the placeholders (:data:`vlreason.data.schema.IMAGE_PLACEHOLDER`) and the prompt
builder puts each image there; a question without one shows the images before the
text. A question with placeholders must have exactly one per image, otherwise the row
is rejected (``image placeholder mismatch``).

Input formats (``fmt``; ``"auto"`` picks by what the path is):

``jsonl``
    A ``.jsonl`` file, one JSON object a line::

        {"id": "q1", "image": "imgs/a.png", "question": "What colour?", "answer": "red",
         "boxes": [[4, 4, 20, 20]], "choices": ["red", "blue"], "meta": {"level": 1}}

    Blank lines are skipped. ``line`` in the report is the 1-based line.

``hf``
    A ``datasets.save_to_disk`` folder (one split), a ``.parquet`` file, or a folder of
    ``.parquet`` files (read in sorted path order). The images are in ``image_column``
    (default ``image``, else ``images``): a ``datasets.Image`` column, a list of them
    (the EasyR1 layout: ``images``, ``problem`` with ``<image>`` placeholders,
    ``answer``), raw bytes, or paths. ``line`` in the report is the 0-based row index.

``folder``
    A folder of images plus a labels file: ``labels.jsonl``, ``labels.csv`` or
    ``labels.json`` inside it (first found), or ``labels_file``. File names are relative
    to the folder (or ``image_root``).

    - ``labels.jsonl``: as ``jsonl`` above, with the image under ``file`` (or ``image``).
    - ``labels.csv``: a header row with ``file`` and ``answer``, optional ``question``,
      ``id``, ``solution``; ``choices``, ``options``, ``boxes``, ``meta`` cells hold
      JSON text. Empty cells count as absent. ``line`` is the line in the file (the
      header is line 1).
    - ``labels.json``: either ``{"a.png": "answer", ...}``, ``{"a.png": {"question": ...,
      "answer": ...}, ...}``, or a list of ``jsonl``-style objects. ``line`` is the
      1-based entry number.

    Images in the folder that no label names are reported as ``image without label``
    (with ``line`` null).

Disk full: everything is written in a temporary folder beside ``out_dir`` and moved
into place only when complete, so a write that fails for lack of space (``ENOSPC``, a
quota, a read-only file system) removes that folder, leaves ``out_dir`` as it was (a
dataset already there with ``overwrite`` included) and raises
:class:`~data_pipelines.report.PreprocessWriteError` naming ``out_dir``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
from datasets.arrow_writer import ArrowWriter
from tqdm import tqdm

from data_pipelines.report import (
    REPORT_NAME,
    PreprocessError,
    PreprocessWriteError,
    RawRow,
    Rejection,
    Report,
)
from data_pipelines.sources import (
    FORMATS,
    IMAGE_SUFFIXES,
    INVALID_JSON,
    LABEL_FILES,
    NO_LABEL,
    Columns,
    Source,
    checked_format,
    default_root,
    detect_format,
    open_source,
)
from data_pipelines.validate import (
    BOX_INVERTED,
    BOX_NOT_4_NUMBERS,
    BOX_OUTSIDE_IMAGE,
    INVALID_FIELD,
    MISSING_ANSWER,
    MISSING_IMAGE,
    MISSING_QUESTION,
    PATH_OUTSIDE_ROOT,
    PLACEHOLDER_MISMATCH,
    Kept,
    Settings,
    process_row,
)
from vlreason.data.images import DEFAULT_MAX_PIXELS
from vlreason.data.schema import FEATURES, save_canonical
from vlreason.outputs import disk_error

__all__ = [
    "BOX_INVERTED",
    "BOX_NOT_4_NUMBERS",
    "BOX_OUTSIDE_IMAGE",
    "DUPLICATE_ID",
    "FORMATS",
    "IMAGE_SUFFIXES",
    "INVALID_FIELD",
    "INVALID_JSON",
    "LABEL_FILES",
    "MISSING_ANSWER",
    "MISSING_IMAGE",
    "MISSING_QUESTION",
    "NO_LABEL",
    "PATH_OUTSIDE_ROOT",
    "PLACEHOLDER_MISMATCH",
    "REPORT_NAME",
    "Columns",
    "PreprocessError",
    "PreprocessWriteError",
    "RawRow",
    "Rejection",
    "Report",
    "detect_format",
    "preprocess",
]

DUPLICATE_ID = "duplicate id"

_WRITER_BATCH_SIZE = 64  # rows buffered before an Arrow write; rows hold image bytes
_POOL_CHUNKSIZE = 8


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
    image_column: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
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
    ``labels_file``: labels for ``folder`` input. ``image_column``,
    ``question_column``, ``answer_column``: read the images, question and answer from
    these columns (an ``hf`` input without them is a PreprocessError). ``question``: the
    question for rows that have none. ``overwrite``: replace a non-empty ``out_dir``.
    ``progress``: show a progress bar (default: when stderr is a terminal). The output
    appears only when complete (written to a temporary folder, then moved).
    """
    source, out = Path(source), Path(out_dir)
    if not source.exists():
        raise PreprocessError(f"source not found: {source}")
    fmt = detect_format(source) if fmt == "auto" else checked_format(fmt, source)
    _check_out_dir(out, source, overwrite)
    root = Path(image_root) if image_root is not None else default_root(source)
    if not root.is_dir():
        raise PreprocessError(f"image root is not a folder: {root}")
    root = root.resolve()
    columns = Columns(question=question_column, answer=answer_column, image=image_column)
    opened = open_source(source, fmt, root=root, labels_file=labels_file, columns=columns)
    name = source_name or (source.stem if source.is_file() else source.resolve().name)
    settings = Settings(root, name, question, max_pixels, min_side)
    report = Report(source=str(source), format=fmt, source_name=name)
    show = sys.stderr.isatty() if progress is None else progress

    work = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        rows_file = work / "rows.arrow"
        _write_rows(
            opened, settings, report, rows_file, num_proc=num_proc, strict=strict, show=show
        )
        _publish(rows_file, report, work / "dataset", out)
    except OSError as err:
        cause = disk_error(err)
        if cause is None:
            raise
        held = out.is_file() or (out.is_dir() and any(out.iterdir()))  # the CLI makes an empty --out
        was = "the dataset already there is unchanged" if held else "nothing was written there"
        raise PreprocessWriteError(
            f"cannot write the dataset to {out}: {cause.strerror or cause} (after reading {report.total} "
            f"rows); {was}; free space on that file system, then run again"
        ) from err
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return report


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
    opened: Source,
    settings: Settings,
    report: Report,
    path: Path,
    *,
    num_proc: int,
    strict: bool,
    show: bool,
) -> None:
    """Validate every row (in order) into the Arrow file at ``path``, filling ``report``."""
    first_line: dict[str, int | None] = {}  # id -> line of the kept row that has it
    process = functools.partial(process_row, settings=settings)
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
            if isinstance(result, Kept) and result.row["id"] in first_line:
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


def _describe(rejection: Rejection, opened: Source) -> str:
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
    # A lone surrogate (from a hostile row) is written as its JSON escape, not a crash.
    (staging / REPORT_NAME).write_bytes((text + "\n").encode("utf-8", "backslashreplace"))
    if out.is_dir() and not out.is_symlink():
        out.rename(staging.parent / "replaced")  # removed with the rest of the work folder
    elif out.exists() or out.is_symlink():
        out.unlink()
    staging.rename(out)

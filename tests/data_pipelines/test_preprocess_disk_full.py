"""Disk full during ``vlreason preprocess``: whichever write finds no space (the rows
file, the dataset, report.json), the temporary folder goes, ``--out`` is left as it was
(a dataset already there under ``--overwrite`` included) and the run stops with a
one-line ``PreprocessWriteError`` naming ``--out`` (exit 1 from the command line). Once
with patched writers, once on a real full file system (a size-limited tmpfs, mounted
when this machine allows it)."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.preprocess import PreprocessWriteError, preprocess
from vlreason.data.schema import load_canonical


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _source(folder: Path, n: int, side: int) -> Path:
    """A JSONL source of ``n`` rows, each with a ``side`` x ``side`` noise PNG (does not
    compress: about 3 * side**2 bytes)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
        rows.append({"id": f"r{i}", "image": f"{i}.png", "question": "What is shown?", "answer": str(i)})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "rows.jsonl"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


WRITERS = {
    "rows": "datasets.arrow_writer.ArrowWriter.write",  # the rows file, row by row
    "dataset": "data_pipelines.preprocess.save_canonical",  # the published Arrow dataset
    "report": "pathlib.Path.write_bytes",  # report.json
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_disk_full_leaves_the_dataset_already_there_and_names_the_folder(tmp_path, monkeypatch, writer):
    out = tmp_path / "out"
    preprocess(_source(tmp_path / "old", 2, 16), out, progress=False)
    before, new = _snapshot(out), _source(tmp_path / "new", 3, 16)
    monkeypatch.setattr(WRITERS[writer], _enospc)
    with pytest.raises(PreprocessWriteError) as info:
        preprocess(new, out, overwrite=True, progress=False)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write the dataset to {out}: No space left on device (after reading ")
    assert message.endswith("; the dataset already there is unchanged; free space on that file system, then run again")
    assert _snapshot(out) == before and [r["id"] for r in load_canonical(out)] == ["r0", "r1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out"]  # no .out.tmp-* left


def test_cli_reports_a_full_disk_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from vlreason.cli import main

    source, out = _source(tmp_path / "src", 2, 16), tmp_path / "new" / "out"
    monkeypatch.setattr(WRITERS["dataset"], _enospc)
    assert main(["preprocess", str(source), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vlreason preprocess: error: cannot write the dataset to {out}: No space left on device "
                   "(after reading 2 rows); nothing was written there; free space on that file system, then run "
                   "again"], err
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []




def test_on_a_real_full_file_system(tmp_path, tiny_fs):
    """A small dataset fits on a 1 MiB tmpfs; replacing it with 4 rows of 300x300 noise
    images (about 1 MiB of pixels) does not: the old dataset stays, loadable, and the
    file system holds nothing else."""
    fs = tiny_fs(1024)
    out = fs / "out"
    preprocess(_source(tmp_path / "small", 2, 16), out, progress=False)
    before = _snapshot(out)
    with pytest.raises(PreprocessWriteError, match=f"cannot write the dataset to {out}: No space left on device"):
        preprocess(_source(tmp_path / "big", 4, 300), out, overwrite=True, progress=False)
    assert _snapshot(out) == before and [r["id"] for r in load_canonical(out)] == ["r0", "r1"]
    assert sorted(p.name for p in fs.iterdir()) == ["out"]

"""Disk full outside the checkpoints: the final model (``final/``) and ``metrics.jsonl``.

A ``final/`` write that fails leaves a ``final/`` already there byte for byte as it was,
no temp folder, the last checkpoint complete, and a one-line ``FinalWriteError`` naming
the folder; running again with ``resume=auto`` writes it. A ``metrics.jsonl`` line that
cannot be written is taken back (the file keeps only whole lines), the run stops with a
one-line ``MetricsWriteError`` naming the file and saves no checkpoint past the last
line, so ``resume=auto`` ends with each step logged once and the weights of an
uninterrupted run. The failures are simulated by patched writers, and once more on a
real full file system (a size-limited tmpfs, mounted when this machine allows it)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_recipe import ToyLinear  # tests/train/toy_recipe.py

from vlreason.train.checkpoint import list_checkpoints, load_checkpoint, write_final
from vlreason.train.disk import CheckpointWriteError, FinalWriteError, MetricsWriteError
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
from vlreason.train.metrics import METRICS_FILE, MetricsLogger, truncate_metrics

Toy = ToyLinear


def _fit(run: Path, recipe: Toy, **kw) -> Path:
    cfg = LoopConfig(output_dir=str(run), trackers=["jsonl"], progress=False,
                     optim=OptimConfig(lr=0.01, max_grad_norm=0.0), **kw)
    return Trainer(cfg, recipe, save_final=recipe.save_final).fit()


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / METRICS_FILE).read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- final/


def test_disk_full_writing_final_keeps_the_previous_final_and_the_checkpoint(tmp_path, monkeypatch):
    """A finished run (final/ of step 2) is extended to 4 steps; writing its final/ fails
    with ENOSPC. The old final/ is unchanged, no final.tmp-* is left, step-4 is complete
    and the error names the folder and that checkpoint; running again with resume=auto
    writes final/ with the weights of step 4 and logs no step twice."""
    run = tmp_path / "run"
    _fit(run, Toy(), max_steps=2)
    before = _snapshot(run / "final")
    monkeypatch.setattr(Toy, "save_final", lambda self, folder: _write_half_then_fail(folder))
    with pytest.raises(FinalWriteError) as info:
        _fit(run, Toy(), max_steps=4, resume="auto")
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write the final model to {run / 'final'}: No space left on device "
                              "(the final model already there is unchanged); checkpoint step-4")
    assert "resume=auto" in message
    assert _snapshot(run / "final") == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"]
    assert list_checkpoints(run)[-1].name == "step-4"
    # space again: the same command writes final/ from the step-4 checkpoint
    recipe = Toy()
    assert _fit(run, recipe, max_steps=4, resume="auto") == run / "final"
    assert recipe.position == 4 and _steps(run) == [1, 2, 3, 4]
    fresh = Toy()
    load_checkpoint(run / "checkpoints" / "step-4", model=fresh.model, restore_rng=False)
    weights = load_file(str(run / "final" / "model.safetensors"))
    for name, param in fresh.model.named_parameters():
        assert torch.equal(weights[name], param.detach()), name
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"]


def _write_half_then_fail(folder: Path) -> None:
    """A save_final that writes one file, then finds the disk full."""
    (folder / "config.json").write_text("{}\n")
    _enospc()


def test_first_final_that_fails_leaves_no_final_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(Toy, "save_final", lambda self, folder: _write_half_then_fail(folder))
    with pytest.raises(FinalWriteError, match=r"\(no final/ was written\); checkpoint step-2 of the same step"):
        _fit(run, Toy(), max_steps=2)
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == []


def test_other_errors_writing_final_are_raised_as_they_are(tmp_path):
    def broken(folder):
        raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):
        write_final(tmp_path, broken)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_final_write_is_cleaned_up_by_the_next(tmp_path):
    (tmp_path / "final.tmp-123").mkdir()
    (tmp_path / "final.old-456").mkdir()
    (tmp_path / "final.tmp-123" / "model.safetensors").write_bytes(b"half")
    write_final(tmp_path, lambda folder: (folder / "a").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (tmp_path / "final" / "a").read_text() == "x"


# ---------------------------------------------------------------------- metrics.jsonl


def _partial_then_enospc(real_write, step: int):
    """os.write that writes half of step ``step``'s line, then finds the disk full."""
    state = {"half": False}

    def write(fd, data):
        if bytes(data[:20]).startswith(f'{{"step": {step},'.encode()) or state["half"]:
            if not state["half"]:
                state["half"] = True
                return real_write(fd, bytes(data[: len(data) // 2]))
            _enospc()
        return real_write(fd, data)

    return write


def test_disk_full_appending_metrics_takes_the_line_back_and_stops_without_a_checkpoint(tmp_path, monkeypatch):
    """Step 3's line is half written when the disk fills. metrics.jsonl is cut back to
    the whole lines of steps 1-2, the run stops with a one-line error naming the file,
    no checkpoint of step 3 is saved (resume would skip its line), and resume=auto ends
    with each step once and the weights of an uninterrupted run."""
    straight = Toy()
    _fit(tmp_path / "straight", straight, max_steps=5, save_steps=2)

    run = tmp_path / "run"
    monkeypatch.setattr(os, "write", _partial_then_enospc(os.write, 3))
    recipe = Toy()
    with pytest.raises(MetricsWriteError) as info:
        _fit(run, recipe, max_steps=5, save_steps=2)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot append step 3 to {run / METRICS_FILE}: No space left on device; "
                              "the file was cut back to its last whole line; the run stops here without a checkpoint")
    text = (run / METRICS_FILE).read_text()
    assert text.endswith("\n") and _steps(run) == [1, 2]
    assert recipe.position == 3 and [p.name for p in list_checkpoints(run)] == ["step-2"]
    resumed = Toy()
    _fit(run, resumed, max_steps=5, save_steps=2, resume="auto")
    assert _steps(run) == [1, 2, 3, 4, 5] and resumed.position == 5
    a, b = _snapshot(tmp_path / "straight" / "final"), _snapshot(run / "final")
    assert a["model.safetensors"] == b["model.safetensors"]
    la = [json.loads(line) for line in (tmp_path / "straight" / METRICS_FILE).read_text().splitlines()]
    lb = [json.loads(line) for line in text.splitlines()] + [
        json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()[2:]]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_truncating_metrics_for_a_resume_on_a_full_disk_leaves_the_file(tmp_path, monkeypatch):
    path = tmp_path / METRICS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(MetricsWriteError, match=f"cannot rewrite {path} for the resume from step 2: No space"):
        truncate_metrics(path, 2)
    monkeypatch.undo()
    assert path.read_text() == "\n".join(lines) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


# -------------------------------------------------------------- a real full file system




def _fill(folder: Path) -> Path:
    """Fill ``folder``'s file system to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    return filler


def test_on_a_real_full_file_system(tiny_fs, monkeypatch):
    """On a 24 MiB tmpfs: (1) another job fills it right before the save of step 3: the
    run stops with CheckpointWriteError, step-2 intact; (2) once there is room, the run
    resumes to step 4 and its 32 MiB final/ does not fit: FinalWriteError, the final/
    of step 2 unchanged; (3) metrics lines on the full disk: whole lines only."""
    import vlreason.train.loop as loop

    fs = tiny_fs(24 * 1024)
    run = fs / "run"
    _fit(run, Toy(), max_steps=2, save_steps=1)
    final_before = _snapshot(run / "final")
    real_save = loop.save_checkpoint
    filler: list[Path] = []

    def save_on_a_disk_another_job_filled(run_dir, step, **kwargs):
        if step == 3:
            filler.append(_fill(fs))
        return real_save(run_dir, step, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_on_a_disk_another_job_filled)
    with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint step-3 in {run / 'checkpoints'}: "
                                                   "No space left on device; the newest complete checkpoint"):
        _fit(run, Toy(), max_steps=4, save_steps=1, resume="auto")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)][-1] == "step-2"
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    filler[0].unlink()

    with pytest.raises(FinalWriteError, match=f"cannot write the final model to {run / 'final'}: No space left"):
        _fit(run, Toy(pad=32 << 20), max_steps=4, save_steps=1, resume="auto")
    assert _snapshot(run / "final") == final_before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"]
    assert list_checkpoints(run)[-1].name == "step-4" and _steps(run) == [1, 2, 3, 4]

    logs = fs / "logs"
    logger = MetricsLogger(logs, trackers=["jsonl"])
    for step in (1, 2, 3):  # part of a page; the disk fills; a later line straddles the page end
        logger.log(step, {"note": "x" * 1000})
    _fill(fs)
    with pytest.raises(MetricsWriteError, match=f"cannot append step \\d+ to {logs / METRICS_FILE}: No space"):
        for step in range(4, 100_000):
            logger.log(step, {"note": "x" * 1000})
    logger.close()
    written = _steps(logs)
    assert written == list(range(1, len(written) + 1)) and len(written) >= 3
    assert (logs / METRICS_FILE).read_bytes().endswith(b"\n")

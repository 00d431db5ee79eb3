"""TensorBoard and wandb when their writes fail (a full disk).

TensorBoard's ``SummaryWriter`` writes from a background thread and raises that
thread's ``OSError`` on a later ``add_scalar`` or on ``close``. The trackers are
secondary to ``metrics.jsonl``: a failing one is closed with a warning and the run goes
on; without the jsonl tracker its failure is a ``MetricsWriteError``; and closing never
raises, so the error that ended a run is the one the user sees. wandb is not installed
on the machines this is tested on: a stand-in module whose calls raise checks the same
handling (what real wandb does with a full disk happens in its own service process)."""

from __future__ import annotations

import errno
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
from test_disk_full import _fill, _steps  # tests/train/test_disk_full.py
from toy_recipe import ToyLinear  # tests/train/toy_recipe.py

from vlreason.train.disk import MetricsWriteError
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
from vlreason.train.metrics import METRICS_FILE, MetricsLogger

pytest.importorskip("tensorboard")


def _fit(run: Path, trackers: list[str], max_steps: int) -> Path:
    recipe = ToyLinear()
    cfg = LoopConfig(output_dir=str(run), trackers=trackers, progress=False, max_steps=max_steps, save_steps=1,
                     optim=OptimConfig(lr=0.01, max_grad_norm=0.0))
    return Trainer(cfg, recipe, save_final=recipe.save_final).fit()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failing_tensorboard_is_closed_with_one_warning_and_jsonl_keeps_every_step(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    logger = MetricsLogger(tmp_path, trackers=["jsonl", "tensorboard"])
    logger.log(1, {"loss": 1.0})
    monkeypatch.setattr(SummaryWriter, "add_scalar", _enospc)
    monkeypatch.setattr(SummaryWriter, "close", _enospc)
    with pytest.warns(UserWarning) as caught:
        logger.log(2, {"loss": 2.0})
        logger.log(3, {"loss": 3.0})
        logger.close()
    messages = [str(w.message) for w in caught]
    assert messages[0] == (f"tensorboard logging stopped at step 2 (No space left on device); "
                           f"{tmp_path / METRICS_FILE} keeps every step")
    assert messages[1:] == ["closing tensorboard failed (No space left on device); what it had buffered is lost"]
    assert _steps(tmp_path) == [1, 2, 3]


def test_tensorboard_as_the_only_tracker_on_a_real_full_disk_stops_with_metrics_write_error(tiny_fs):
    fs = tiny_fs(1024)
    logger = MetricsLogger(fs / "run", trackers=["tensorboard"])
    logger.log(1, {"loss": 1.0})
    logger._tb.flush()
    _fill(fs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed writer's close
        with pytest.raises(MetricsWriteError, match=f"tensorboard logging failed at step \\d+ in {fs / 'run'}: "
                                                    "No space left on device; it was the only metrics sink"):
            for step in range(2, 100_000):
                logger.log(step, {"loss": float(step), "note": 1.0})
        logger.close()  # does not raise


def test_a_run_whose_tensorboard_fails_goes_on_and_ends_normally(tmp_path, monkeypatch):
    """TensorBoard's writer fails from step 3 on (``add_scalar`` and ``close`` raise its
    thread's ENOSPC, as on a full disk): the run trains to the end with two warnings,
    ``metrics.jsonl`` holds every step and ``final/`` is written. That ``OSError`` used to
    end the run, and closing TensorBoard in the loop's ``finally`` raised it again over
    whatever error had ended the run."""
    from torch.utils.tensorboard import SummaryWriter

    real_add = SummaryWriter.add_scalar

    def add_scalar(self, tag, value, step, *args, **kwargs):
        if step >= 3:
            _enospc()
        return real_add(self, tag, value, step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    monkeypatch.setattr(SummaryWriter, "close", _enospc)
    run = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert _fit(run, ["jsonl", "tensorboard"], max_steps=4) == run / "final"
    messages = [str(w.message) for w in caught]
    assert f"tensorboard logging stopped at step 3 (No space left on device); {run / METRICS_FILE} " \
           "keeps every step" in messages
    assert "closing tensorboard failed (No space left on device); what it had buffered is lost" in messages
    assert _steps(run) == [1, 2, 3, 4] and (run / "final" / "model.safetensors").is_file()


@pytest.fixture
def failing_wandb(monkeypatch):
    """A stand-in ``wandb`` module: ``init`` works, ``log`` and ``finish`` raise ENOSPC."""
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: types.SimpleNamespace(log=_enospc, finish=_enospc)
    monkeypatch.setitem(sys.modules, "wandb", module)


def test_a_failing_wandb_is_closed_with_a_warning_and_the_run_goes_on(tmp_path, failing_wandb):
    with pytest.warns(UserWarning) as caught:
        path = _fit(tmp_path / "run", ["jsonl", "wandb"], max_steps=3)
    messages = [str(w.message) for w in caught]
    assert f"wandb logging stopped at step 1 (No space left on device); {tmp_path / 'run' / METRICS_FILE} " \
           "keeps every step" in messages
    assert "closing wandb failed (No space left on device); what it had buffered is lost" in messages
    assert path == Path(tmp_path / "run" / "final") and _steps(tmp_path / "run") == [1, 2, 3]

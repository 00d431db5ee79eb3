"""MetricsLogger (JSONL + TensorBoard), resume truncation, StepTimer, progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlreason.train.metrics import (
    MetricsLogger,
    StepTimer,
    flatten_metrics,
    format_postfix,
    progress_bar,
)


def _lines(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_jsonl_converts_values_and_writes_valid_json(tmp_path: Path):
    with MetricsLogger(tmp_path, trackers=["jsonl"]) as logger:
        record = logger.log(
            1,
            {
                "loss": torch.tensor(0.5, requires_grad=True) * 1,
                "reward": np.float32(0.25),
                "count": np.int64(3),
                "n_tokens": torch.tensor([7]),
                "kl": float("nan"),
                "grad_norm": float("inf"),
                "stage": "think-16k",
                "time": {"rollout": 1.5},
            },
        )
        # each line is on disk as soon as it is logged
        assert _lines(tmp_path) == [record]
        logger.log(2, {"loss": 0.25})
    first, second = _lines(tmp_path)
    assert first == {
        "step": 1,
        "loss": 0.5,
        "reward": 0.25,
        "count": 3,
        "n_tokens": 7,
        "kl": None,
        "grad_norm": None,
        "stage": "think-16k",
        "time/rollout": 1.5,
    }
    assert second == {"step": 2, "loss": 0.25}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_non_scalar_metric_is_an_error():
    with pytest.raises(ValueError, match="'advantages'"):
        flatten_metrics({"advantages": torch.zeros(4)})
    with pytest.raises(TypeError, match="'obj'"):
        flatten_metrics({"obj": object()})


def test_resume_truncates_later_steps(tmp_path: Path):
    with MetricsLogger(tmp_path, trackers=["jsonl"]) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # partial line from a crash
    with MetricsLogger(tmp_path, trackers=["jsonl"], resume_step=3) as logger:
        logger.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


def test_tensorboard_events_and_non_main_process(tmp_path: Path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path / "main", config={"seed": 1}) as logger:
        logger.log(1, {"loss": 1.0, "stage": "a", "ok": True})
    assert list((tmp_path / "main").glob("events.out.tfevents.*"))
    with MetricsLogger(tmp_path / "rank1", is_main_process=False) as other:
        assert other.log(1, {"loss": 1.0}) == {}
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="unknown trackers"):
        MetricsLogger(tmp_path, trackers=["jsonl", "mlflow"])


def test_step_timer_accumulates_phases():
    timer = StepTimer()
    with timer("rollout"):
        time.sleep(0.02)
    with timer("reward"):
        pass
    with timer("rollout"):
        time.sleep(0.01)
    times = timer.pop()
    assert set(times) == {"time/rollout", "time/reward", "time/step"}
    assert 0.03 <= times["time/rollout"] < 0.5
    assert times["time/step"] >= times["time/rollout"] + times["time/reward"]
    # pop() starts a new step: phases are forgotten, the step clock restarts
    assert set(timer.pop()) == {"time/step"}
    with pytest.raises(ValueError, match="reserved"):
        with timer("step"):
            pass


def test_progress_bar_and_postfix():
    bar = progress_bar(total=10, initial=4, disable=True)
    assert bar.n == 4 and bar.total == 10
    bar.close()
    metrics = {
        "reward": torch.tensor(0.625),
        "loss": -0.0132,
        "kl": 1.5e-4,
        "completion_len": 231.0,
        "time/step": 3.2,
        "other": 1,
    }
    assert format_postfix(metrics) == (
        "reward=0.625 loss=-0.0132 kl=0.00015 completion_len=231 time/step=3.20s"
    )
    assert format_postfix({"loss": None, "stage": "s2"}, keys=("loss", "stage", "kl")) == (
        "loss=None stage=s2"
    )

"""``vlreason plot RUN_DIR``: curves PNG from metrics.jsonl, stage boundaries, errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from vlreason.cli import main
from vlreason.plotting import _stage_starts, ema, load_metrics


def _fake_run(run_dir: Path, steps: int = 60) -> Path:
    """A Vision-R1-like run: three stages, reward rising, a NaN, a duplicate step."""
    rng = random.Random(0)
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        stage = "think-4k" if step <= 20 else "think-8k" if step <= 45 else "think-16k"
        rollout = 2.0 + rng.random()
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "stage": stage,
                    "reward": min(1.0, 0.2 + step / 80 + rng.gauss(0, 0.05)),
                    "accuracy": min(1.0, 0.1 + step / 90 + rng.gauss(0, 0.05)),
                    "format_rate": min(1.0, 0.5 + step / 50),
                    "loss": rng.gauss(0, 0.02),
                    "kl": None if step == 30 else 0.001 * math.log1p(step),
                    "completion_len": 180 + 2 * step + rng.gauss(0, 10),
                    "lr": 1e-6,
                    "time/rollout": rollout,
                    "time/reward": 0.1,
                    "time/update": 0.8,
                    "time/step": rollout + 0.1 + 0.8 + 0.3,
                }
            )
        )
    lines.insert(10, json.dumps({"step": 5, "stage": "think-4k", "reward": 0.0}))  # stale dup
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_plot_writes_default_png(tmp_path: Path, capsys):
    run_dir = _fake_run(tmp_path / "run")
    assert main(["plot", str(run_dir)]) == 0
    out = run_dir / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 30_000


def test_plot_keys_and_out(tmp_path: Path):
    run_dir = _fake_run(tmp_path / "run")
    out = tmp_path / "figs" / "reward.png"
    assert (
        main(["plot", str(run_dir), "--out", str(out), "--keys", "reward,time", "--smooth", "0"])
        == 0
    )
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    assert not (run_dir / "curves.png").exists()


def test_stage_boundaries_and_dedup(tmp_path: Path):
    records = load_metrics(_fake_run(tmp_path / "run"))
    assert [r["step"] for r in records] == list(range(1, 61))  # sorted, last duplicate wins
    assert records[4]["reward"] == 0.0
    assert _stage_starts(records) == [(1, "think-4k"), (20.5, "think-8k"), (45.5, "think-16k")]
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased


def test_errors(tmp_path: Path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "missing does not exist" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 1
    assert "no metric records" in capsys.readouterr().err
    _fake_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--keys", "nope"]) == 1
    assert "no numeric metric 'nope'" in capsys.readouterr().err

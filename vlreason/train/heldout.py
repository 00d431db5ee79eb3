"""Held-out evaluation inside a training run: one summary per evaluation point, written
to ``RUN_DIR/<file>`` (one JSON line each), printed, and returned as ``eval/*`` metrics
for the step's line of metrics.jsonl.

Every process evaluates the whole split (the split is small; the figures then agree
without a gather); only the main process writes and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlreason.evaluation import EvalConfig, evaluate
from vlreason.train.metrics import truncate_metrics

SHOWN = ("accuracy", "format_rate", "length_mean", "truncation_rate")


class HeldOutEval:
    def __init__(self, policy, data, cfg: EvalConfig, run_dir: str | Path, *, file: str = "eval.jsonl",
                 is_main: bool = True):
        self.policy = policy
        self.data = data
        self.cfg = cfg
        self.path = Path(run_dir) / file
        self.is_main = is_main

    def __call__(self, done: int, label: str, **fields: Any) -> dict[str, Any]:
        """Evaluate after ``done`` optimizer steps (0: before training). ``label`` names the
        point in the printed line; ``fields`` join the JSON line (e.g. a stage name)."""
        summary, _ = evaluate(self.policy, self.data, self.cfg)
        if self.is_main:
            truncate_metrics(self.path, done - 1)  # a crashed or resumed run may have written it
            before = next((p for p in read_eval_points(self.path) if p["step"] == 0), None)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": done, **fields, **summary}) + "\n")
            shown = " ".join(f"{k}={summary[k]:.3f}" for k in SHOWN if k in summary)
            print(f"eval {label} (step {done}, {summary['rows']} held-out rows x "
                  f"{summary['samples_per_row']} samples, T={self.cfg.temperature}): {shown}", flush=True)
            if before is not None and done > 0:
                print(f"held-out accuracy: {before['accuracy']:.3f} before training -> "
                      f"{summary['accuracy']:.3f} after step {done} "
                      f"({summary['accuracy'] - before['accuracy']:+.3f})", flush=True)
        return {f"eval/{k}": v for k, v in summary.items()}


def read_eval_points(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation points a run wrote to ``path`` (e.g. RUN_DIR/eval.jsonl), in order."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

"""Training curves from a run's ``metrics.jsonl`` -> one PNG (``vlreason plot RUN_DIR``).

Default panels, each drawn only when the run logged a matching key: reward (with
accuracy / format rates), loss, KL, completion length, learning rate, and the time
split of a step stacked from the ``time/*`` keys (``other`` = ``time/step`` minus the
named phases). Raw points are drawn faintly with a debiased exponential moving average
over them. When records carry a ``stage`` key (e.g. Vision-R1's progressive thinking
suppression), every panel marks the stage boundaries with labelled vertical lines.

Matplotlib is used through ``Figure`` + the Agg canvas, never ``pyplot``, so plotting
works headless and leaves the global backend alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from vlreason.outputs import prepare_output

METRICS_FILE = "metrics.jsonl"  # same name as vlreason.train.metrics (not imported: no torch)
DEFAULT_SMOOTH = 0.6
TIME_PANEL = "time"


def _not_time(key: str) -> bool:
    return not key.startswith("time/")


#: (title, main key drawn first, does this key belong to the panel?) in drawing order.
DEFAULT_PANELS: list[tuple[str, str, Callable[[str], bool]]] = [
    (
        "reward",
        "reward",
        lambda k: _not_time(k) and (k.startswith("reward") or "accuracy" in k or "format" in k),
    ),
    ("loss", "loss", lambda k: k.startswith("loss")),
    ("kl", "kl", lambda k: k == "kl" or k.startswith(("kl/", "kl_"))),
    ("completion length", "completion_len", lambda k: k.startswith("completion_len")),
    ("learning rate", "lr", lambda k: k == "lr" or k.startswith("lr/")),
]


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of ``RUN_DIR/metrics.jsonl``), sorted by step,
    the last record kept where a step repeats. Unreadable lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if not (path / METRICS_FILE).is_file():
            raise FileNotFoundError(
                f"{path / METRICS_FILE} not found: is {path} a vlreason run "
                "directory that has logged at least one step?"
            )
        path = path / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            by_step[int(record["step"])] = record
    if not by_step:
        raise ValueError(f"{path} has no metric records (empty or unreadable)")
    return [by_step[step] for step in sorted(by_step)]


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's smoothing."""
    out, acc = [], 0.0
    for n, value in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * value
        out.append(acc / (1.0 - weight**n))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _stage_starts(records: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(x position, stage label) where each stage begins; boundaries sit midway between
    the last step of one stage and the first of the next."""
    starts: list[tuple[float, str]] = []
    prev_step, prev_stage = None, None
    for record in records:
        if "stage" not in record or record["stage"] is None:
            continue
        stage = record["stage"]
        if prev_step is None:
            starts.append((record["step"], str(stage)))
        elif stage != prev_stage:
            starts.append(((prev_step + record["step"]) / 2, str(stage)))
        prev_step, prev_stage = record["step"], stage
    return starts


def _draw_stages(ax: Axes, starts: list[tuple[float, str]]) -> None:
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (x, label) in enumerate(starts):
        if i > 0:
            ax.axvline(x, color="0.35", linestyle="--", linewidth=0.9)
        ax.text(
            x,
            0.97,
            label,
            transform=transform,
            rotation=90,
            va="top",
            ha="left",
            fontsize=7,
            color="0.2",
            zorder=5,
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )


def _draw_lines(ax: Axes, records: list[dict[str, Any]], keys: list[str], smooth: float) -> None:
    for i, key in enumerate(keys):
        steps, values = _series(records, key)
        color = f"C{i % 10}"
        if smooth > 0 and len(values) >= 5:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, ema(values, smooth), color=color, linewidth=1.6, label=key)
        else:
            ax.plot(
                steps,
                values,
                color=color,
                linewidth=1.4,
                marker="." if len(values) < 50 else None,
                label=key,
            )
    if len(keys) > 1:
        ax.legend(fontsize=7, loc="best")


def _time_keys(keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k.startswith("time/") and k != "time/step"]


def _draw_time_split(ax: Axes, records: list[dict[str, Any]], smooth: float) -> None:
    all_keys = list(dict.fromkeys(k for r in records for k in r))  # first-seen order
    phases = _time_keys(all_keys)
    rows = [r for r in records if any(_is_number(r.get(k)) for k in [*phases, "time/step"])]
    steps = [r["step"] for r in rows]
    stacks = {
        k.removeprefix("time/"): [float(r[k]) if _is_number(r.get(k)) else 0.0 for r in rows]
        for k in phases
    }
    if "time/step" in all_keys:
        stacks["other"] = [
            max(0.0, float(r["time/step"]) - sum(stacks[p][i] for p in stacks if p != "other"))
            if _is_number(r.get("time/step"))
            else 0.0
            for i, r in enumerate(rows)
        ]
    smoothed = smooth > 0 and len(steps) >= 5
    if smoothed:
        stacks = {name: ema(values, smooth) for name, values in stacks.items()}
    ax.stackplot(steps, *stacks.values(), labels=list(stacks), alpha=0.85)
    top = max((sum(col) for col in zip(*stacks.values())), default=0.0)
    ax.set_ylim(0, top * 1.15 or 1.0)  # head room for the stage labels
    # Legend under the axes: inside it would hide the top of the stack and stage labels.
    ax.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(stacks), frameon=False
    )
    ax.set_title("time split (s / step" + (", smoothed)" if smoothed else ")"), fontsize=10)


def plot_metrics(
    records: list[dict[str, Any]],
    out: str | Path,
    *,
    keys: Sequence[str] | None = None,
    smooth: float = DEFAULT_SMOOTH,
    title: str | None = None,
) -> Path:
    """Draw ``records`` (as from :func:`load_metrics`) to the PNG ``out``.

    ``keys`` picks one panel per key instead of the default panels; the key ``"time"``
    means the stacked time split. ``smooth`` is the moving-average weight in [0, 1)
    (0: raw points only). Raises ValueError when nothing requested can be drawn and
    :class:`~vlreason.outputs.OutputPathError` when ``out`` cannot be written.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    numeric = sorted({k for r in records for k, v in r.items() if k != "step" and _is_number(v)})
    panels: list[tuple[str, list[str]]] = []  # (title, keys); keys [] = time split
    if keys:
        for key in keys:
            if key == TIME_PANEL and TIME_PANEL not in numeric:
                if not any(k.startswith("time/") for k in numeric):
                    raise ValueError("no time/* metrics to draw the time split from")
                panels.append(("time", []))
            elif key in numeric:
                panels.append((key, [key]))
            else:
                raise ValueError(f"no numeric metric {key!r}; available: {', '.join(numeric)}")
    else:
        for panel_title, main_key, belongs in DEFAULT_PANELS:
            matched = sorted((k for k in numeric if belongs(k)), key=lambda k: (k != main_key, k))
            if matched:
                panels.append((panel_title, matched))
        if any(k.startswith("time/") for k in numeric):
            panels.append(("time", []))
    if not panels:
        raise ValueError(f"no plottable metrics; keys found: {', '.join(numeric) or 'none'}")
    out = prepare_output(out)  # parents created and writable before anything is drawn

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    stages = _stage_starts(records)
    steps = [r["step"] for r in records]
    for ax, (panel_title, panel_keys) in zip(axes, panels):
        if panel_keys:
            _draw_lines(ax, records, panel_keys, smooth)
            ax.set_title(panel_title, fontsize=10)
        else:
            _draw_time_split(ax, records, smooth)
        _draw_stages(ax, stages)
        # one step range on every panel, so a metric that only exists in a later stage
        # (e.g. reward after a cold start) still lines up and every stage label is inside
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{title or 'training curves'}  (steps {min(steps)}-{max(steps)}, {len(records)} records)",
        fontsize=11,
    )
    fig.savefig(out, dpi=110)
    return out


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    keys: Sequence[str] | None = None,
    smooth: float = DEFAULT_SMOOTH,
) -> Path:
    """Plot ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/curves.png``)."""
    run_dir = Path(run_dir)
    base = run_dir.parent if run_dir.is_file() else run_dir
    records = load_metrics(run_dir)
    return plot_metrics(
        records, out or base / "curves.png", keys=keys, smooth=smooth, title=base.resolve().name
    )

"""Metric sinks (JSONL, TensorBoard, optional wandb), a per-phase step timer and the
progress bar.

    logger = MetricsLogger(run_dir, resume_step=start_step or None)
    timer = StepTimer()
    bar = progress_bar(total=max_steps, initial=start_step)
    for step in range(start_step + 1, max_steps + 1):
        with timer("rollout"):
            ...
        with timer("update"):
            ...
        metrics = {"loss": loss, "reward": reward, **timer.pop()}
        logger.log(step, metrics)
        bar.update(1)
        bar.set_postfix_str(format_postfix(metrics))
    logger.close()

``metrics.jsonl`` holds one JSON object per logged step, ``{"step": N, ...}``, flushed
line by line. A line that cannot be written (disk full, quota, read-only file system:
any ``OSError``) is taken back -- the file is cut to its size before the write, so it
never ends in a partial line -- and :class:`~vlreason.train.disk.MetricsWriteError`
names the file and the last step it holds; the loop then stops without a checkpoint,
so ``resume=auto`` trains the steps after the newest checkpoint again and logs each
once. Values are plain JSON: tensors and numpy scalars become Python numbers,
nested dicts are flattened with ``/`` (``{"time": {"step": 1}}`` -> ``"time/step"``),
strings (e.g. ``"stage"``) are kept, and NaN / +-inf are written as ``null`` so every
line is valid JSON (TensorBoard still receives the raw non-finite value).

TensorBoard and wandb are secondary sinks: when one fails (TensorBoard's event writer
raises the ``OSError`` of its background thread on a later call, e.g. a full disk),
that tracker is closed with one warning naming it, the step and the error, and the run
goes on with ``metrics.jsonl``, which holds every step (what TensorBoard had buffered
since its last flush is lost). Without the ``jsonl`` tracker there is no record left, so
the failure is a :class:`~vlreason.train.disk.MetricsWriteError` and the run stops.
Closing a failed tracker never raises, so it cannot hide the error that ended a run.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlreason.train.disk import MetricsWriteError

METRICS_FILE = "metrics.jsonl"
TRACKERS = ("jsonl", "tensorboard", "wandb")
POSTFIX_KEYS = ("reward", "loss", "kl", "completion_len", "time/step")


def to_scalar(value: Any, key: str = "value") -> bool | int | float | str | None:
    """A metric value as a Python scalar: one-element tensors / arrays and numpy scalars
    are unwrapped; anything with more than one element is an error naming ``key``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        numel = value.size if isinstance(value, np.ndarray) else value.numel()
        if numel != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"metric {key!r}: cannot log a {type(value).__name__}")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to ``a/b`` keys, values converted with :func:`to_scalar`."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        else:
            flat[name] = to_scalar(value, name)
    return flat


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes each step's metrics to ``run_dir/metrics.jsonl`` and the chosen trackers.

    ``trackers``: any of ``"jsonl"``, ``"tensorboard"`` (event files in ``run_dir``; skipped
    with a warning if tensorboard is not installed) and ``"wandb"`` (only when requested;
    skipped with a warning if wandb is missing or fails to start; the run id is kept in
    ``run_dir/wandb_run_id`` so a resumed run continues the same wandb run).
    ``resume_step=N`` drops lines with ``step > N`` from an existing ``metrics.jsonl`` (and
    TensorBoard events from step N+1 on), so a resumed run leaves no duplicates. Without
    it, new lines are appended. On other processes (``is_main_process=False``) every
    method is a no-op.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        trackers: Sequence[str] = ("jsonl", "tensorboard"),
        is_main_process: bool = True,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        wandb_project: str = "vlreason",
    ) -> None:
        unknown = sorted(set(trackers) - set(TRACKERS))
        if unknown:
            raise ValueError(f"unknown trackers {unknown}; expected a subset of {TRACKERS}")
        self.run_dir = Path(run_dir)
        self.enabled = is_main_process
        self._file = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in trackers:
            path = self.run_dir / METRICS_FILE
            if resume_step is not None:
                truncate_metrics(path, resume_step)
            self._file = open(path, "ab", buffering=0)  # one os.write per line, nothing held back
        if "tensorboard" in trackers:
            self._tb = self._start_tensorboard(config, resume_step)
        if "wandb" in trackers:
            self._wandb = self._start_wandb(config, wandb_project)

    def _start_tensorboard(self, config: Mapping[str, Any] | None, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn(
                "tensorboard is not installed: skipping TensorBoard logging "
                "(pip install tensorboard)",
                stacklevel=3,
            )
            return None
        purge_step = None if resume_step is None else resume_step + 1
        writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        if config is not None and resume_step is None:
            text = json.dumps(config, indent=2, default=str)
            writer.add_text("config", "    " + text.replace("\n", "\n    "))
        return writer

    def _start_wandb(self, config: Mapping[str, Any] | None, project: str):
        try:
            import wandb
        except ImportError:
            warnings.warn(
                "wandb is not installed: skipping wandb logging (pip install wandb)", stacklevel=3
            )
            return None
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        try:
            run = wandb.init(
                project=project,
                name=self.run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                config=dict(config or {}),
            )
        except Exception as err:  # offline machine, not logged in, ...
            warnings.warn(
                f"wandb failed to start ({err}); skipping wandb logging. Set "
                "WANDB_MODE=offline to log locally.",
                stacklevel=3,
            )
            return None
        id_file.write_text(run_id + "\n")
        return run

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Log one step; returns the flattened record (``{"step": step, ...}``)."""
        if not self.enabled:
            return {}
        flat = flatten_metrics(metrics)
        flat.pop("step", None)
        record = {"step": int(step), **{k: _json_safe(v) for k, v in flat.items()}}
        if self._file is not None:
            self._append((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"), record["step"])
        if self._tb is not None:
            try:
                for key, value in flat.items():
                    if isinstance(value, (int, float)):  # bools count as 0 / 1; strings skipped
                        self._tb.add_scalar(key, float(value), int(step))
            except Exception as err:  # e.g. the event writer's thread hit a full disk
                self._tracker_failed("tensorboard", err, step)
        if self._wandb is not None:
            try:
                self._wandb.log(flat, step=int(step))
            except Exception as err:
                self._tracker_failed("wandb", err, step)
        return record

    def _tracker_failed(self, name: str, err: Exception, step: int) -> None:
        """Close a failed secondary tracker with one warning; without ``metrics.jsonl``
        nothing would record the run any more, so that is a :class:`MetricsWriteError`."""
        attr = "_tb" if name == "tensorboard" else "_wandb"
        tracker, reason = getattr(self, attr), getattr(err, "strerror", None) or err
        setattr(self, attr, None)
        if self._file is None:
            self._close_tracker(name, tracker)
            raise MetricsWriteError(
                f"{name} logging failed at step {step} in {self.run_dir}: {reason}; it was the only metrics sink "
                f"(trackers without jsonl), so the run stops here: free space there, then resume=auto"
            ) from err
        warnings.warn(f"{name} logging stopped at step {step} ({reason}); {self.run_dir / METRICS_FILE} keeps "
                      f"every step", stacklevel=3)
        self._close_tracker(name, tracker)

    @staticmethod
    def _close_tracker(name: str, tracker: Any) -> None:
        """Close (TensorBoard) or finish (wandb) ``tracker``; an error is a warning."""
        try:
            if name == "tensorboard":
                tracker.close()
            else:
                tracker.finish()
        except Exception as err:
            warnings.warn(f"closing {name} failed ({getattr(err, 'strerror', None) or err}); "
                          f"what it had buffered is lost", stacklevel=3)

    def _append(self, line: bytes, step: int) -> None:
        """Write one whole line or nothing: on an ``OSError`` the file is cut back to
        its size before the write and :class:`MetricsWriteError` is raised."""
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError as err:
            try:
                os.ftruncate(fd, size)
                held = "the file was cut back to its last whole line"
            except OSError:
                held = "the file may end in a partial line, which resume drops"
            path = self.run_dir / METRICS_FILE
            raise MetricsWriteError(
                f"cannot append step {step} to {path}: {err.strerror or err}; {held}; the run stops here "
                f"without a checkpoint: free space there, then resume=auto trains again from the newest "
                f"checkpoint and logs each step once"
            ) from err

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            self._close_tracker("tensorboard", tb)
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            self._close_tracker("wandb", run)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_metrics(path: str | Path, resume_step: int) -> int:
    """Rewrite ``path`` (atomically) keeping only lines with ``step <= resume_step``;
    unreadable lines (a partial line from a crash) are dropped too. Returns the number of
    lines dropped; a missing file is left alone."""
    path = Path(path)
    if not path.exists():
        return 0
    kept: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= resume_step:
                kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:  # e.g. a full disk: the file is left as it was
            tmp.unlink(missing_ok=True)
            raise MetricsWriteError(
                f"cannot rewrite {path} for the resume from step {resume_step}: {err.strerror or err}; "
                f"the file was left as it was; free space there, then resume again"
            ) from err
    return dropped


class StepTimer:
    """Wall-clock seconds per phase of a step.

    ``with timer("rollout"): ...`` adds the block's time to phase ``rollout`` (a phase
    may be entered several times a step). :meth:`pop` returns ``{"time/rollout": s, ...,
    "time/step": s}``, where ``time/step`` is the whole time since the previous
    :meth:`pop` / :meth:`reset` (construction counts as a reset), and starts a new step.
    Phases should not nest if their sum is to be compared with ``time/step``. With
    ``synchronize=True`` CUDA is synchronised around each phase so that asynchronous
    kernels are charged to the phase that launched them.
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize and torch.cuda.is_available()
        self.reset()

    def reset(self) -> None:
        """Forget the phases so far and restart the step clock."""
        self._phases: dict[str, float] = defaultdict(float)
        self._step_start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase == "step":
            raise ValueError("'step' is reserved for the whole step time (time/step)")
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self._phases[phase] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """This step's times (``time/<phase>`` and ``time/step``); starts the next step."""
        now = time.perf_counter()
        out = {f"time/{name}": seconds for name, seconds in self._phases.items()}
        out["time/step"] = now - self._step_start
        self._phases = defaultdict(float)
        self._step_start = now
        return out


def progress_bar(total: int, initial: int = 0, disable: bool = False, desc: str = "train") -> tqdm:
    """A tqdm bar counting optimizer steps; ``initial`` is the resumed step."""
    return tqdm(
        total=total, initial=initial, disable=disable, desc=desc, unit="step", dynamic_ncols=True
    )


def format_postfix(metrics: Mapping[str, Any], keys: Sequence[str] = POSTFIX_KEYS) -> str:
    """A short ``key=value`` string of the ``keys`` present in ``metrics`` for
    ``bar.set_postfix_str``; times (``time/...``) are shown in seconds, e.g.
    ``"reward=0.625 loss=-0.0132 time/step=3.20s"``."""
    parts = []
    for key in keys:
        if key not in metrics:
            continue
        value = to_scalar(metrics[key], key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            text = str(value)
        elif key.startswith("time/"):
            text = f"{value:.2f}s"
        else:
            text = f"{value:.4g}"
        parts.append(f"{key}={text}")
    return " ".join(parts)

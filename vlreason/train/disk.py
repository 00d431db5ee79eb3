"""Disk checks of a run directory.

Before the first step, :func:`check_run_dir` proves that the run directory and its
``checkpoints/`` folder can be written and that the file system has room for one more
checkpoint (:func:`estimate_checkpoint_bytes`: the trainable parameters in their saved
dtype, the optimizer state, a plain ``model.safetensors`` copy when nothing is sharded,
and a margin). Old checkpoints are pruned only after a new one is published, so one
checkpoint's worth of free space is what a save needs.

When a write fails for lack of space anyway (another job filled the disk),
:func:`disk_error` finds the ``OSError`` (``ENOSPC``, ``EDQUOT``, ``EROFS``) behind the
failure, also inside DCP's ``CheckpointException``, and the run stops with a
:class:`RunWriteError` that names the folder or file and what is intact:

- :class:`CheckpointWriteError`: a checkpoint (``checkpoints/step-N``); the newest
  complete checkpoint is untouched;
- :class:`FinalWriteError`: the final model (``final/``); a ``final/`` already there is
  untouched and the last checkpoint is complete;
- :class:`MetricsWriteError`: a ``metrics.jsonl`` line; the file keeps only whole lines.

The loop never saves a checkpoint after a :class:`RunWriteError` (it would need the
same disk, and a checkpoint past the last metrics line would leave a gap on resume).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vlreason.outputs import DISK_ERRNOS, OutputPathError, disk_error, prepare_output

__all__ = ["DISK_ERRNOS", "CheckpointWriteError", "DiskSpaceError", "FinalWriteError", "MetricsWriteError",
           "RunWriteError", "check_run_dir", "disk_error", "estimate_checkpoint_bytes", "format_bytes", "free_bytes"]
MARGIN_BYTES = 16 * 2**20  # RNG, scheduler, trainer state, config, DCP metadata
MARGIN_FRACTION = 0.05


class DiskSpaceError(OutputPathError):
    """The run directory's file system has no room for one checkpoint."""


class RunWriteError(OutputPathError):
    """A file of a running job could not be written (disk full, quota, read-only file
    system); the message names it and what is intact. The run stops at once."""


class CheckpointWriteError(RunWriteError):
    """A checkpoint could not be written (disk full, quota, read-only file system); the
    message names the folder and the newest complete checkpoint, which is intact."""


class FinalWriteError(RunWriteError):
    """The final model (``final/``) could not be written; the message names the folder,
    which was left as it was, and the last checkpoint, which is complete."""


class MetricsWriteError(RunWriteError):
    """A ``metrics.jsonl`` line could not be written; the file was cut back to its whole
    lines, and the message names it."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged user) on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is the global one: all shards


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes one checkpoint of ``model`` (and ``optimizer``) takes, by part, and their
    ``total`` with the margin. Only trainable parameters are saved. The optimizer state
    is measured when it exists (a resumed run), otherwise estimated: two moments per
    parameter for Adam-like optimizers (``betas``), one with ``momentum``, else none."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(_bytes(p) for p in trainable)
    if optimizer is not None and any(optimizer.state.values()):
        optim = sum(_bytes(v) for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor))
    elif optimizer is not None:
        moments = 2 if "betas" in optimizer.defaults else 1 if optimizer.defaults.get("momentum") else 0
        optim = moments * params
    else:
        optim = 0
    sharded = any(hasattr(p, "to_local") for p in trainable)
    plain_copy = 0 if sharded else params  # model.safetensors next to state/
    subtotal = params + optim + plain_copy
    margin = int(subtotal * MARGIN_FRACTION) + MARGIN_BYTES
    return {"parameters": params, "optimizer": optim, "plain_copy": plain_copy, "margin": margin,
            "total": subtotal + margin}


def check_run_dir(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  *, checkpoints: str = "checkpoints") -> dict[str, int]:
    """Raise :class:`OutputPathError` when ``run_dir`` or ``run_dir/checkpoints`` cannot
    be written, :class:`DiskSpaceError` when their file system has less free space than
    one checkpoint; returns the estimate. Creates both folders."""
    prepare_output(run_dir, is_dir=True)
    folder = prepare_output(Path(run_dir) / checkpoints, is_dir=True)
    need = estimate_checkpoint_bytes(model, optimizer)
    free = free_bytes(folder)
    if free < need["total"]:
        raise DiskSpaceError(
            f"not enough free space in {folder}: one checkpoint needs about {format_bytes(need['total'])} "
            f"(parameters {format_bytes(need['parameters'])}, optimizer state {format_bytes(need['optimizer'])}, "
            f"plain copy {format_bytes(need['plain_copy'])}, margin {format_bytes(need['margin'])}) "
            f"and {format_bytes(free)} is free; free some space or choose another output_dir"
        )
    return need

"""Atomic training checkpoints and resume resolution.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-N/``::

    state/               sharded with torch.distributed.checkpoint (DCP): the trainable
                         parameters and the optimizer state, each process writing its
                         own shard (``__R_0.distcp``) plus one ``.metadata``  (``model=``)
    model.safetensors    the trainable parameters as one plain file: ``model_state=``,
                         or with ``model=`` when nothing is sharded (a copy for tools)
    optimizer.pt         optimizer.state_dict()          (``model_state=`` path only)
    scheduler.pt         scheduler.state_dict()          (when a scheduler is given)
    rng.pt, rng-R.pt     python random, numpy, torch CPU and CUDA generator states of
                         process 0 (rng.pt) and of process R > 0
    trainer_state.json   {"step": N, ...}: data position, stage, anything JSON-able
    config.yaml          the resolved run config          (when a config is given)

Everything is written into ``step-N.tmp-<id>/`` first (one name shared by every
process) and renamed into place with ``os.replace`` by process 0 after every process
has finished its shard, so a directory named ``step-N`` is always complete; a crash
(or kill -9) leaves at most a ``*.tmp-*`` directory, which resume ignores (and which
is safe to delete; the next successful save deletes it). ``checkpoints/latest`` is a
one-line text file naming the newest checkpoint, itself replaced atomically. Pruning
(``keep_last``) runs only after the new checkpoint is published and the pointer names it,
and renames each old checkpoint away before deleting its files.

A save that fails for lack of space (``ENOSPC``, a quota, a read-only file system)
raises :class:`vlreason.train.disk.CheckpointWriteError` naming the folder and the newest
complete checkpoint, which the failed save never touched.

The final model, ``RUN_DIR/final/``, is published the same way (:func:`write_final`:
written into ``final.tmp-<id>/``, renamed into place): a failed or killed write leaves
a ``final/`` that was there as it was, and a write that fails for lack of space raises
:class:`vlreason.train.disk.FinalWriteError` naming the folder.

With ``model=`` (the loop's path) every process calls :func:`save_checkpoint` and
:func:`load_checkpoint`; DCP reshards on load, so a checkpoint written by N processes
resumes on M. With only ``model_state=`` call them on one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from vlreason.train.disk import CheckpointWriteError, FinalWriteError, disk_error
from vlreason.train.distributed import all_agree, world

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
STATE_DIR = "state"  # DCP: sharded trainable parameters + optimizer state
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    trainer_state: dict[str, Any] | None = None,
    rng: bool = True,
    config: dict[str, Any] | Any | None = None,
    keep_last: int | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-{step}/`` atomically and return its path.

    ``model=`` (every process calls): its trainable parameters and ``optimizer``'s state
    go to ``state/`` through DCP, each process writing its shard. ``model_state=`` (one
    process): a plain dict written as ``model.safetensors`` (+ ``optimizer.pt``).
    ``trainer_state`` must be JSON-able; ``step`` is stored in it (a different ``"step"``
    inside it is an error). ``config`` is a dict or a dataclass. ``extra(tmp_dir)``, if
    given, may write more files (e.g. a recipe's EMA teacher) on process 0 before the
    directory is published. ``keep_last`` keeps only that many newest checkpoints, never
    deleting the one just written. Saving a step that already exists replaces it.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if (model is None) == (model_state is None):
        raise ValueError("give exactly one of model= (sharded, every process) and model_state=")
    state = dict(trainer_state or {})
    if state.setdefault("step", step) != step:
        raise ValueError(f"trainer_state['step']={state['step']} but step={step}")
    rank, size = world()
    is_main = rank == 0
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp-{_shared_token()}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(size)
    try:
        if model is not None:
            _save_sharded(tmp, model, optimizer)
        if is_main:
            _write_main_files(tmp, step, state, model_state, optimizer if model is None else None,
                              scheduler, config, extra)
        if rng:
            _torch_save(_rng_state(), tmp / (RNG_FILE if is_main else f"rng-{rank}.pt"))
        for file in tmp.iterdir():
            if file.is_file() and (is_main or file.name == f"rng-{rank}.pt"):
                _fsync_file(file)
        _barrier(size)  # every shard is on disk before the directory is published
        if is_main:
            _fsync_dir(tmp)
            _publish(tmp, final)
    except BaseException as exc:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_error(exc, run_dir, final)
        raise
    if is_main:
        try:
            _write_text_atomic(ckpt_root / LATEST_FILE, final.name + "\n")
        except OSError as exc:  # `latest` still names the previous checkpoint, which is complete
            _raise_if_disk_error(exc, run_dir, final)
            raise
        _remove_leftovers(ckpt_root)
        if keep_last is not None:
            _prune(ckpt_root, keep_last, keep=final)
    _barrier(size)
    return final


def _raise_if_disk_error(exc: BaseException, run_dir: str | Path, final: Path) -> None:
    """A disk-full / quota / read-only failure becomes a :class:`CheckpointWriteError`
    naming the folder and the checkpoint resume would now pick (which is complete)."""
    cause = disk_error(exc)
    if cause is None:
        return
    newest = latest_checkpoint(run_dir)
    where = f"; the newest complete checkpoint, {newest}, is intact (resume=auto continues from it)" \
        if newest is not None else "; there is no complete checkpoint yet"
    raise CheckpointWriteError(
        f"cannot write checkpoint {final.name} in {final.parent}: {cause.strerror or cause}{where}; "
        f"free space there, then resume"
    ) from exc


def write_final(run_dir: str | Path, write: Callable[[Path], None], *, checkpoint: Path | None = None) -> Path:
    """Publish ``run_dir/final/`` atomically: every process calls ``write(folder)`` (the
    recipe's ``save_final``: sharded weights are gathered, process 0 writes) on a fresh
    ``final.tmp-<id>/``, whose files process 0 then syncs and renames to ``final/`` (a
    ``final/`` already there is replaced only then). When a process fails, the temp
    folder is removed and every process raises; a disk-full / quota / read-only failure
    becomes a :class:`FinalWriteError` naming the folder and ``checkpoint`` (the complete
    checkpoint of the same step, from which ``resume=auto`` writes ``final/`` again).

    With several processes the others must still reach the agreement after ``write``:
    ``save_consolidated`` keeps process 0 in every remaining gather after a part fails
    to write, and raises only then."""
    rank, size = world()
    is_main = rank == 0
    final = Path(run_dir) / FINAL_DIR
    tmp = final.with_name(f"{FINAL_DIR}.tmp-{_shared_token()}")
    error: BaseException | None = None
    if is_main:
        try:
            for path in final.parent.glob(f"{FINAL_DIR}.*-*"):  # what killed writes left
                if _FINAL_LEFTOVER.match(path.name) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = exc
    if all_agree(error is None):
        try:
            write(tmp)
            if is_main:
                for file in tmp.rglob("*"):
                    if file.is_file():
                        _fsync_file(file)
                _fsync_dir(tmp)
        except Exception as exc:  # every process must reach the agreement below
            error = exc
    if all_agree(error is None):
        if is_main:
            try:
                _publish(tmp, final)
            except OSError as exc:
                error = exc
        if all_agree(error is None):
            return final
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise RuntimeError(f"another process failed while writing {final}; see its error")
    cause = disk_error(error)
    if cause is None:
        raise error
    was = "the final model already there is unchanged" if final.is_dir() else f"no {FINAL_DIR}/ was written"
    ckpt = (f"; checkpoint {checkpoint.name} of the same step is complete: free space there, then run again "
            f"with resume=auto to write {FINAL_DIR}/") if checkpoint is not None else ""
    raise FinalWriteError(f"cannot write the final model to {final}: {cause.strerror or cause} ({was}){ckpt}") from error


_FINAL_LEFTOVER = re.compile(rf"^{FINAL_DIR}\.(tmp|old)-")


def _write_main_files(tmp: Path, step: int, state: dict[str, Any], model_state, optimizer, scheduler,
                      config, extra) -> None:
    """Process 0's share: plain weights, scheduler, trainer state, config, recipe extras."""
    if model_state is not None:
        save_file(_safetensors_ready(model_state), str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "step": str(step)})
    if optimizer is not None:
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if config is not None:
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    if extra is not None:
        extra(tmp)


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as the
    ``OSError`` (ENOSPC) behind torch's error; given a path, torch's C++ writer reports
    only "unexpected pos ..." with no errno."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _sharded_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _save_sharded(tmp: Path, model: torch.nn.Module, optimizer) -> None:
    """DCP: each process writes its shard of the trainable parameters and optimizer
    state; with nothing sharded, process 0 also writes them as ``model.safetensors``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_sharded_options())
        payload = {"model": model_sd, "optim": optim_sd}
    else:
        model_sd = get_model_state_dict(model, options=_sharded_options())
        payload = {"model": model_sd}
    with _single_process_is_intended():
        dcp.save(payload, checkpoint_id=str(tmp / STATE_DIR))
    plain = not any(hasattr(t, "to_local") for t in model_sd.values())
    if plain and world()[0] == 0:
        save_file(_safetensors_ready(model_sd), str(tmp / MODEL_FILE), metadata={"format": "pt"})


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when it runs without a process group; one process is a normal run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _shared_token() -> str:
    """A temp-directory suffix every process agrees on (process 0's pid)."""
    token = [str(os.getpid())]
    if world()[1] > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _barrier(size: int) -> None:
    if size > 1:
        dist.barrier()


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; tensors sharing storage (tied weights) are
    cloned so safetensors accepts them (each name gets its own copy)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is {type(tensor).__name__}, not a Tensor")
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # shares storage with an earlier entry (tied weights, fused views)
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _rng_state() -> dict[str, Any]:
    """Generator states as tensors / plain Python values, loadable with weights_only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(config: Any) -> Any:
    """A dataclass or dict turned into YAML-safe builtins (paths and tuples become
    strings and lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(ckpt_root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, never ``keep`` (the
    one just published; nothing is deleted unless it is complete). Each is renamed to
    ``step-N.deleting-<pid>`` before its files go, so a kill in the middle of a deletion
    never leaves a half-deleted directory named ``step-N``."""
    if not is_complete(keep):
        return
    ckpts = list_checkpoints(ckpt_root.parent)
    for path in ckpts[: max(0, len(ckpts) - keep_last)]:
        if path != keep:
            doomed = path.with_name(f"{path.name}.deleting-{os.getpid()}")
            try:
                os.replace(path, doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)


_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old|deleting)-")


def _remove_leftovers(ckpt_root: Path) -> None:
    """Delete what killed saves and prunes left (``step-N.tmp-*``, ``.old-*``,
    ``.deleting-*``): never complete checkpoints, and a run directory has one writer."""
    for path in ckpt_root.iterdir():
        if _LEFTOVER.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint directory: returns ``(model_state, trainer_state)``.

    With ``model=`` and a sharded ``state/`` (every process calls): the trainable
    parameters and the optimizer state are loaded in place through DCP, resharded to
    this run's processes, and ``model_state`` is empty. Otherwise ``model_state`` holds
    the plain ``model.safetensors`` tensors on CPU (load them with
    ``model.load_state_dict(model_state, strict=False)``) and the optimizer's state
    comes from ``optimizer.pt``. The scheduler is loaded in place when given; the RNG
    states are restored when ``restore_rng`` (process R > 0 takes its own when saved).
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (expected a step-N directory with "
            f"{STATE_DIR}/ or {MODEL_FILE}, and {TRAINER_STATE_FILE})"
        )
    trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
    model_state: dict[str, torch.Tensor] = {}
    if model is not None and (path / STATE_DIR / ".metadata").is_file():
        _load_sharded(path, model, optimizer)
    else:
        model_state = load_file(str(path / MODEL_FILE), device="cpu")
        _load_into(optimizer, path / OPTIMIZER_FILE)
    _load_into(scheduler, path / SCHEDULER_FILE)
    if restore_rng:
        own = path / f"rng-{world()[0]}.pt"
        file = own if world()[0] > 0 and own.is_file() else path / RNG_FILE
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing (saved with rng=False?)")
        _set_rng_state(torch.load(file, map_location="cpu", weights_only=True))
    return model_state, trainer_state


def _load_into(obj, file: Path) -> None:
    if obj is None:
        return
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing; this checkpoint has no {file.name}")
    obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))


def _load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """DCP load through :func:`vlreason.train.safe_dcp.safe_load`: ``.metadata`` and
    non-tensor entries are unpickled with allow-lists, never with plain pickle."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from vlreason.train.safe_dcp import safe_load

    options = _sharded_options()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        payload = {"model": model_sd, "optim": optim_sd}
    else:
        payload = {"model": get_model_state_dict(model, options=options)}
    with _single_process_is_intended():
        safe_load(payload, path / STATE_DIR)  # missing keys are an error here
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                       options=options)
    else:
        set_model_state_dict(model, payload["model"], options=options)


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for device, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, device)


# ---------------------------------------------------------------------------- resume


def checkpoint_step(path: str | Path) -> int | None:
    """N for a directory named ``step-N``, else None (temp dirs give None)."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    """A published checkpoint: named ``step-N`` and holding the model (sharded state or
    plain file) and the trainer state."""
    path = Path(path)
    return (
        checkpoint_step(path) is not None
        and ((path / STATE_DIR / ".metadata").is_file() or (path / MODEL_FILE).is_file())
        and (path / TRAINER_STATE_FILE).is_file()
    )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest (lowest step) first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``checkpoints/latest`` if it is complete, otherwise the
    complete checkpoint with the highest step; None when there is none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name and is_complete(root / name):
            return root / name
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(run_dir: str | Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from.

    ``resume`` is None (or ``""``): start fresh. ``"auto"``: the latest complete
    checkpoint in ``run_dir``, or None when there is none yet. A checkpoint directory:
    that one. A run directory (or its ``checkpoints/`` folder): its latest checkpoint.
    A given path without a complete checkpoint raises ``FileNotFoundError``.
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if is_complete(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"resume: {path} does not exist")
    run = path.parent if path.name == CHECKPOINTS_DIR else path
    found = latest_checkpoint(run)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"resume: {path} holds no complete checkpoint (expected a step-N directory with "
        f"{STATE_DIR}/ or {MODEL_FILE}, and {TRAINER_STATE_FILE}, or a run directory with "
        f"{CHECKPOINTS_DIR}/step-N/); incomplete *.tmp-* directories are ignored"
    )

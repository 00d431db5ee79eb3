"""Check an output path before the work that fills it: create missing parent folders and
prove the folder is writable, so that no verb computes for minutes and then dies on a
bad ``--out``; and recognise a write that failed for lack of space (:func:`disk_error`)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # full, over quota, read-only
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class OutputPathError(OSError):
    """An output path cannot be written; the message names the path and the reason."""


def prepare_output(path: str | os.PathLike, *, is_dir: bool = False) -> Path:
    """Create ``path`` (``is_dir``) or its parent folder, and check that a file can be
    written there. Returns the path; raises :class:`OutputPathError` otherwise."""
    path = Path(path)
    folder = path if is_dir else path.parent
    if path.exists() and is_dir != path.is_dir():
        kind = "a folder" if path.is_dir() else "a file"
        raise OutputPathError(f"output path {path} is {kind}; expected {'a folder' if is_dir else 'a file'}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vlreason-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputPathError(f"cannot write to {folder}: {reason}") from None
    return path


def disk_error(exc: BaseException | None) -> OSError | None:
    """The disk-full / quota / read-only ``OSError`` behind ``exc`` (its causes and
    contexts, and the per-process failures of DCP's ``CheckpointException``), or None.
    An error of a Rust writer (safetensors: ``SafetensorError("... No space left on
    device (os error 28)")``) carries no errno; its ``(os error N)`` is read instead."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        rust = _RUST_OS_ERROR.search(str(err))
        if rust and int(rust.group(1)) in DISK_ERRNOS:
            code = int(rust.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [err.__cause__, err.__context__]
    return None

"""Check an output path before the work that fills it: create missing parent folders and
prove the folder is writable, so that no verb computes for minutes and then dies on a
bad ``--out``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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

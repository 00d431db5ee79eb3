"""Load a torch.distributed.checkpoint (DCP) folder without running code from it.

torch's own reader unpickles ``.metadata`` with a plain ``pickle.load`` and its
``DefaultLoadPlanner.load_bytes`` reads non-tensor entries (the optimizer's
``param_groups`` values) with ``torch.load(weights_only=False)``: a tampered
checkpoint would run code on resume. :func:`safe_load` reads the same files with

* :class:`SafeFileSystemReader`: ``.metadata`` (and a rank-local ``__R.metadata``) is
  unpickled by :class:`_MetadataUnpickler`, whose ``find_class`` hands out only the
  objects in :data:`ALLOWED_GLOBALS` -- DCP's metadata dataclasses, ``torch.Size``,
  torch dtypes, the layout lookup, ``pathlib.PosixPath`` -- and refuses anything else;
* :class:`SafeLoadPlanner`: byte entries are read with ``torch.load(weights_only=True)``.
  (Tensor entries are already read with ``weights_only=True`` by torch's reader.)

A refusal raises :class:`UnsafeCheckpointError` (a ``pickle.UnpicklingError``) naming
the object and the checkpoint file, before the object is built.

The allow-list is what torch 2.14.1 writes for this project's checkpoints, recorded
with an unpickler that logged every ``find_class`` call on ``.metadata`` files saved
by :func:`vlreason.train.checkpoint.save_checkpoint` on one process (float32, with and
without an optimizer) and by a 2-process FSDP2 run (bfloat16 shards).
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.serialization import _get_layout

_REFUSAL = "a checkpoint must hold only tensors and plain data"

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        ("torch.distributed.checkpoint.metadata", cls.__name__): cls
        for cls in (
            dcp_metadata.Metadata,
            dcp_metadata.MetadataIndex,
            dcp_metadata.StorageMeta,
            dcp_metadata.TensorStorageMetadata,
            dcp_metadata.ChunkStorageMetadata,
            dcp_metadata.BytesStorageMetadata,
            dcp_metadata.TensorProperties,
            dcp_metadata._MEM_FORMAT_ENCODING,
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    # torch.layout pickles as _get_layout("torch.strided"): a lookup in a table of layouts
    ("torch.serialization", "_get_layout"): _get_layout,
    # StorageMeta.checkpoint_id: the folder the checkpoint was saved to
    ("pathlib", "PosixPath"): pathlib.PosixPath,
}
"""(module, name) -> object; torch dtypes (``torch.float32``, ...) are allowed too."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to unpickle something other than plain data."""


def _allowed(module: str, name: str) -> Any | None:
    if (module, name) in ALLOWED_GLOBALS:
        return ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; every global outside the allow-list is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed(module, name)
        if found is None:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {module}.{name} from {self.source}: {_REFUSAL}"
            )
        return found


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``read_metadata`` unpickles with the allow-list."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.refusal: UnsafeCheckpointError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream, str(path)).load()
                if not isinstance(metadata, dcp_metadata.Metadata):
                    raise UnsafeCheckpointError(
                        f"{path} holds a {type(metadata).__name__}, not DCP Metadata"
                    )
            except UnsafeCheckpointError as exc:
                self.refusal = exc
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose ``load_bytes`` reads with ``weights_only=True``."""

    def __init__(self, reader: SafeFileSystemReader, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reader = reader
        self.refusal: UnsafeCheckpointError | None = None

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            self.refusal = self._refuse(read_item, exc)
            raise self.refusal from exc
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded

    def _refuse(self, read_item: ReadItem, exc: Exception) -> UnsafeCheckpointError:
        info = self.reader.storage_data.get(read_item.storage_index)
        file = Path(str(self.reader.path)) / info.relative_path if info else self.reader.path
        match = re.search(r"GLOBAL (\S+)", str(exc))
        what = match.group(1) if match else "a non-tensor object"
        return UnsafeCheckpointError(
            f"refusing to unpickle {what} from {file} (entry {read_item.dest_index.fqn}): {_REFUSAL}"
        )


def safe_load(state_dict: dict[str, Any], checkpoint_dir: str | os.PathLike) -> None:
    """``dcp.load(state_dict, checkpoint_id=checkpoint_dir)``, in place, with the safe
    reader and planner; a refused object raises :class:`UnsafeCheckpointError` (not
    DCP's ``CheckpointException`` wrapping it)."""
    reader = SafeFileSystemReader(checkpoint_dir)
    planner = SafeLoadPlanner(reader)
    try:
        dcp.load(state_dict, storage_reader=reader, planner=planner)
    except CheckpointException as exc:
        refusal = reader.refusal or planner.refusal
        if refusal is not None:
            raise refusal from exc
        raise

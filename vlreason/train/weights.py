"""Copying saved tensors into a model: one helper for every place that does it (a plain
checkpoint's weights on resume, Vision-R1's cold-start snapshot as the KL reference,
Vision-OPD's EMA teacher)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


@torch.no_grad()
def copy_tensors_(targets: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  weights: Mapping[str, torch.Tensor], *, source: str | Path,
                  required: Iterable[str] = ()) -> int:
    """Copy ``weights[name]`` into every named target tensor that has a saved value, in
    the target's device and dtype; return how many were copied. A name of ``required``
    that ``weights`` lacks raises ``ValueError`` naming ``source`` (nothing is copied
    then), as does a saved tensor whose shape differs from its target's."""
    targets = dict(targets.items() if isinstance(targets, Mapping) else targets)
    missing = sorted(set(required) - set(weights))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) it must hold, e.g. {missing[:3]}")
    pairs = [(name, target, weights[name]) for name, target in targets.items() if name in weights]
    for name, target, value in pairs:
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, "
                             f"the model's has {tuple(target.shape)}")
    for _, target, value in pairs:
        target.copy_(value.to(target.device, target.dtype))
    return len(pairs)


def load_tensors_into_(targets: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       path: str | Path, *, required: Iterable[str] = ()) -> int:
    """:func:`copy_tensors_` from a safetensors file (``FileNotFoundError`` naming it when absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return copy_tensors_(targets, load_file(str(path), device="cpu"), source=path, required=required)

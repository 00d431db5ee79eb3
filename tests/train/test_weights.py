"""Copying saved tensors into a model (one helper for resume, reference and teacher)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vlreason.train.weights import copy_tensors_, load_tensors_into_


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)).to(torch.bfloat16)


def test_copies_in_the_targets_dtype_and_counts():
    m = model()
    saved = {"0.weight": torch.full((2, 3), 0.5), "1.bias": torch.full((1,), 2.0)}
    assert copy_tensors_(m.named_parameters(), saved, source="x") == 2
    assert m[0].weight.dtype == torch.bfloat16 and torch.equal(m[0].weight.float(), saved["0.weight"])
    assert m[1].bias.item() == 2.0


def test_missing_required_or_wrong_shape_names_the_source_and_copies_nothing(tmp_path):
    m = model()
    before = m[0].weight.clone()
    with pytest.raises(ValueError, match="ckpt-7 lacks 1 tensor.*1.weight"):
        copy_tensors_(m.named_parameters(), {"0.weight": torch.zeros(2, 3)}, source="ckpt-7",
                      required=["0.weight", "1.weight"])
    with pytest.raises(ValueError, match="'0.bias' has shape \\(5,\\)"):
        copy_tensors_(m.named_parameters(), {"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(5)}, source="f")
    assert torch.equal(m[0].weight, before)


def test_from_a_file(tmp_path):
    m = model()
    path = tmp_path / "w.safetensors"
    save_file({"1.weight": torch.ones(1, 2)}, str(path))
    assert load_tensors_into_(m.named_parameters(), path, required=["1.weight"]) == 1
    assert torch.equal(m[1].weight.float(), torch.ones(1, 2))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tensors_into_(m.named_parameters(), tmp_path / "nope.safetensors")

"""The collectives helper (vlreason/train/distributed.py) reduces on the process group's
device: the current CUDA device under NCCL, the CPU under gloo. The process group is
mocked (no GPU here): ``dist.all_reduce`` records where its tensor was placed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vlreason.train import distributed as D


@pytest.fixture
def fake_group(monkeypatch):
    """Two processes on a mocked backend; every all_reduce doubles (the other process
    holds the same values) and records the device its tensor was moved to."""
    state = {"backend": "nccl", "placed": [], "reduced": 0}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: state["backend"])
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, torch.device) and device.type == "cuda":
            state["placed"].append(device)
            return self  # stands for the CUDA copy: no GPU on this machine
        return real_to(self, *args, **kwargs)

    def fake_all_reduce(tensor, op=None, group=None):
        state["reduced"] += 1
        state.setdefault("ops", []).append(op)
        if op == dist.ReduceOp.SUM:
            tensor.mul_(2)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    return state


def test_collective_device_follows_the_backend(fake_group):
    assert D.collective_device() == torch.device("cuda", 3)
    fake_group["backend"] = "cpu:gloo,cuda:nccl"
    assert D.collective_device() == torch.device("cuda", 3)
    fake_group["backend"] = "gloo"
    assert D.collective_device() == torch.device("cpu")


def test_every_helper_reduces_on_the_nccl_device(fake_group):
    assert D.global_sum(torch.tensor([1.5, 2.0])) == 7.0  # (1.5 + 2) on each of 2 processes
    assert D.global_max(4.0) == 4.0
    assert D.loss_normaliser(10) == 10.0  # 20 tokens in all / 2 processes
    assert D.all_agree(True) is True
    out = D.reduce_metrics({"loss": 1.0, "reward": 0.5, "name": "x", "flag": True}, "mean")
    assert out == {"loss": 1.0, "reward": 0.5, "name": "x", "flag": True}
    assert D.reduce_metrics({"tokens": 3}, "sum")["tokens"] == 6
    # every one of the 6 collectives ran on the tensor moved to cuda:3 first
    assert fake_group["reduced"] == 6
    assert fake_group["placed"] == [torch.device("cuda", 3)] * 6


def test_gloo_keeps_tensors_on_the_cpu(fake_group):
    fake_group["backend"] = "gloo"
    assert D.global_sum(3) == 6.0
    assert fake_group["placed"] == [] and fake_group["reduced"] == 1


def test_one_process_needs_no_group():
    assert D.world() == (0, 1)
    assert D.global_sum(torch.tensor(2.5)) == 2.5
    assert D.all_agree(False) is False
    assert D.reduce_metrics({"a": 1.0}) == {"a": 1.0}
    assert D.loss_normaliser(12) == 12.0


def test_hash_seed_depends_on_every_input():
    base = D.hash_seed(0, 1, 2)
    assert len({base, D.hash_seed(1, 1, 2), D.hash_seed(0, 2, 2), D.hash_seed(0, 1, 3)}) == 4
    assert D.hash_seed(0, 1, 2) == base

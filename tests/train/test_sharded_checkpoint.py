"""Sharded (DCP) checkpoints on two processes: every process writes its own shard, and
a process killed with SIGKILL in the middle of a save leaves the previous checkpoint
the one resume picks, loadable (here on one process, resharded) with its exact weights."""

from __future__ import annotations

import datetime
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlreason.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from vlreason.train.schedule import build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def _step(model, optimizer) -> None:
    model(torch.ones(3, 8)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _worker(rank: int, port: int, run: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    model = _model()
    for layer in model:
        fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    optimizer = build_optimizer(model.named_parameters(), lr=0.1, weight_decay=0.0)
    _step(model, optimizer)
    save_checkpoint(run, 1, model=model, optimizer=optimizer, rng=False)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(full, os.path.join(run, "weights-step-1.pt"))
    _step(model, optimizer)

    def die(tmp_dir):  # every shard of step 2 is written; the directory is not yet published
        assert len(list((tmp_dir / "state").glob("*.distcp"))) == 2
        os.kill(os.getpid(), signal.SIGKILL)

    save_checkpoint(run, 2, model=model, optimizer=optimizer, rng=False, extra=die)


def test_kill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path):
    ctx = mp.start_processes(_worker, args=(29571, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    with pytest.raises(mp.ProcessExitedException):
        while not ctx.join(timeout=120):
            pass
    root = tmp_path / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith("step-2")]
    assert leftovers and all(".tmp-" in name for name in leftovers)  # half-published: never step-2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    path = resolve_resume(tmp_path, "auto")
    assert path == root / "step-1"
    assert sorted(p.name for p in (path / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # the 2-process checkpoint loads on one process (DCP reshards) with the step-1 weights
    model = _model()
    optimizer = build_optimizer(model.named_parameters(), lr=0.1, weight_decay=0.0)
    load_checkpoint(path, model=model, optimizer=optimizer, restore_rng=False)
    expected = torch.load(tmp_path / "weights-step-1.pt")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], msg=name)
    assert all(len(s) for s in optimizer.state.values())  # AdamW moments restored

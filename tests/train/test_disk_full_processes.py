"""A full disk with several processes: every process stops with a clear error, none
waits in a collective for one that already gave up.

- ``final/``: an FSDP2-sharded tiny Qwen-VL is written by ``save_consolidated`` in
  several parts; process 0 fails on its second part (ENOSPC). Process 0 still joins
  every remaining gather, so both processes reach ``write_final``'s agreement: process 0
  raises ``FinalWriteError``, process 1 a ``RuntimeError`` pointing at it, and no temp
  folder is left. (Before, process 0 left the gathers early and process 1 waited in the
  next one until the process group's timeout.)
- ``metrics.jsonl``: process 0 cannot append step 2's line. All processes agree on it
  after every line, so process 1 stops too (``MetricsWriteError``) instead of waiting in
  step 3's gradient all-reduce; no checkpoint past step 1 is written.

Each process writes what it raised, and how long the failing call took, to a JSON file;
the process group's timeout (60 s) is what a wait in a collective would run into."""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _run_and_report(out: str, rank: int, call) -> None:
    """``call()``; what it raised and how long it took, to ``out/rank<N>.json``."""
    started, error = time.monotonic(), None
    try:
        call()
    except Exception as err:
        error = err
    record = {"error": type(error).__name__ if error else None, "message": str(error) if error else "",
              "took_s": time.monotonic() - started}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _final_worker(rank: int, port: int, model_path: str, out: str) -> None:
    import safetensors.torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForImageTextToText

    from vlreason.models.loading import load_processor, save_consolidated
    from vlreason.train.checkpoint import write_final

    _init(rank, port)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    processor = load_processor(model_path)
    if rank == 0:
        real, calls = safetensors.torch.save_file, [0]

        def save_file(*args, **kwargs):  # the second part meets a full disk
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        safetensors.torch.save_file = save_file
    _run_and_report(out, rank, lambda: write_final(
        out, lambda folder: save_consolidated(model, processor, folder, torch.float32, max_shard_bytes=200_000)))


def test_disk_full_writing_final_on_process_0_stops_both_processes(tmp_path, tiny_path):
    mp.start_processes(_final_worker, args=(_port(), str(tiny_path), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["error"] == "FinalWriteError", r0
    assert r0["message"].startswith(f"cannot write the final model to {tmp_path / 'final'}: No space left on device")
    assert "no final/ was written" in r0["message"]
    assert r1["error"] == "RuntimeError" and "another process failed" in r1["message"], r1
    assert max(r0["took_s"], r1["took_s"]) < TIMEOUT_S / 2, (r0, r1)  # not a collective's timeout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json"]  # no final/, no temp folder


def _metrics_worker(rank: int, port: int, out: str) -> None:
    from toy_recipe import ToyLinear

    from vlreason.train.disk import MetricsWriteError
    from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
    from vlreason.train.metrics import MetricsLogger

    _init(rank, port)
    if rank == 0:
        real = MetricsLogger._append

        def append(self, line, step):  # step 2's line meets a full disk
            if step == 2:
                raise MetricsWriteError(f"cannot append step {step} to {self.run_dir / 'metrics.jsonl'}: "
                                        "No space left on device")
            return real(self, line, step)

        MetricsLogger._append = append
    cfg = LoopConfig(output_dir=str(Path(out, "run")), trackers=["jsonl"], progress=False, max_steps=4,
                     save_steps=1, optim=OptimConfig(lr=0.01, max_grad_norm=0.0))
    cfg.parallel.strategy = "ddp"
    recipe = ToyLinear()
    _run_and_report(out, rank, lambda: Trainer(cfg, recipe, save_final=recipe.save_final).fit())


def test_disk_full_appending_metrics_on_process_0_stops_both_processes(tmp_path):
    mp.start_processes(_metrics_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["error"] == "MetricsWriteError" and "step 2" in r0["message"], r0
    assert r1["error"] == "MetricsWriteError", r1
    assert r1["message"].startswith("process 0 could not append step 2 to"), r1
    assert max(r0["took_s"], r1["took_s"]) < TIMEOUT_S / 2, (r0, r1)  # not a collective's timeout
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-1"]

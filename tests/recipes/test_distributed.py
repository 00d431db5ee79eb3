"""Two CPU processes and one process with the same global batch give the same GRPO
loss and gradients (the loop all-reduces gradients and normalises by the global token
count), and `accelerate launch --num_processes 2` runs the recipe."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlreason.data.stream import shard


def _setup():
    from vlreason.data.schema import load_canonical
    from vlreason.data.stream import RowStream
    from vlreason.models.loading import ModelConfig
    from vlreason.models.policy import Policy, RolloutConfig
    from vlreason.paths import demo_data
    from vlreason.train.grpo import GRPOConfig, GRPOPhases

    torch.manual_seed(0)
    rollout = RolloutConfig(num_generations=4, max_new_tokens=8)
    policy = Policy.load(ModelConfig(), rollout)
    stream = RowStream(load_canonical(demo_data("train")), seed=0)
    phases = GRPOPhases(GRPOConfig(reward="format"), policy, stream, seed=0)
    return policy, phases


def _global_batch(policy, rows):
    """The same sampled batch on every process, with synthetic rewards so that the
    advantages are non-zero whatever the random tiny model writes."""
    from vlreason.algorithms import grpo_advantages

    batch = policy.sample(policy.prompts(rows), seed=123)
    g = torch.Generator().manual_seed(7)
    batch.rewards_N = torch.rand(batch.num_completions, generator=g)
    batch.advantages_N = grpo_advantages(batch.rewards_N, 4)
    return batch


def _loss_and_grads(policy, phases, batch, world_size):
    from vlreason.train.grpo import global_sum
    from vlreason.train.loop import all_reduce_mean_grads

    phases.normaliser = global_sum(phases._count(batch))
    total = torch.zeros(())
    for micro in [batch.select([i]) for i in range(batch.num_completions)]:
        loss, _ = phases.loss(micro)
        loss.backward()
        total += loss.detach()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    all_reduce_mean_grads(params)
    if world_size > 1:  # each process's loss is scaled by world_size; their mean is the loss
        dist.all_reduce(total)
        total /= world_size
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return total, grads


def _worker(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        policy, phases = _setup()
        rows = [phases.stream.dataset[i] for i in range(4)]
        full = _global_batch(policy, rows)
        groups = shard(list(range(4)), rank, world_size)
        local = full.select([i for i in range(full.num_completions) if int(full.group_ids_N[i]) in groups])
        loss, grads = _loss_and_grads(policy, phases, local, world_size)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    policy, phases = _setup()
    rows = [phases.stream.dataset[i] for i in range(4)]
    batch = _global_batch(policy, rows)
    loss1, grads1 = _loss_and_grads(policy, phases, batch, 1)

    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, 29533, str(out)), nprocs=2, join=True, start_method="spawn")
    two = torch.load(out)
    # loss: sum over processes of local contributions = the 1-process loss
    torch.testing.assert_close(two["loss"], loss1, atol=1e-5, rtol=1e-4)
    assert grads1.keys() == two["grads"].keys()
    for name in grads1:
        torch.testing.assert_close(two["grads"][name], grads1[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    run = tmp_path / "run"
    cmd = ["accelerate", "launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlreason", "train", "grpo",
           f"output_dir={run}", "max_steps=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
           "algorithm.prompts_per_step=2", "algorithm.micro_batch_prompts=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written by the main process only
    assert (run / "final" / "model.safetensors").is_file()

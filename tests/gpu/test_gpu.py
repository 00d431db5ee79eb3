"""GPU tier (marker ``gpu``; skipped without CUDA). Run by ``bash benchmarks/gpu_check.sh``.

* collectives: under an NCCL process group vlreason's helpers reduce CUDA tensors;
* bf16 mixed precision: the trained model's fp32 master weights, updated under bf16
  autocast at lr 1e-6, change in most entries (a bf16 copy of the same weights would
  round almost every such update away);
* the GRPO recipe through the command line in a one-process NCCL group, for each
  ``parallel.strategy`` the recipe's config offers: finite loss, metrics, ``final/``,
  and at lr 1e-6 with ``model.dtype=bfloat16`` most weights moved.

No network: the model is the bundled warm tiny checkpoint (assets/warm-tiny), the data
the bundled demo split.
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

STRATEGIES = ("none", "ddp", "fsdp2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_group():
    """A one-process NCCL process group on cuda:0 for the test's duration."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this pytest process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collectives_run_on_cuda_under_nccl(nccl_group, monkeypatch):
    from vlreason.train import distributed as d

    assert dist.get_backend() == "nccl"
    assert d.collective_device() == torch.device("cuda", 0)
    seen: list[torch.device] = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        seen.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    out = d.all_reduce(torch.tensor([1.0, 2.0]), "sum")  # a CPU tensor in, moved for NCCL
    assert out.device.type == "cpu" and out.tolist() == [1.0, 2.0]
    monkeypatch.setattr(d, "world", lambda: (0, 2))  # make the helpers take the collective path
    assert d.global_sum(torch.tensor([1.5, 2.0])) == pytest.approx(3.5)
    assert d.global_max(4.0) == pytest.approx(4.0)
    assert d.all_agree(True)
    reduced = d.reduce_metrics({"a": 1.0, "b": 3.0, "name": "x"}, "sum")
    assert (reduced["a"], reduced["b"], reduced["name"]) == (1.0, 3.0, "x")
    assert seen and all(dev.type == "cuda" for dev in seen), seen


def test_bf16_autocast_moves_fp32_master_weights_at_lr_1e_6():
    """model.dtype=bfloat16 names the compute dtype: the trained model is loaded in fp32,
    forward/backward run in bf16 under autocast, and AdamW at lr 1e-6 changes most master
    entries; the same update applied to bf16-stored weights would be rounded away."""
    from vlreason.models.loading import ModelConfig, load_model
    from vlreason.paths import warm_model
    from vlreason.train.schedule import build_optimizer

    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    model, _ = load_model(ModelConfig(name_or_path=str(warm_model()), dtype="bfloat16"), device=device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values()), "trained weights must be fp32 masters"
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = build_optimizer(model.named_parameters(), lr=1e-6, weight_decay=0.0)
    ids = torch.randint(0, 1000, (4, 48), device=device)
    dtypes = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    hook.remove()
    loss.backward()
    optimizer.step()
    assert dtypes == [torch.bfloat16] and math.isfinite(float(loss))
    # text-only batch: the vision tower gets no gradient; judge the language model
    names = [n for n in trainable if trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0]
    assert names, "no gradient reached the weights"
    changed = sum(int((trainable[n].detach() != start[n]).sum()) for n in names)
    total = sum(start[n].numel() for n in names)
    bf16_visible = sum(int((trainable[n].detach().bfloat16() != start[n].bfloat16()).sum()) for n in names)
    print(f"lr 1e-6, one step: fp32 masters changed {changed / total:.1%} of {total} entries; "
          f"visible in bf16: {bf16_visible / total:.2%}")
    assert changed / total > 0.5
    assert bf16_visible < 0.2 * changed


@pytest.fixture(scope="module", params=STRATEGIES)
def grpo_run(request, tmp_path_factory, grpo_in_process_group):
    """`vlreason train grpo` for 2 steps at lr 1e-6, bf16 compute, in a one-process NCCL
    group (the torchrun environment of one process), for one parallel.strategy."""
    run = tmp_path_factory.mktemp(f"grpo_{request.param}") / "run"
    return (request.param, run, *grpo_in_process_group(run, request.param, "nccl"))


def test_grpo_recipe_step_in_a_one_process_nccl_group(grpo_run):
    strategy, run, proc, _ = grpo_run
    assert proc.returncode == 0, f"strategy {strategy}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "final" / "config.json").is_file()


def test_grpo_at_lr_1e_6_in_bf16_moves_the_weights(grpo_run):
    """final/ after 2 steps at lr 1e-6 against the starting weights."""
    strategy, run, proc, moved_fraction = grpo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    fraction = moved_fraction()
    print(f"strategy {strategy}: {fraction:.1%} of the language model's entries changed")
    assert fraction > 0.3, f"only {fraction:.2%} of the entries moved at lr 1e-6"

"""The memory plan (vlreason.train.memory): hand-worked values for a 1,000-parameter
module under ddp and fsdp2, the over-budget warning, and the plan against the bytes of
every tensor after one real AdamW step of the tiny Qwen-VL model."""

from __future__ import annotations

import logging

import pytest
import torch

from vlreason.train.memory import (
    ParamCounts,
    check_plan,
    device_memory,
    format_plan,
    log_memory_plan,
    plan_memory,
)


def _thousand() -> torch.nn.Module:
    return torch.nn.Linear(99, 10)  # 990 weights + 10 biases = 1,000 fp32 parameters, 2 tensors


def test_counts_of_a_small_module():
    counts = ParamCounts.from_model(_thousand())
    assert (counts.trainable, counts.frozen, counts.trainable_tensors) == (1000, 0, 2)
    assert counts.bytes_of("trainable") == 4000 and counts.root == 1000 and counts.largest_unit == 0


def test_hand_worked_ddp_vs_fsdp2_world_2():
    counts = ParamCounts.from_model(_thousand())
    ddp = plan_memory(counts, strategy="ddp", world_size=2, compute_dtype=torch.float32)
    # ddp: everything replicated. weights 4 x 1000; gradients 4 x 1000; DDP's bucket copy
    # of the gradients 4 x 1000; AdamW 2 states x 4 x 1000 + 2 step counters x 4 = 8008
    assert (ddp.weights, ddp.gradients, ddp.ddp_buckets, ddp.optimizer) == (4000, 4000, 4000, 8008)
    assert ddp.compute_copy == 0  # fp32 compute on fp32 weights: no cast
    assert ddp.total == 4000 + 4000 + 4000 + 8008 == 20008

    fsdp = plan_memory(counts, strategy="fsdp2", world_size=2, compute_dtype=torch.float32)
    # fsdp2 halves weights, gradients and optimizer state; no buckets
    assert (fsdp.weights, fsdp.gradients, fsdp.ddp_buckets, fsdp.optimizer) == (2000, 2000, 0, 4004)
    assert fsdp.gradients == ddp.gradients // 2 and fsdp.optimizer == ddp.optimizer // 2
    # ... but gathers the unsharded module (all root: no units) for compute: 4 x 1000
    assert fsdp.compute_rollout == fsdp.compute_update == 4000
    assert fsdp.total == 2000 + 2000 + 4004 + 4000 == 12004
    assert fsdp.rollout_total == 2000 + 4004 + 4000  # no gradients during the rollout


def test_bf16_compute_reference_lora_and_offload():
    counts = ParamCounts.from_model(_thousand())
    # autocast caches one bf16 cast (2 bytes) of each fp32 trainable weight
    bf16 = plan_memory(counts, strategy="none", compute_dtype=torch.bfloat16)
    assert bf16.compute_copy == 2000 and bf16.total == 4000 + 2000 + 4000 + 8008
    # a bf16 reference copy of 1,000 parameters: 2,000 bytes, halved under fsdp2 world 2
    assert plan_memory(counts, compute_dtype="bfloat16", reference_params=1000).reference == 2000
    assert plan_memory(counts, strategy="fsdp2", world_size=2, reference_params=1000).reference == 1000
    # fsdp2 units: rollout gathers all (2 x 1000 bf16), update only root + 2 units
    units = ParamCounts(trainable=1000, trainable_tensors=2, largest_unit=100, root=200)
    p = plan_memory(units, strategy="fsdp2", world_size=4, compute_dtype=torch.bfloat16)
    assert (p.compute_rollout, p.compute_update) == (2000, 2 * (200 + 2 * 100))
    assert plan_memory(units, strategy="fsdp2", world_size=4, reshard_after_forward=False).compute_update == 2000
    # LoRA-style: 10 trainable fp32, 990 frozen fp32 (the trained model is loaded fp32)
    lora = plan_memory(ParamCounts(trainable=10, frozen=990, trainable_tensors=1), strategy="none")
    assert (lora.weights, lora.gradients, lora.optimizer) == (4000, 40, 84)
    # cpu offload: weights, gradients, optimizer move to the host
    off = plan_memory(counts, strategy="fsdp2", world_size=2, compute_dtype=torch.bfloat16, cpu_offload=True)
    assert off.host_total == 2000 + 2000 + 4004 and off.total == 2000  # the gathered bf16 copy
    with pytest.raises(ValueError, match="fsdp2"):
        plan_memory(counts, strategy="ddp", world_size=2, cpu_offload=True)
    assert plan_memory(counts, strategy="auto", world_size=2).strategy == "ddp"
    assert plan_memory(counts, strategy="auto", world_size=1).strategy == "none"
    with pytest.raises(ValueError, match="strategy"):
        plan_memory(counts, strategy="zero3")


def test_warns_when_over_budget(caplog):
    plan = plan_memory(ParamCounts.from_model(_thousand()), strategy="none", compute_dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="vlreason.train.memory"):
        assert check_plan(plan, available=10**9)
        assert not caplog.records
        assert not check_plan(plan, available=plan.total - 1)
    assert any("exceeds" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlreason.train.memory"):
        got = log_memory_plan(_thousand(), strategy="ddp", world_size=2, compute_dtype="float32",
                              device="cpu", available=100)
    assert got.total == 20008
    messages = [r.getMessage() for r in caplog.records]
    assert any("device total (peak)" in m for m in messages)  # the table, at INFO
    assert any("exceeds" in m for m in messages)
    assert "optimizer" in format_plan(got)
    assert (device_memory("cpu") or 1) > 0  # /proc/meminfo where there is one


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def test_plan_matches_the_tensors_after_one_adamw_step(tiny_path):
    """One process: weights + gradients + AdamW state of the real tiny Qwen-VL (vision
    tower frozen, so there are frozen weights too) are exactly what the plan says."""
    from transformers import AutoModelForImageTextToText

    from vlreason.train.schedule import build_optimizer

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path, dtype=torch.float32)
    model.model.visual.requires_grad_(False)
    optimizer = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    ids = torch.randint(0, 900, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()

    params = list(model.parameters())
    weights = _tensor_bytes(params)
    grads = _tensor_bytes(p.grad for p in params if p.requires_grad)
    state = _tensor_bytes(v for s in optimizer.state.values() for v in s.values())
    assert grads > 0 and state > 0

    plan = log_memory_plan(model, strategy="none", world_size=1, compute_dtype=torch.float32, device="cpu")
    assert plan.weights == weights
    assert plan.gradients == grads
    assert plan.optimizer == state
    assert plan.weights_gradients_optimizer == weights + grads + state
    assert plan.counts.vision == sum(p.numel() for p in model.model.visual.parameters()) > 0
    assert plan.counts.frozen == plan.counts.vision
    layers = list(model.model.language_model.layers) + list(model.model.visual.blocks)
    assert plan.counts.largest_unit == max(sum(p.numel() for p in m.parameters()) for m in layers)


def test_format_plan_names_small_models_in_readable_units():
    from vlreason.train.memory import format_plan, human, plan_memory

    assert (human(3_750_000_000), human(1_234_567), human(4_096), human(512)) == ("3.75G", "1.23M", "4.10K", "512")
    counts = ParamCounts(trainable=1_000_000, vision=250_000, trainable_tensors=10)
    text = format_plan(plan_memory(counts, strategy="none", world_size=1, compute_dtype=torch.float32))
    assert "parameters 1.00M (vision 250.00K, language 750.00K), trainable 1.00M" in text
    assert "MiB" in text.splitlines()[2]  # 16 MB of weights, gradients and Adam: not 0.00 GiB

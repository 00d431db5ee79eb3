"""The GPU tier's recipe check rehearsed on the CPU (slow, no CUDA needed): GRPO through
the command line in a one-process gloo group with parallel.strategy=fsdp2 and bf16
compute at lr 1e-6. Same launcher and assertions as tests/gpu/test_gpu.py, so its
wiring (config keys, final/ in fp32, the moved-weights measure) is checked before a GPU
ever runs it. Measured here: 70 % of the language model's entries moved."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_grpo_fsdp2_bf16_lr_1e_6_in_a_one_process_gloo_group(tmp_path, grpo_in_process_group):
    run = tmp_path / "run"
    proc, moved = grpo_in_process_group(run, "fsdp2", "gloo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "parallel: fsdp2 on 1 processes" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert moved() > 0.3

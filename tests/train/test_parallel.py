"""The GRPO recipe on two CPU processes through ``accelerate launch`` ends with the
weights of one process on the same global batch, under DDP and under FSDP2; FSDP2
holds half of the trainable parameters and optimizer state on each process; sharded
(DCP) checkpoints resume on the same number of processes and across 1 <-> 2 processes
with the weights of an uninterrupted run.

``accelerate launch --cpu --num_processes 2`` starts one process here (accelerate's
CPU launcher needs mpirun for more), so the runs use ``--multi_gpu``, which starts the
two processes through torch.distributed.run; on a CPU-only machine they join a gloo
group and run on the CPU. The FSDP2 run also recomputes activations (gradient
checkpointing inside the sharded units).

Tolerance: every final tensor within 1e-5 absolute (+1e-4 relative) of the one-process
run; the updates themselves are ~1e-3 per element (4 AdamW steps at lr 1e-3), so a
lost or doubled gradient reduction would be 100x outside it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=4", "save_steps=2", "keep_last=0", "progress=false", "rollout.num_generations=4",
        "rollout.max_new_tokens=8", "prompts_per_step=4", "algorithm.micro_batch_prompts=1",
        "optim.lr=1e-3", "algorithm.reward=tests.train.test_parallel:text_length_reward",
        "heldout_eval=false"]
ATOL, RTOL = 1e-5, 1e-4


def text_length_reward(completion: str, ground_truth: str, **info) -> float:
    """A reward that differs between completions of a random tiny model (non-zero advantages)."""
    return len(completion) / 40.0


def _launch(out: Path, *extra: str, processes: int, port: int = 29650) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    script = [str(ROOT / "recipes" / "grpo.py"), f"output_dir={out}", *ARGS, *extra]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, what: str) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=f"{what}: {name}")
        worst = max(worst, float((b[name] - a[name]).abs().max()))
    return worst


def _show(run: Path, label: str) -> None:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"  {label} step {r['step']}: loss={r['loss']:.5f} reward={r['reward']:.4f} "
              f"grad_norm={r['grad_norm']:.4f}")


@pytest.mark.slow
def test_ddp_and_fsdp2_match_one_process_and_checkpoints_reshard(tmp_path, capsys):
    from vlreason.paths import warm_model

    one = tmp_path / "one"
    _launch(one, processes=1)
    start = load_file(str(warm_model() / "model.safetensors"))
    reference = _final(one)
    moved = max(float((reference[n] - start[n]).abs().max()) for n in start)
    assert moved > 100 * ATOL, f"the updates ({moved:.2e}) must dwarf the tolerance"

    report = {}
    with capsys.disabled():
        print(f"\nlargest update of the one-process run: {moved:.2e}")
        _show(one, "1 process")
        for strategy, port in (("ddp", 29651), ("fsdp2", 29652)):
            run = tmp_path / strategy
            # fsdp2 with activation checkpointing: recomputation inside the sharded units
            extra = ["model.gradient_checkpointing=true"] if strategy == "fsdp2" else []
            stdout = _launch(run, f"parallel.strategy={strategy}", *extra, processes=2, port=port)
            report[strategy] = re.findall(r"rank \d \(\w+\): .*", stdout)
            _show(run, f"2 processes {strategy}")
            worst = _assert_same_weights(reference, _final(run), strategy)
            print(f"  {strategy}: largest difference from one process {worst:.2e}; " + " | ".join(report[strategy]))

    # FSDP2: each process holds half of the trainable parameters and of the optimizer state
    fractions = [float(x) for line in report["fsdp2"] for x in re.findall(r"\(([\d.]+)%\)", line)]
    assert len(fractions) == 4 and all(45.0 <= f <= 55.0 for f in fractions), report["fsdp2"]
    ddp_fractions = [float(x) for line in report["ddp"] for x in re.findall(r"\(([\d.]+)%\)", line)]
    assert ddp_fractions and all(f == 100.0 for f in ddp_fractions)
    sharded = tmp_path / "fsdp2" / "checkpoints" / "step-2" / "state"
    assert sorted(p.name for p in sharded.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]

    # resume from step 2: 2 -> 2 (same), 2 -> 1 and 1 -> 2 processes, all equal to the straight run
    cases = [("fsdp2", 2, "parallel.strategy=fsdp2", 29653), ("fsdp2", 1, "parallel.strategy=auto", 0),
             ("one", 2, "parallel.strategy=fsdp2", 29654)]
    for source, processes, strategy, port in cases:
        run = tmp_path / f"resume-{source}-on-{processes}"
        _launch(run, strategy, f"resume={tmp_path / source / 'checkpoints' / 'step-2'}", processes=processes, port=port)
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [3, 4]
        _assert_same_weights(reference, _final(run), f"{source} checkpoint resumed on {processes}")


def test_strategy_choice_and_validation(monkeypatch):
    from vlreason.train import parallel
    from vlreason.train.parallel import ParallelConfig, aligned_micro_batches, resolve_strategy

    assert resolve_strategy("auto", 1) == "none" and resolve_strategy("auto", 4) == "ddp"
    assert resolve_strategy("fsdp2", 2) == "fsdp2"
    with pytest.raises(ValueError, match="diverging copies"):
        resolve_strategy("none", 2)
    with pytest.raises(ValueError, match="parallel.strategy"):
        ParallelConfig(strategy="fsdp").validate()
    with pytest.raises(ValueError, match="cpu_offload"):
        ParallelConfig(strategy="ddp", cpu_offload=True).validate()
    # a process with fewer micro-batches than another repeats its last one at weight 0
    monkeypatch.setattr(parallel, "global_max", lambda value: 3)
    assert aligned_micro_batches(["a", "b"]) == [("a", 1.0), ("b", 1.0), ("b", 0.0)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lora_trains_under_ddp_and_fsdp2(tmp_path, strategy):
    """LoRA on two processes: the adapter is what trains and what final/ holds."""
    run = tmp_path / strategy
    _launch(run, f"parallel.strategy={strategy}", "model.lora.enabled=true", "model.lora.r=4",
            "algorithm.kl_coef=0.01", "max_steps=2", processes=2, port=29680 + len(strategy))
    from safetensors.torch import load_file as load

    adapter = load(str(run / "final" / "adapter_model.safetensors"))
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it moved
    assert not (run / "final" / "model.safetensors").exists()

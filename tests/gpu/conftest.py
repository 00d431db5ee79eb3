"""Shared by the GPU tier and its CPU rehearsal: `vlreason train grpo` run through the
command line inside an already initialised one-process group (what torchrun gives one
process), and how much of the language model's weights moved."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

LAUNCH = """
import sys, torch, torch.distributed as dist
backend = sys.argv[1]
if backend == "nccl":
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))  # env: MASTER_ADDR/PORT, RANK, WORLD_SIZE
else:
    dist.init_process_group(backend)
assert dist.get_backend() == backend and dist.get_world_size() == 1
from vlreason.cli import main
code = main(["train", "grpo", *sys.argv[2:]])
dist.destroy_process_group()
sys.exit(code)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_keys() -> set[str]:
    from recipes.grpo import GRPORecipe
    from vlreason.config import describe

    return {key for key, *_ in describe(GRPORecipe.config_class)}


def moved_fraction(run: Path) -> float:
    """Fraction of the language model's entries (vision tower aside) in ``run/final``
    that differ from the starting checkpoint (assets/warm-tiny)."""
    from transformers import AutoModelForImageTextToText

    from vlreason.paths import warm_model

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("grad_norm", 0) > 0 for r in records), "zero gradients: equal rewards in every group?"
    start = AutoModelForImageTextToText.from_pretrained(warm_model(), dtype=torch.float32).state_dict()
    final = AutoModelForImageTextToText.from_pretrained(run / "final", dtype=torch.float32).state_dict()
    names = [n for n in start if n in final and start[n].is_floating_point() and "visual" not in n]
    changed = sum(int((final[n] != start[n]).sum()) for n in names)
    return changed / sum(start[n].numel() for n in names)


@pytest.fixture(scope="module")
def grpo_in_process_group():
    """``run(run_dir, strategy, backend) -> (CompletedProcess, moved_fraction)``: 2 GRPO
    steps at lr 1e-6 with model.dtype=bfloat16 (kl 0.01, G=8, 4 prompts, 32 tokens)."""
    pytest.importorskip("datasets", reason="the recipe reads the bundled Arrow demo data")
    keys = _config_keys()
    if "parallel.strategy" not in keys:
        pytest.skip("this checkout's GRPO config has no parallel.strategy")

    def run(run_dir: Path, strategy: str, backend: str):
        args = [f"output_dir={run_dir}", "max_steps=2", "save_steps=0", "rollout.num_generations=8",
                "rollout.max_new_tokens=32", "prompts_per_step=4", "algorithm.micro_batch_prompts=2",
                "algorithm.kl_coef=0.01", "optim.lr=1e-6", "model.dtype=bfloat16", "trackers=[jsonl]",
                "progress=false", f"parallel.strategy={strategy}"]
        if "heldout_eval" in keys:
            args.append("heldout_eval=false")
        if "model.save_dtype" in keys:
            args.append("model.save_dtype=float32")  # final/ as the fp32 masters, to see 1e-6 moves
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
               "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.run([sys.executable, "-c", LAUNCH, backend, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        return proc, lambda: moved_fraction(run_dir)

    return run

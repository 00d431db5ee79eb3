"""GRPO step throughput at Qwen2.5-VL-3B's published shape (random weights) on one GPU.

    bash benchmarks/gpu.sh                        # on the GPU machine (installs, checks, runs)
    python benchmarks/gpu_bench.py [--steps 2] [--num-generations 8] [--max-new-tokens 1024]
    python benchmarks/gpu_bench.py --smoke        # tiny shapes, CPU is fine: checks the code path

The model is built from a config (no download): Qwen2.5-VL-3B-Instruct's text model
(hidden 2048, 36 layers, 16 heads, 2 KV heads, MLP 11,008, vocabulary 151,936, tied
embeddings, M-RoPE sections 16/24/24, rope theta 1e6) and vision tower (depth 32,
hidden 1280, MLP 3,420, 16 heads, patch 14, merge 2, window 112, full attention in
blocks 7/15/23/31, output 2048), randomly initialised, bf16, sdpa attention. The
tokenizer / processor is vlreason's offline tiny one (ids < 1,100, inside the vocabulary).

A step is vlreason's own GRPO step: ``Policy`` (rollout with the images encoded once,
chunked log-probs through ``token_outputs``), ``GRPOPhases`` (rollout, reward, group
advantages, reference log-probs from a frozen copy, clipped surrogate + k3 KL), driven
by ``Trainer.train_step`` (micro-batches, backward, clipping, AdamW). The end-of-turn
ids are set to -inf at the LM head's output during sampling (a forward hook on
``lm_head``; training passes read its weight directly and are untouched), so every
completion is exactly ``--max-new-tokens`` long.

Printed (and written as JSON): step time and its split (rollout / reward / reference /
update), rollout tokens/s (generated tokens / rollout time), update tokens/s (prompt +
completion tokens / update time), the update's model FLOP utilisation: the FLOPs the
update pass computes (``flops.py``: language-model layers and causal attention per
text token, the output layer on completion tokens only, the vision tower per patch it
encoded, attention included, no recompute) / update time / peak (``--peak-tflops``, by
default 989 TFLOP/s, H100 SXM bf16 dense), by part; beside it the naive
``6 * params * tokens`` figure (it multiplies the vision parameters by every text token
and the output layer by prompt tokens: too high), peak GPU memory (allocated /
reserved, per phase), and the images the vision tower encoded per pass.

This file is the command line and the measuring (setup, timed steps, throughput and MFU,
summary, table); ``gpu_bench_build.py`` builds the model, processor, rows and hooks;
``bench_common.py`` has the loop's recipe interface over ``GRPOPhases``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported (benchmarks.gpu_bench) rather than run as a script
    sys.path.insert(0, str(HERE))

from bench_common import PhasesRecipe  # noqa: E402
from flops import TextShape, VisionShape, shapes_from_model, update_flops  # noqa: E402
from gpu_bench_build import (  # noqa: E402
    NoEnd,
    VisionCounter,
    build_config,
    build_model,
    build_processor,
    check_transformers,
    synthetic_rows,
)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}  # bf16 dense (SXM)


# ---------------------------------------------------------------------------- the run


@dataclass
class Shape:
    num_generations: int
    max_new_tokens: int
    prompts_per_step: int
    micro_batch_prompts: int
    image_side: int
    beta: float
    grad_ckpt: bool


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        import resource

        return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def default_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu (no peak: MFU not computed)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return 756.0, f"{name}: 756 TFLOP/s bf16 dense (H100 PCIe)"
            if key == "H100" and "NVL" in name:
                return 835.0, f"{name}: 835 TFLOP/s bf16 dense (H100 NVL)"
            return value, f"{name}: {value:g} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak (pass --peak-tflops)"


def run(args) -> dict[str, Any]:
    """Build, measure ``--warmup`` + ``--steps`` steps (or until ``--time-limit``), report."""
    bench = setup(args)
    bench.model.train()
    records = measure(bench, args)
    return report(bench, args, records)


# ---------------------------------------------------------------------------- setup


@dataclass
class Bench:
    """What a measured step needs, built by ``setup``."""

    device: torch.device
    dtype: torch.dtype
    shape: Shape
    model: Any
    trainer: Any
    vision: VisionCounter
    tokens: dict[str, int]  # the step's prompt / completion tokens (filled by TokenCountingRecipe)
    phase_peaks: dict[str, dict[str, float]]  # peak memory around rollout and reference calls
    params: int
    vision_params: int
    text_shape: TextShape
    vision_shape: VisionShape | None
    peak_tflops: float | None
    peak_note: str
    t_start: float
    t_built: float


def setup(args) -> Bench:
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # vlreason's own precision: fp32 master weights, forward/backward in the compute dtype
    # (autocast, or FSDP2's mixed-precision policy), a frozen reference in the compute dtype
    dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.strategy == "fsdp2":
        init_single_process_group(device)
    shape = Shape(args.num_generations, args.max_new_tokens, args.prompts, args.micro_prompts,
                  args.image_side, args.beta, args.grad_ckpt)
    processor = build_processor(shape.image_side * shape.image_side)
    model, reference = build_models(build_config(processor, args.smoke), shape, device, dtype, args.seed)
    t_built = time.perf_counter()
    policy = build_policy(args, shape, processor, model, reference, dtype)
    vision = VisionCounter(model, reference)
    phases = build_phases(args, shape, policy)
    phase_peaks = track_phase_peaks(policy, device, shape.beta > 0)
    tokens: dict[str, int] = {}
    trainer = build_trainer(args, TokenCountingRecipe(phases, policy, tokens, device))
    peak_tflops, peak_note = (args.peak_tflops, f"--peak-tflops {args.peak_tflops:g}") if args.peak_tflops \
        else default_peak_tflops(device)
    text_shape, vision_shape = shapes_from_model(model)
    return Bench(device=device, dtype=dtype, shape=shape, model=model, trainer=trainer, vision=vision,
                 tokens=tokens, phase_peaks=phase_peaks, text_shape=text_shape, vision_shape=vision_shape,
                 params=sum(p.numel() for p in model.parameters()),  # unique tensors: tied embedding once
                 vision_params=sum(p.numel() for p in model.model.visual.parameters()),
                 peak_tflops=peak_tflops, peak_note=peak_note, t_start=t_start, t_built=t_built)


def init_single_process_group(device: torch.device) -> None:
    """A one-process group (in-memory store), so that FSDP2 can run outside torchrun."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def build_models(config, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int):
    """The policy model (fp32 master weights) and, when beta > 0, its frozen reference copy
    in the compute dtype ``dtype`` (as ``vlreason.models.loading`` builds them)."""
    model = build_model(config, device, torch.float32, seed)
    if shape.grad_ckpt:  # as vlreason.models.loading does for model.gradient_checkpointing=true
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    reference = None
    if shape.beta > 0:  # a frozen copy, as Policy.load(with_reference=True) builds without LoRA
        reference = copy.deepcopy(model).to(dtype)
        reference.requires_grad_(False)
        reference.eval()
    return model, reference


def build_policy(args, shape: Shape, processor, model, reference, compute_dtype: torch.dtype):
    """vlreason's ``Policy`` over the built models; end-of-turn suppressed during sampling."""
    from vlreason.models.families import get_family
    from vlreason.rollout.generate import end_token_ids
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.views.budget import PixelBudget

    family = get_family("qwen2_5_vl")
    pixels = shape.image_side * shape.image_side
    rollout = RolloutConfig(num_generations=shape.num_generations, max_new_tokens=shape.max_new_tokens,
                            min_pixels=56 * 56, max_pixels=pixels, temperature=1.0, top_p=1.0, top_k=0)
    rollout.prompt.max_prompt_tokens = 8192
    if args.logprob_chunk_size:
        rollout.logprob_chunk_size = args.logprob_chunk_size
    policy = Policy(model=model, family=family, processor=processor,
                    budget=PixelBudget(min_pixels=56 * 56, max_pixels=pixels, factor=family.factor),
                    rollout=rollout, reference=reference, has_reference=shape.beta > 0,
                    compute_dtype=compute_dtype)
    NoEnd(family.lm_head(model), end_token_ids(processor))
    return policy


def build_phases(args, shape: Shape, policy):
    from vlreason.data.stream import RowStream
    from vlreason.train.grpo import GRPOConfig, GRPOPhases

    rows = synthetic_rows(64, shape.image_side, args.seed)
    return GRPOPhases(GRPOConfig(micro_batch_prompts=shape.micro_batch_prompts, kl_coef=shape.beta, reward="format"),
                      policy, RowStream(rows, seed=args.seed), args.seed, prompts_per_step=shape.prompts_per_step)


def track_phase_peaks(policy, device: torch.device, reference: bool) -> dict[str, dict[str, float]]:
    """Per-phase peak memory: wraps the policy's rollout (and reference) calls; filled per call."""
    phase_peaks: dict[str, dict[str, float]] = {}

    def with_peak(name, fn):
        def wrapper(*a, **kw):
            reset_peak(device)
            try:
                return fn(*a, **kw)
            finally:
                sync(device)
                phase_peaks[name] = peak_memory(device)
                reset_peak(device)

        return wrapper

    policy.sample = with_peak("rollout", policy.sample)
    if reference:
        policy.reference_logprobs = with_peak("reference", policy.reference_logprobs)
    return phase_peaks


class TokenCountingRecipe(PhasesRecipe):
    """The loop's recipe interface; ``prepare`` also counts the step's tokens into ``tokens``
    and resets the peak-memory counter (what follows is the update). It carries the
    ``policy``, so the loop computes in its compute dtype and shards its reference."""

    def __init__(self, phases, policy, tokens: dict[str, int], device: torch.device):
        super().__init__(phases, policy.model)
        self.policy = policy
        self.tokens = tokens
        self.device = device

    def prepare(self, step, timer):
        micro, metrics = self.phases.prepare(step, timer)
        tokens = self.tokens
        tokens.clear()
        tokens["prompt_lens"], tokens["completion_lens"] = [], []
        for mb in micro:
            group = mb.group_ids_N.to(mb.prompts.attention_mask_PT.device)
            prompt_lens = mb.prompts.attention_mask_PT[group].sum(-1).tolist()
            completion_lens = mb.completion_mask_NT.sum(-1).tolist()
            tokens["prompt_lens"] += prompt_lens
            tokens["completion_lens"] += completion_lens
            prompt, completion = int(sum(prompt_lens)), int(sum(completion_lens))
            tokens["prompt"] = tokens.get("prompt", 0) + prompt
            tokens["completion"] = tokens.get("completion", 0) + completion
            tokens["sequences"] = tokens.get("sequences", 0) + mb.num_completions
            tokens["completion_min"] = min(tokens.get("completion_min", 1 << 30),
                                           int(mb.completion_mask_NT.sum(-1).min()))
        reset_peak(self.device)  # what follows is the update
        return micro, metrics


def build_trainer(args, recipe):
    from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
    from vlreason.train.parallel import ParallelConfig

    loop = LoopConfig(output_dir=os.environ.get("TMPDIR", "/tmp") + "/vlreason_gpu_bench", seed=args.seed,
                      max_steps=args.warmup + args.steps, trackers=[], progress=False,
                      parallel=ParallelConfig(strategy=args.strategy),
                      optim=OptimConfig(lr=1e-6, weight_decay=0.0, schedule="constant", max_grad_norm=1.0))
    return Trainer(loop, recipe)


# ---------------------------------------------------------------------------- measuring


def measure(bench: Bench, args) -> list[dict[str, Any]]:
    """Warm-up and measured steps; stops early when another step would pass ``--time-limit``."""
    from vlreason.train.metrics import StepTimer

    timer = StepTimer(synchronize=bench.device.type == "cuda")
    records = []
    deadline = bench.t_start + args.time_limit
    for i in range(args.warmup + args.steps):
        if i > args.warmup and records and time.perf_counter() + records[-1]["step_s"] * 1.1 > deadline:
            print(f"stopping after {i - args.warmup} measured step(s): --time-limit {args.time_limit:g} s",
                  flush=True)
            break
        seconds, metrics, update_peak = time_step(bench, timer)
        rec = step_record(bench, i < args.warmup, seconds, metrics, update_peak)
        records.append(rec)
        times, tokens = rec["phases_s"], rec["tokens"]
        print(f"step {i + 1}{' (warm-up)' if rec['warmup'] else ''}: {seconds:.1f} s "
              f"(rollout {times.get('rollout', 0):.1f}, reference {times.get('reference', 0):.1f}, "
              f"update {times.get('update', 0):.1f}), completion tokens {tokens['completion']}", flush=True)
    return records


def time_step(bench: Bench, timer) -> tuple[float, dict[str, Any], dict[str, float]]:
    """One ``Trainer.train_step``: wall seconds, its metrics, the update's peak memory."""
    device = bench.device
    reset_peak(device)
    bench.phase_peaks.clear()
    bench.vision.pop()
    timer.reset()
    sync(device)
    t0 = time.perf_counter()
    metrics = bench.trainer.train_step(timer)
    sync(device)
    return time.perf_counter() - t0, metrics, peak_memory(device)


def step_record(bench: Bench, warmup: bool, seconds: float, metrics: dict[str, Any],
                update_peak: dict[str, float]) -> dict[str, Any]:
    """Throughput and MFU of one step, from its phase times and token counts."""
    tokens = bench.tokens
    times = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("time/") and k != "time/step"}
    update_tokens = tokens["prompt"] + tokens["completion"]
    images, patch_rows, patches_per_image = bench.vision.pop()
    flops = update_flops(bench.text_shape, bench.vision_shape, tokens["prompt_lens"],
                         tokens["completion_lens"], patches_per_image.get("update", []))
    return {
        "warmup": warmup,
        "step_s": seconds,
        "phases_s": times,
        "tokens": {k: v for k, v in tokens.items() if not k.endswith("_lens")},
        "rollout_tokens_per_s": tokens["completion"] / times["rollout"],
        "update_tokens_per_s": update_tokens / times["update"],
        "update_completion_tokens_per_s": tokens["completion"] / times["update"],
        "update_flops": flops,
        "update_mfu": mfu(flops["total"], times["update"], bench.peak_tflops),
        "update_mfu_naive": mfu(6 * bench.params * update_tokens, times["update"], bench.peak_tflops),
        "memory": {**bench.phase_peaks, "update": update_peak},
        "images_encoded": images,
        "patch_rows_encoded": patch_rows,
        "loss": metrics.get("loss"),
        "kl": metrics.get("kl"),
    }


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: ``flops / seconds / peak`` (None without a peak)."""
    return flops / seconds / (peak_tflops * 1e12) if peak_tflops else None


# ---------------------------------------------------------------------------- report


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured steps (all steps when none was measured); memory: the largest."""
    measured = [r for r in records if not r["warmup"]] or records

    def med(fn):
        values = [fn(r) for r in measured]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    mem_keys = sorted({(ph, k) for r in measured for ph, d in r["memory"].items() for k in d})
    return {
        "step_s": med(lambda r: r["step_s"]),
        "phases_s": {k: med(lambda r, k=k: r["phases_s"].get(k)) for k in ("rollout", "reward", "reference", "update")},
        "rollout_tokens_per_s": med(lambda r: r["rollout_tokens_per_s"]),
        "update_tokens_per_s": med(lambda r: r["update_tokens_per_s"]),
        "update_completion_tokens_per_s": med(lambda r: r["update_completion_tokens_per_s"]),
        "update_mfu": med(lambda r: r["update_mfu"]),
        "update_mfu_naive": med(lambda r: r["update_mfu_naive"]),
        "update_flops": {k: med(lambda r, k=k: r["update_flops"][k]) for k in measured[-1]["update_flops"]},
        "memory_peak": {f"{ph}/{k}": max(r["memory"].get(ph, {}).get(k, 0.0) for r in measured) for ph, k in mem_keys},
        "tokens_per_step": measured[-1]["tokens"],
        "images_encoded_per_step": measured[-1]["images_encoded"],
        "completion_len_min": min(r["tokens"]["completion_min"] for r in measured),
        "measured_steps": len([r for r in records if not r["warmup"]]),
    }


def report(bench: Bench, args, records: list[dict[str, Any]]) -> dict[str, Any]:
    import transformers

    device = bench.device
    return {
        "benchmark": "vlreason GRPO step, Qwen2.5-VL-3B shape, random weights (benchmarks/gpu_bench.py)",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(bench.dtype).replace("torch.", ""),  # compute dtype; master weights fp32
        "strategy": args.strategy,
        "attention": "sdpa",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shape": vars(bench.shape),
        "params": bench.params,
        "vision_params": bench.vision_params,
        "trainable_params": sum(p.numel() for p in bench.trainer.params),
        "peak_tflops": bench.peak_tflops,
        "peak_note": bench.peak_note,
        "mfu_formula": "update FLOPs as counted by benchmarks/flops.py (3 x forward: LM layers per text "
                       "token, causal attention, output layer on completion tokens only, vision per "
                       "encoded patch with attention; no gradient-checkpointing recompute) / update "
                       "time / peak. update_mfu_naive: 6 * params * (prompt + completion tokens), "
                       "which overcounts (vision params x text tokens, output layer on prompts)",
        "build_s": bench.t_built - bench.t_start,
        "wall_s": time.perf_counter() - bench.t_start,
        "summary": summarise(records),
        "records": records,
    }


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    shape = result["shape"]
    N = shape["num_generations"] * shape["prompts_per_step"]

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print()
    print(f"vlreason GRPO step | {'SMOKE (toy shapes)' if result['smoke'] else 'Qwen2.5-VL-3B shape'} | "
          f"{result['device']} | {result['dtype']} compute, fp32 masters | {result['strategy']} | sdpa | torch {result['versions']['torch']} | "
          f"transformers {result['versions']['transformers']}")
    print(f"params {result['params'] / 1e9:.3f} B | {shape['prompts_per_step']} prompt(s) x G={shape['num_generations']} "
          f"= {N} completions of {shape['max_new_tokens']} tokens | image {shape['image_side']}x{shape['image_side']} | "
          f"beta {shape['beta']:g} | grad ckpt {shape['grad_ckpt']} | {s['measured_steps']} measured step(s)")
    print("-" * 64)
    rows = [
        ("step time (s)", f(s["step_s"], ".2f")),
        ("  rollout (s)", f(s["phases_s"]["rollout"], ".2f")),
        ("  reward (s)", f(s["phases_s"]["reward"], ".3f")),
        ("  reference (s)", f(s["phases_s"]["reference"], ".2f")),
        ("  update (s)", f(s["phases_s"]["update"], ".2f")),
        ("rollout tokens/s (generated)", f(s["rollout_tokens_per_s"], ",.0f")),
        ("update tokens/s (prompt+completion)", f(s["update_tokens_per_s"], ",.0f")),
        ("update tokens/s (completion only)", f(s["update_completion_tokens_per_s"], ",.0f")),
        ("update MFU (FLOPs computed, flops.py)", "-" if s["update_mfu"] is None
         else f"{100 * s['update_mfu']:.1f} %"),
        *((f"  {k.replace('_', ' ')} (GFLOP)", f"{v / 1e9:,.2f}") for k, v in s["update_flops"].items()),
        ("  naive 6 * params * tokens (too high)", "-" if s["update_mfu_naive"] is None
         else f"{100 * s['update_mfu_naive']:.1f} %"),
        ("  peak used", result["peak_note"]),
        ("completion length (min)", f"{s['completion_len_min']} (EOS suppressed)"),
        ("tokens / step (prompt, completion)", f"{s['tokens_per_step']['prompt']}, {s['tokens_per_step']['completion']}"),
        ("images encoded / step", ", ".join(f"{k} {v}" for k, v in sorted(s["images_encoded_per_step"].items()))),
    ]
    for key, value in sorted(s["memory_peak"].items()):
        unit = "GiB"
        rows.append((f"peak memory {key} ({unit})", f"{value:.2f}"))
    rows.append(("build + run wall (s)", f"{result['build_s']:.0f} + {result['wall_s'] - result['build_s']:.0f}"))
    for key, value in rows:
        print(f"{key:<40}{value:>24}" if len(value) <= 24 else f"{key:<40}{value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy shapes, few tokens (runs on CPU in a minute)")
    p.add_argument("--num-generations", "-G", type=int, default=None, help="G (default 8; smoke 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default 1024; smoke 16)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step")
    p.add_argument("--micro-prompts", type=int, default=1, help="prompts (x G) per micro-batch")
    p.add_argument("--image-side", type=int, default=None, help="square image side in px (default 448; smoke 112)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0 keeps a frozen reference copy)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in the update (default on: 8 x 1.3k-token sequences of a 3B "
                        "model do not fit beside weights, grads, AdamW and the reference otherwise)")
    p.add_argument("--logprob-chunk-size", type=int, default=0, help="rollout.logprob_chunk_size (0: default)")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps (not in the medians)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak bf16 dense TFLOP/s for MFU (default: from the device name, 989 for H100 SXM)")
    p.add_argument("--time-limit", type=float, default=400, help="stop measuring after this many seconds")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="forward/backward dtype over fp32 master weights (default: bfloat16 on CUDA, "
                        "float32 on CPU)")
    p.add_argument("--strategy", choices=["none", "fsdp2"], default="none",
                   help="parallel.strategy of the loop: fsdp2 wraps decoder layers and vision blocks with "
                        "FSDP2 (one process here: a one-process group if not under torchrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_bench.json if $OUT is set)")
    args = p.parse_args(argv)
    args.num_generations = args.num_generations or (4 if args.smoke else 8)
    args.max_new_tokens = args.max_new_tokens or (16 if args.smoke else 1024)
    args.image_side = args.image_side or (112 if args.smoke else 448)
    if args.image_side % 28:
        p.error("--image-side must be a multiple of 28 (patch 14 x merge 2)")

    problems = check_transformers()
    if problems:
        print("gpu_bench: this transformers cannot run vlreason's multimodal code paths:", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 3
    if not args.smoke and not torch.cuda.is_available() and args.device != "cpu":
        print("gpu_bench: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return 4
    result = run(args)
    print_table(result)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=1, default=float))
        print(f"wrote {out}")
    ok = result["summary"]["completion_len_min"] == args.max_new_tokens and all(
        math.isfinite(r["loss"]) for r in result["records"] if r["loss"] is not None)
    if not ok:
        print("gpu_bench: completions shorter than --max-new-tokens or a non-finite loss", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())

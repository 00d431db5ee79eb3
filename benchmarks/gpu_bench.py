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
completion tokens / update time), the update's model FLOP utilisation
``6 * params * tokens / update time / peak`` (params: every parameter, vision included,
tied embedding once; no attention FLOPs, no recompute; peak: ``--peak-tflops``, by
default 989 TFLOP/s, H100 SXM bf16 dense), peak GPU memory (allocated / reserved, per
phase), and the images the vision tower encoded per pass.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import io
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

QWEN25_VL_3B_TEXT = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=128_000, rms_norm_eps=1e-6,
    hidden_act="silu", use_sliding_window=False, sliding_window=32768, max_window_layers=70,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048, tokens_per_second=2,
)
# --smoke: the same architecture at toy size (M-RoPE sections sum to head_dim / 2 = 8).
SMOKE_TEXT = dict(
    QWEN25_VL_3B_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
)
SMOKE_VISION = dict(
    QWEN25_VL_3B_VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
    fullatt_block_indexes=[1, 3], out_hidden_size=64,
)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}  # bf16 dense (SXM)


# ---------------------------------------------------------------------------- checks


def check_transformers() -> list[str]:
    """Why the installed transformers cannot run vlreason's code paths (empty when it can)."""
    import transformers
    from transformers import Qwen2_5_VLModel

    params = inspect.signature(Qwen2_5_VLModel.forward).parameters
    problems = []
    if "mm_encoder_outputs" not in params:
        problems.append("Qwen2_5_VLModel.forward has no `mm_encoder_outputs` (vlreason hands the vision "
                        "tower's outputs to the model instead of re-encoding images per completion)")
    if "cache" not in params and prefix_sampler_passes_cache():
        problems.append("Qwen2_5_VLModel.forward names its KV cache `past_key_values`, not `cache` "
                        "(vlreason/rollout/prefix.py passes `cache=` and reads `out.cache`)")
    if problems:
        problems.append(f"installed: transformers {transformers.__version__} at {transformers.__file__}; "
                        "tested: 5.24.0. benchmarks/gpu.sh puts the wheels in .whl/ first on PYTHONPATH "
                        "(see benchmarks/README.md)")
    return problems


def prefix_sampler_passes_cache() -> bool:
    """Whether the default sampler (shared-prefix decode) calls the model with ``cache=``."""
    try:
        import vlreason.rollout.prefix as prefix
        from vlreason.rollout.generate import SamplingConfig
    except ImportError:
        return False
    return bool(getattr(SamplingConfig(), "share_prefix", False)) and "cache=" in inspect.getsource(prefix)


# ---------------------------------------------------------------------------- building


def build_processor(image_pixels: int):
    """vlreason's offline tokenizer + the family's real processor classes."""
    from vlreason.models.families import get_family
    from vlreason.models.tiny import CHAT_TEMPLATE, TinySpec, build_tokenizer

    tokenizer = build_tokenizer(1024)
    spec = TinySpec(min_pixels=56 * 56, max_pixels=max(image_pixels, 56 * 56))
    return get_family("qwen2_5_vl").build_processor(tokenizer, spec, CHAT_TEMPLATE)


def build_config(processor, smoke: bool):
    from transformers import Qwen2_5_VLConfig

    from vlreason.models.tiny import SPECIAL_TOKENS

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(SMOKE_TEXT if smoke else QWEN25_VL_3B_TEXT)
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(SMOKE_VISION if smoke else QWEN25_VL_3B_VISION),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights, created on ``device`` directly (no CPU copy of 3.75 B parameters)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device)


def synthetic_rows(count: int, side: int, seed: int) -> list[dict[str, Any]]:
    """Canonical rows: one ``side`` x ``side`` picture of a coloured shape, a question, an answer."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    rows = []
    for i in range(count):
        name = rng.choice(list(colours))
        img = Image.new("RGB", (side, side), tuple(rng.randint(0, 255) for _ in range(3)))
        x0, y0 = rng.randint(0, side // 2), rng.randint(0, side // 2)
        ImageDraw.Draw(img).ellipse([x0, y0, x0 + side // 3, y0 + side // 3], fill=colours[name])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"id": f"gpu-{i}", "images": [buf.getvalue()], "question": "What colour is the shape?",
                     "answer": name, "source": "synthetic/color", "choices": [], "boxes": [], "meta": "{}"})
    return rows


class NoEnd:
    """Forward hook on the LM head: end-of-turn ids get -inf, so sampling never stops early."""

    def __init__(self, lm_head: torch.nn.Module, end_ids: list[int]):
        self.end_ids = torch.tensor(end_ids)
        self.handle = lm_head.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        output[..., self.end_ids.to(output.device)] = float("-inf")
        return output


class VisionCounter:
    """Images (rows of ``grid_thw``) the vision tower encoded, by pass."""

    def __init__(self, policy_model, reference_model=None):
        self.counts: dict[str, int] = {}
        self.patch_rows: dict[str, int] = {}
        policy_model.model.visual.register_forward_hook(self.hook("policy"), with_kwargs=True)
        if reference_model is not None:
            reference_model.model.visual.register_forward_hook(self.hook("reference"), with_kwargs=True)

    def hook(self, role):
        def fn(module, args, kwargs, output):
            grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
            name = "reference" if role == "reference" else ("update" if torch.is_grad_enabled() else "rollout")
            self.counts[name] = self.counts.get(name, 0) + (int(grid.shape[0]) if grid is not None else 0)
            rows = int(grid.prod(-1).sum()) if grid is not None else 0
            self.patch_rows[name] = self.patch_rows.get(name, 0) + rows

        return fn

    def pop(self) -> tuple[dict[str, int], dict[str, int]]:
        out = (self.counts, self.patch_rows)
        self.counts, self.patch_rows = {}, {}
        return out


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
    from vlreason.data.stream import RowStream
    from vlreason.models.families import get_family
    from vlreason.models.policy import Policy, RolloutConfig
    from vlreason.rollout.generate import end_token_ids
    from vlreason.train.grpo import GRPOConfig, GRPOPhases
    from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
    from vlreason.train.metrics import StepTimer
    from vlreason.views.budget import PixelBudget

    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = Shape(args.num_generations, args.max_new_tokens, args.prompts, args.micro_prompts,
                  args.image_side, args.beta, args.grad_ckpt)
    pixels = shape.image_side * shape.image_side
    processor = build_processor(pixels)
    config = build_config(processor, args.smoke)
    family = get_family("qwen2_5_vl")
    model = build_model(config, device, dtype, args.seed)
    if shape.grad_ckpt:  # as vlreason.models.loading does for model.gradient_checkpointing=true
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    reference = None
    if shape.beta > 0:  # a frozen copy, as Policy.load(with_reference=True) builds without LoRA
        reference = copy.deepcopy(model)
        reference.requires_grad_(False)
        reference.eval()
    t_built = time.perf_counter()

    rollout = RolloutConfig(num_generations=shape.num_generations, max_new_tokens=shape.max_new_tokens,
                            min_pixels=56 * 56, max_pixels=pixels, temperature=1.0, top_p=1.0, top_k=0)
    rollout.prompt.max_prompt_tokens = 8192
    if args.logprob_chunk_size:
        rollout.logprob_chunk_size = args.logprob_chunk_size
    policy = Policy(model=model, family=family, processor=processor,
                    budget=PixelBudget(min_pixels=56 * 56, max_pixels=pixels, factor=family.factor),
                    rollout=rollout, reference=reference, has_reference=shape.beta > 0)
    NoEnd(family.lm_head(model), end_token_ids(processor))
    vision = VisionCounter(model, reference)

    rows = synthetic_rows(64, shape.image_side, args.seed)
    phases = GRPOPhases(GRPOConfig(prompts_per_step=shape.prompts_per_step,
                                   micro_batch_prompts=shape.micro_batch_prompts, kl_coef=shape.beta,
                                   reward="format"),
                        policy, RowStream(rows, seed=args.seed), args.seed)

    # Per-phase peak memory: around the policy's rollout and reference calls.
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
    if shape.beta > 0:
        policy.reference_logprobs = with_peak("reference", policy.reference_logprobs)

    tokens: dict[str, int] = {}

    class Recipe:  # the loop interface, wired as recipes/grpo.py does
        def __init__(self):
            self.model = model

        def prepare(self, step, timer):
            micro, metrics = phases.prepare(step, timer)
            tokens.clear()
            for mb in micro:
                group = mb.group_ids_N.to(mb.prompts.attention_mask_PT.device)
                prompt = int(mb.prompts.attention_mask_PT[group].sum())
                completion = int(mb.completion_mask_NT.sum())
                tokens["prompt"] = tokens.get("prompt", 0) + prompt
                tokens["completion"] = tokens.get("completion", 0) + completion
                tokens["sequences"] = tokens.get("sequences", 0) + mb.num_completions
                tokens["completion_min"] = min(tokens.get("completion_min", 1 << 30),
                                               int(mb.completion_mask_NT.sum(-1).min()))
            reset_peak(device)  # what follows is the update
            return micro, metrics

        def step(self, micro_batch):
            return phases.loss(micro_batch)

        def after_update(self, step):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    loop = LoopConfig(output_dir=os.environ.get("TMPDIR", "/tmp") + "/vlreason_gpu_bench", seed=args.seed,
                      max_steps=args.warmup + args.steps, trackers=[], progress=False,
                      optim=OptimConfig(lr=1e-6, weight_decay=0.0, schedule="constant", max_grad_norm=1.0))
    trainer = Trainer(loop, Recipe())
    n_params = sum(p.numel() for p in model.parameters())  # unique tensors: tied embedding once
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    n_trainable = sum(p.numel() for p in trainer.params)
    peak_tflops, peak_note = (args.peak_tflops, f"--peak-tflops {args.peak_tflops:g}") if args.peak_tflops \
        else default_peak_tflops(device)

    model.train()
    timer = StepTimer(synchronize=device.type == "cuda")
    records = []
    deadline = t_start + args.time_limit
    for i in range(args.warmup + args.steps):
        if i > args.warmup and records and time.perf_counter() + records[-1]["step_s"] * 1.1 > deadline:
            print(f"stopping after {i - args.warmup} measured step(s): --time-limit {args.time_limit:g} s",
                  flush=True)
            break
        reset_peak(device)
        phase_peaks.clear()
        vision.pop()
        timer.reset()
        sync(device)
        t0 = time.perf_counter()
        metrics = trainer.train_step(timer)
        sync(device)
        seconds = time.perf_counter() - t0
        update_peak = peak_memory(device)
        times = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("time/") and k != "time/step"}
        update_tokens = tokens["prompt"] + tokens["completion"]
        images, patch_rows = vision.pop()
        # Finer count: language-model parameters over text tokens, vision tower over the
        # patch rows it actually encoded in the update pass.
        split_flops = 6 * ((n_params - n_vision) * update_tokens + n_vision * patch_rows.get("update", 0))
        rec = {
            "warmup": i < args.warmup,
            "step_s": seconds,
            "phases_s": times,
            "tokens": dict(tokens),
            "rollout_tokens_per_s": tokens["completion"] / times["rollout"],
            "update_tokens_per_s": update_tokens / times["update"],
            "update_completion_tokens_per_s": tokens["completion"] / times["update"],
            "update_mfu": (6 * n_params * update_tokens / times["update"] / (peak_tflops * 1e12)
                           if peak_tflops else None),
            "update_mfu_split": (split_flops / times["update"] / (peak_tflops * 1e12) if peak_tflops else None),
            "memory": {**phase_peaks, "update": update_peak},
            "images_encoded": images,
            "patch_rows_encoded": patch_rows,
            "loss": metrics.get("loss"),
            "kl": metrics.get("kl"),
        }
        records.append(rec)
        print(f"step {i + 1}{' (warm-up)' if rec['warmup'] else ''}: {seconds:.1f} s "
              f"(rollout {times.get('rollout', 0):.1f}, reference {times.get('reference', 0):.1f}, "
              f"update {times.get('update', 0):.1f}), completion tokens {tokens['completion']}", flush=True)

    measured = [r for r in records if not r["warmup"]] or records

    def med(fn):
        values = [fn(r) for r in measured]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    mem_keys = sorted({(ph, k) for r in measured for ph, d in r["memory"].items() for k in d})
    summary = {
        "step_s": med(lambda r: r["step_s"]),
        "phases_s": {k: med(lambda r, k=k: r["phases_s"].get(k)) for k in ("rollout", "reward", "reference", "update")},
        "rollout_tokens_per_s": med(lambda r: r["rollout_tokens_per_s"]),
        "update_tokens_per_s": med(lambda r: r["update_tokens_per_s"]),
        "update_completion_tokens_per_s": med(lambda r: r["update_completion_tokens_per_s"]),
        "update_mfu": med(lambda r: r["update_mfu"]),
        "update_mfu_split": med(lambda r: r["update_mfu_split"]),
        "memory_peak": {f"{ph}/{k}": max(r["memory"].get(ph, {}).get(k, 0.0) for r in measured) for ph, k in mem_keys},
        "tokens_per_step": measured[-1]["tokens"],
        "images_encoded_per_step": measured[-1]["images_encoded"],
        "completion_len_min": min(r["tokens"]["completion_min"] for r in measured),
        "measured_steps": len([r for r in records if not r["warmup"]]),
    }
    import transformers

    return {
        "benchmark": "vlreason GRPO step, Qwen2.5-VL-3B shape, random weights (benchmarks/gpu_bench.py)",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "attention": "sdpa",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shape": vars(shape),
        "params": n_params,
        "vision_params": n_vision,
        "trainable_params": n_trainable,
        "peak_tflops": peak_tflops,
        "peak_note": peak_note,
        "mfu_formula": "6 * params * (prompt + completion tokens of the update) / update time / peak; "
                       "no attention FLOPs, no gradient-checkpointing recompute. update_mfu_split: "
                       "6 * (LM params * tokens + vision params * patch rows encoded) instead",
        "build_s": t_built - t_start,
        "wall_s": time.perf_counter() - t_start,
        "summary": summary,
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
          f"{result['device']} | {result['dtype']} | sdpa | torch {result['versions']['torch']} | "
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
        ("update MFU (6 * params * tokens)", "-" if s["update_mfu"] is None else f"{100 * s['update_mfu']:.1f} %"),
        ("  LM params x tokens + vision x patches", "-" if s["update_mfu_split"] is None
         else f"{100 * s['update_mfu_split']:.1f} %"),
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

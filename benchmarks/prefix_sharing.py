"""Rollout time: plain HF ``generate`` on G prompt copies vs prefix-shared sampling.

The same prompts (P prompts, one ``--image-side`` square image each: 448 px gives 256
image tokens per prompt) and the same seed go through ``generate_completions`` both
ways (``share_prefix`` false / true). Per G it prints:

- prefill: time to the first sampled token (``max_new_tokens=1``): the plain path
  prefills the P x G prompt copies, the shared path P prompts and repeats their cache;
- rollout: the whole call with ``--new-tokens`` new tokens;
- speedup: plain / shared for each, best of ``--repeats`` runs measured side by side in
  this run (compare ratios, not absolute times: DESIGN.md, performance rules);
- peak: with ``--memory``, peak bytes allocated during one rollout (CUDA:
  ``max_memory_allocated``; CPU: profiler memory events, as in logprob_memory.py);
- same: whether both ways gave the same completions.

Usage::

    python benchmarks/prefix_sharing.py [--size tiny|small] [--generations 4 8 16]
        [--new-tokens 32] [--image-side 448] [--prompts 2] [--repeats 3]
        [--device cpu|cuda] [--threads 1] [--memory]

``--size small`` is a wider, deeper random checkpoint (hidden 256, 4 layers) built once
into the tiny-model cache, so the language model's share of the time is more realistic.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from logprob_memory import peak_bytes
from PIL import Image

from vlreason.models.loading import ModelConfig
from vlreason.models.tiny import TinySpec, tiny_model_path
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.policy import Policy, RolloutConfig

SIZES = {
    "tiny": TinySpec(),
    "small": TinySpec(text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_mlp=1024,
                      vision_hidden=64, vision_depth=2, vision_heads=2, vision_mlp=128),
}
QUESTIONS = ["How many shapes are in the picture?", "What colour is the largest object on the left?"]


def noise_png(side: int, seed: int) -> bytes:
    """A deterministic random RGB image (a realistic number of distinct patches)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def build_prompts(policy: Policy, num_prompts: int, side: int) -> PromptBatch:
    rows = [
        {"id": str(i), "images": [noise_png(side, i)], "question": QUESTIONS[i % len(QUESTIONS)],
         "answer": "", "choices": [], "boxes": []}
        for i in range(num_prompts)
    ]
    return policy.prompts(rows)


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall-clock seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def run(policy: Policy, prompts: PromptBatch, G: int, new_tokens: int, share: bool) -> RolloutBatch:
    cfg = replace(policy.rollout, share_prefix=share)
    return policy.sample(prompts, seed=0, num_generations=G, max_new_tokens=new_tokens, sampling=cfg)


def measure(policy: Policy, prompts: PromptBatch, G: int, share: bool, args: argparse.Namespace) -> dict[str, float]:
    """Best prefill (first token) and rollout seconds of one way; peak bytes with --memory."""
    device = torch.device(args.device)

    def rollout(new_tokens: int) -> RolloutBatch:
        return run(policy, prompts, G, new_tokens, share)

    rollout(args.new_tokens)  # warm-up
    result = {
        "prefill": best_time(lambda: rollout(1), args.repeats, device),
        "rollout": best_time(lambda: rollout(args.new_tokens), args.repeats, device),
    }
    if args.memory:
        result["peak"] = peak_bytes(lambda: rollout(args.new_tokens), device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--generations", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps a shared machine's timings stable)")
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    pixels = args.image_side**2
    rollout = RolloutConfig(min_pixels=pixels, max_pixels=pixels, temperature=1.0)
    path = tiny_model_path(SIZES[args.size])
    policy = Policy.load(ModelConfig(name_or_path=str(path)), rollout, device=device)
    prompts = build_prompts(policy, args.prompts, args.image_side)
    image_tokens = int(prompts.image_grid_thw.prod(-1)[0]) // policy.family.merge_size**2
    print(f"model {args.size} ({policy.family.name}, {sum(p.numel() for p in policy.model.parameters()) / 1e6:.1f}M "
          f"params, {next(policy.model.parameters()).dtype}) on {device}; P={args.prompts} prompts of "
          f"{prompts.input_ids_PT.shape[1]} tokens ({image_tokens} image tokens each); "
          f"{args.new_tokens} new tokens; best of {args.repeats}")
    header = f"{'G':>3} | {'prefill plain':>13} {'shared':>8} {'speedup':>7} | {'rollout plain':>13} {'shared':>8} {'speedup':>7}"
    if args.memory:
        header += f" | {'peak plain':>10} {'shared':>8} {'ratio':>5}"
    print(header + " | same")
    print("-" * len(header + " | same"))
    for G in args.generations:
        plain, shared = (measure(policy, prompts, G, share, args) for share in (False, True))
        same = torch.equal(run(policy, prompts, G, args.new_tokens, False).completion_ids_NT,
                           run(policy, prompts, G, args.new_tokens, True).completion_ids_NT)
        line = f"{G:>3} |"
        for stage in ("prefill", "rollout"):
            line += f" {plain[stage] * 1e3:>11.1f}ms {shared[stage] * 1e3:>6.1f}ms {plain[stage] / shared[stage]:>6.2f}x |"
        if args.memory:
            line += (f" {plain['peak'] / 2**20:>8.1f}MB {shared['peak'] / 2**20:>6.1f}MB "
                     f"{plain['peak'] / shared['peak']:>4.2f}x |")
        print(f"{line} {'yes' if same else 'NO'}")

if __name__ == "__main__":
    main()

"""Per-GPU memory plans (vlreason.train.memory) for real Qwen-VL shapes, no download.

    python benchmarks/memory_plan.py              # the table docs/scaling.md shows
    python benchmarks/memory_plan.py --json FILE  # the same figures as JSON
    python benchmarks/memory_plan.py --gpu-gib 80 # mark what does not fit an 80 GB GPU

Each model is built on the meta device (no memory, no weights) from its transformers
config class with the published sizes, so the parameter counts are the real ones:

* Qwen2.5-VL-3B-Instruct: the shape benchmarks/gpu_bench.py builds (text hidden 2048,
  36 layers, MLP 11,008, vocabulary 151,936, tied embeddings; vision depth 32, hidden
  1280, MLP 3,420, output 2048);
* Qwen2.5-VL-7B-Instruct: text hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18,944,
  vocabulary 152,064, untied LM head; the same vision tower with output 3584;
* Qwen3-VL-8B-Instruct: text hidden 4096, 36 layers, 32 heads, 8 KV heads, head dim 128,
  MLP 12,288, vocabulary 151,936, untied LM head; vision depth 27, hidden 1152, MLP 4,304,
  16 heads, patch 16, deepstack layers 8/16/24, output 4096.

LoRA counts are r x (in + out) for every targeted linear layer of the language model
(q/k/v/o/gate/up/down, rank 16: vlreason's defaults), which is what peft adds.

Setups follow vlreason's engine (vlreason/train/parallel.py, vlreason/models/loading.py):
the trained model is held in fp32 (master weights; under LoRA the frozen base too), the
compute dtype is bf16, a KL reference is a separate frozen bf16 copy (none with LoRA:
the adapter is switched off instead), FSDP2 shards it like the policy. Activations, the
rollout's KV cache and the CUDA context are not included (see vlreason/train/memory.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_bench import QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION  # noqa: E402

from vlreason.train.memory import GIB, ParamCounts, plan_memory  # noqa: E402

QWEN25_VL_7B_TEXT = dict(
    QWEN25_VL_3B_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152_064,
)
QWEN25_VL_7B_VISION = dict(QWEN25_VL_3B_VISION, out_hidden_size=3584)
QWEN3_VL_8B_TEXT = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151_936, max_position_embeddings=262_144, rms_norm_eps=1e-6, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
QWEN3_VL_8B_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, hidden_act="gelu_pytorch_tanh", in_channels=3,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24], out_hidden_size=4096,
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def meta_model(name: str) -> torch.nn.Module:
    """The model of ``name`` on the meta device, fp32 (the trained model's storage)."""
    import transformers

    if name == "Qwen2.5-VL-3B":
        cls, cfg = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig(
            text_config=dict(QWEN25_VL_3B_TEXT, tie_word_embeddings=True), vision_config=QWEN25_VL_3B_VISION,
            tie_word_embeddings=True)
    elif name == "Qwen2.5-VL-7B":
        cls, cfg = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig(
            text_config=dict(QWEN25_VL_7B_TEXT, tie_word_embeddings=False), vision_config=QWEN25_VL_7B_VISION,
            tie_word_embeddings=False)
    elif name == "Qwen3-VL-8B":
        cls, cfg = transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig(
            text_config=QWEN3_VL_8B_TEXT, vision_config=QWEN3_VL_8B_VISION, tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown model '{name}'")
    with torch.device("meta"):
        return cls._from_config(cfg, dtype=torch.float32)


def lora_elements(model: torch.nn.Module, rank: int = 16) -> tuple[int, int]:
    """(LoRA elements, LoRA tensors) for the language model's targeted linear layers."""
    elements = tensors = 0
    for name, module in model.named_modules():
        if ".visual" in f".{name}" or not isinstance(module, torch.nn.Linear):
            continue
        if name.split(".")[-1] in LORA_TARGETS:
            elements += rank * (module.in_features + module.out_features)
            tensors += 2
    return elements, tensors


SETUPS = [
    # label, strategy, processes, LoRA, reference, cpu offload
    ("1 GPU, full, KL ref", "none", 1, False, True, False),
    ("1 GPU, full, no ref", "none", 1, False, False, False),
    ("1 GPU, LoRA r16", "none", 1, True, False, False),
    ("8 GPU ddp, full, KL ref", "ddp", 8, False, True, False),
    ("2 GPU fsdp2, full, KL ref", "fsdp2", 2, False, True, False),
    ("2 GPU fsdp2 + offload, KL ref", "fsdp2", 2, False, True, True),
    ("8 GPU fsdp2, full, KL ref", "fsdp2", 8, False, True, False),
    ("16 GPU fsdp2, full, KL ref", "fsdp2", 16, False, True, False),
]


def plans(models: list[str]) -> list[dict]:
    out = []
    for name in models:
        model = meta_model(name)
        full = ParamCounts.from_model(model)
        lora, lora_tensors = lora_elements(model)
        del model
        lora_counts = ParamCounts(trainable=lora, frozen=full.total, trainable_tensors=lora_tensors,
                                  vision=full.vision, largest_unit=full.largest_unit, root=full.root)
        for label, strategy, world, use_lora, ref, offload in SETUPS:
            counts = lora_counts if use_lora else full
            plan = plan_memory(counts, strategy=strategy, world_size=world, compute_dtype=torch.bfloat16,
                               reference_params=full.total if ref and not use_lora else 0,
                               cpu_offload=offload)
            out.append({
                "model": name, "setup": label, "params_b": full.total / 1e9, "vision_b": full.vision / 1e9,
                "trainable_b": counts.trainable / 1e9,
                **{k: getattr(plan, k) / GIB for k in ("weights", "compute_copy", "gradients", "ddp_buckets",
                                                        "optimizer", "reference", "total", "host_total")},
            })
    return out


def print_table(rows: list[dict], gpu_gib: float) -> None:
    cols = [("weights", "weights"), ("compute", "compute_copy"), ("grads", "gradients"),
            ("ddp buf", "ddp_buckets"), ("AdamW", "optimizer"), ("ref", "reference"), ("total", "total")]
    current = None
    for r in rows:
        if r["model"] != current:
            current = r["model"]
            print(f"\n{current}: {r['params_b']:.2f} B parameters (vision {r['vision_b']:.2f} B); GiB per GPU")
            print(f"{'setup':<31}" + "".join(f"{h:>9}" for h, _ in cols) + f"{'host':>7}  fits {gpu_gib:g}")
        fits = "yes" if r["total"] <= gpu_gib else "NO"
        host = f"{r['host_total']:>7.1f}" if r["host_total"] else f"{'':>7}"
        print(f"{r['setup']:<31}" + "".join(f"{r[k]:>9.1f}" for _, k in cols) + host + f"  {fits}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen3-VL-8B"])
    p.add_argument("--gpu-gib", type=float, default=80.0,
                   help="GPU memory to compare the totals with (before activations)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    rows = plans(args.models)
    print_table(rows, args.gpu_gib)
    print("\nnot counted: activations, KV cache, logits chunks, CUDA context, fragmentation "
          "(vlreason/train/memory.py)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

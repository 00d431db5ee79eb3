"""The model side of ``benchmarks/gpu_bench.py``: Qwen2.5-VL-3B-Instruct's published shape
(and ``--smoke``'s toy one) built from a config with random weights, vlreason's offline
processor, the check that the installed transformers can run vlreason, the synthetic rows,
the end-of-turn suppression hook and the vision-tower counter."""

from __future__ import annotations

import inspect
import io
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
    from vlreason.models.tiny import CHAT_TEMPLATE, TinySpec, build_tokenizer
    from vlreason.models.tiny_builders import build_processor as family_processor

    tokenizer = build_tokenizer(1024)
    spec = TinySpec(min_pixels=56 * 56, max_pixels=max(image_pixels, 56 * 56))
    return family_processor("qwen2_5_vl", tokenizer, spec, CHAT_TEMPLATE)


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
        self.patches_per_image: dict[str, list[int]] = {}
        policy_model.model.visual.register_forward_hook(self.hook("policy"), with_kwargs=True)
        if reference_model is not None:
            reference_model.model.visual.register_forward_hook(self.hook("reference"), with_kwargs=True)

    def hook(self, role):
        def fn(module, args, kwargs, output):
            grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
            name = "reference" if role == "reference" else ("update" if torch.is_grad_enabled() else "rollout")
            self.counts[name] = self.counts.get(name, 0) + (int(grid.shape[0]) if grid is not None else 0)
            per_image = [int(n) for n in grid.prod(-1)] if grid is not None else []
            self.patch_rows[name] = self.patch_rows.get(name, 0) + sum(per_image)
            self.patches_per_image.setdefault(name, []).extend(per_image)

        return fn

    def pop(self) -> tuple[dict[str, int], dict[str, int], dict[str, list[int]]]:
        """Images, patch rows and patch rows of each image encoded, by pass; then reset."""
        out = (self.counts, self.patch_rows, self.patches_per_image)
        self.counts, self.patch_rows, self.patches_per_image = {}, {}, {}
        return out

"""Model-family adapters: the only place that knows a family's classes and image layout.

Everything above this module (rollout, log-probs, recipes, losses) talks to a
``Family`` and never branches on the model type. A family owns:

* its transformers classes (model, processor, image processor) and a tiny config;
* how images become vision-tower outputs (``encode_images``) and how those outputs
  are reused for several sequences without running the tower again
  (``select_images``): the G completions of one prompt share one encoding;
* the multimodal forward up to the last hidden states (``hidden_states``), so
  log-probs can be computed chunk by chunk from hidden states instead of full logits.

Adding a family is one subclass plus one ``FAMILIES`` entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    model_class_name: str
    processor_class_name: str
    video_processor_class_name: str
    patch_size: int = 14
    merge_size: int = 2

    # ---- classes -------------------------------------------------------------------
    def _tf(self, name: str) -> Any:
        return getattr(importlib.import_module("transformers"), name)

    def model_class(self) -> type:
        return self._tf(self.model_class_name)

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (patch size x spatial merge)."""
        return self.patch_size * self.merge_size

    # ---- tiny checkpoints ------------------------------------------------------------
    config_class_name = ""

    def tiny_config(self, spec, ids: dict[str, int]):
        """A small random-init config of this family with the tokenizer's special ids."""
        return self._tf(self.config_class_name)(
            text_config=self.tiny_text(spec, ids),
            vision_config=self.tiny_vision(spec),
            **self._token_ids(ids),
            tie_word_embeddings=False,
        )

    def tiny_vision(self, spec) -> dict[str, Any]:
        raise NotImplementedError

    def _vision_grid(self) -> dict[str, int]:
        return {"patch_size": self.patch_size, "spatial_merge_size": self.merge_size, "temporal_patch_size": 2}

    def _vision_sizes(self, spec) -> dict[str, Any]:
        """Vision-tower sizes in the Qwen2.5-VL / Qwen3-VL naming."""
        return {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_mlp,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.text_hidden,
            **self._vision_grid(),
        }

    def tiny_text(self, spec, ids: dict[str, int]) -> dict[str, Any]:
        head_dim = spec.text_hidden // spec.text_heads
        return {
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_mlp,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                # M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
                "mrope_section": _mrope_sections(head_dim),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        }

    def _token_ids(self, ids: dict[str, int]) -> dict[str, int]:
        return {
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
        }

    def build_processor(self, tokenizer, spec, chat_template: str):
        image_processor = self._tf("Qwen2VLImageProcessor")(
            min_pixels=spec.min_pixels,
            max_pixels=spec.max_pixels,
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=2,
        )
        video_processor = self._tf(self.video_processor_class_name)(
            patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=2
        )
        processor_cls = self._tf(self.processor_class_name)
        return processor_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=chat_template,
        )

    # ---- runtime ---------------------------------------------------------------------
    @staticmethod
    def core(model) -> Any:
        """The multimodal base model (``.visual``, ``.language_model``) under any wrapper."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model

    @staticmethod
    def lm_head(model) -> torch.nn.Module:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.lm_head

    def encode_images(self, model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """Run the vision tower once over all given images; per-image outputs."""
        return self.core(model).get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def select_images(self, encoded, index: list[int]):
        """Encoder outputs for images ``index`` (repeats allowed), without re-encoding."""
        out = type(encoded)(**{k: v for k, v in encoded.items()})
        out.pooler_output = tuple(encoded.pooler_output[i] for i in index)
        deepstack = getattr(encoded, "deepstack_features", None)
        if deepstack is not None:
            out.deepstack_features = [tuple(layer[i] for i in index) for layer in deepstack]
        return out

    def hidden_states(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        encoded=None,
    ) -> torch.Tensor:
        """Last hidden states [B, T, H] of the multimodal forward, images pre-encoded."""
        kwargs = {}
        if encoded is not None:
            kwargs["mm_encoder_outputs"] = {"image": encoded}
        out = self.core(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state


def _mrope_sections(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


class Qwen2VLFamily(Family):
    config_class_name = "Qwen2VLConfig"

    def tiny_vision(self, spec) -> dict[str, Any]:
        return {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_hidden,
            "hidden_size": spec.text_hidden,  # output size of the merger
            "num_heads": spec.vision_heads,
            "mlp_ratio": max(1, spec.vision_mlp // spec.vision_hidden),
            **self._vision_grid(),
        }


class Qwen25VLFamily(Family):
    config_class_name = "Qwen2_5_VLConfig"

    def tiny_vision(self, spec) -> dict[str, Any]:
        return {
            **self._vision_sizes(spec),
            "window_size": 112,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }


class Qwen3VLFamily(Family):
    config_class_name = "Qwen3VLConfig"

    def tiny_text(self, spec, ids: dict[str, int]) -> dict[str, Any]:
        text = super().tiny_text(spec, ids)
        text["head_dim"] = spec.text_hidden // spec.text_heads
        text["rope_parameters"]["mrope_interleaved"] = True
        return text

    def tiny_vision(self, spec) -> dict[str, Any]:
        return {**self._vision_sizes(spec), "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Qwen2VLFamily(
        "qwen2_vl", "qwen2_vl", "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor", "Qwen2VLVideoProcessor",
    ),
    "qwen2_5_vl": Qwen25VLFamily(
        "qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor",
    ),
    "qwen3_vl": Qwen3VLFamily(
        "qwen3_vl", "qwen3_vl", "Qwen3VLForConditionalGeneration",
        "Qwen3VLProcessor", "Qwen3VLVideoProcessor", patch_size=16,
    ),
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


MIN_TRANSFORMERS = (5, 24)


def check_transformers() -> None:
    """Older transformers silently ignore pre-encoded images (``mm_encoder_outputs``,
    5.18) or name the KV cache differently (``cache``, 5.24): refuse them loudly."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TRANSFORMERS:
        raise RuntimeError(
            f"vlreason needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, found "
            f"{transformers.__version__}: older versions ignore pre-encoded images without an error"
        )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}'; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_config(config) -> Family:
    """The adapter for a loaded model's config (by ``model_type``)."""
    check_transformers()
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"model_type '{model_type}' is not a supported family; supported: "
            f"{', '.join(_BY_MODEL_TYPE)}. Adding one is a Family subclass in vlreason/models/families.py"
        )
    return _BY_MODEL_TYPE[model_type]

"""Model-family adapters: the only place that knows a family's classes, tokens, positions
and image layout.

Everything above this module (rollout, log-probs, recipes, losses) talks to a
``Family`` and never branches on the model type. A family owns:

* its model class and ``model_type`` (how a loaded checkpoint finds its adapter);
* its tokens: the end-of-turn token (``end_ids``) and the vision tokens a completion must
  never contain (``suppress_ids``);
* prompt positions: ``prompt_positions`` gives ``[R, P, T]`` positions of left-padded
  prompts (R = 3 M-RoPE rows for the Qwen families, R = 1 plain row for InternVL), and
  ``model_positions`` turns such a tensor into the model's ``position_ids``; a generated
  token's position is the prompt's last position + 1 + step in every row;
* the pixel-tensor layout: how many rows of ``pixel_values`` each image occupies
  (``pixel_rows``: Qwen's flattened patches, InternVL's 448x448 tiles), the per-image
  metadata the encoder needs (``image_meta``: Qwen's ``image_grid_thw``, InternVL's tile
  counts), how images become vision-tower outputs (``encode_images``) and how those are
  reused for several sequences without running the tower again (``select_images``,
  ``image_inputs``): the G completions of one prompt share one encoding;
* the multimodal forward up to the last hidden states (``hidden_states``), so
  log-probs can be computed chunk by chunk from hidden states instead of full logits;
* which modules are the vision tower and the projector (freezing, LoRA, counting).

Tiny random checkpoints of each family are built by :mod:`vlreason.models.tiny_builders`,
not here. Adding a family is one subclass (or instance) plus one ``FAMILIES`` entry, and
a tiny builder for its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any

import torch

QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
INTERNVL_VISION_TOKENS = ("<IMG_CONTEXT>", "<img>", "</img>", "<video>")


def _unwrap(model) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_ids(tokenizer, tokens) -> list[int]:
    """Ids of ``tokens`` the tokenizer knows (unknown ones left out), sorted."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = {tokenizer.convert_tokens_to_ids(t) for t in tokens}
    return sorted(i for i in ids if i is not None and i >= 0 and i != unk)


@dataclass(frozen=True)
class Family:
    """What every family shares; the layout-specific parts are in the subclasses."""

    name: str
    model_type: str
    model_class_name: str
    patch_size: int = 14
    merge_size: int = 2
    end_of_turn: str = "<|im_end|>"
    vision_tokens: tuple[str, ...] = QWEN_VISION_TOKENS
    # Module-name parts of the vision tower and projector (LoRA leaves them out by default).
    vision_module_names: tuple[str, ...] = ("visual",)
    # Read from the loaded checkpoint's config by ``for_config`` (-1 / 0: not configured).
    image_token_id: int = -1
    image_seq_length: int = 0  # image tokens per tile (InternVL)

    def for_config(self, config) -> Family:
        """This adapter with the checkpoint's image-token id (and tokens per tile)."""
        return replace(
            self,
            image_token_id=int(getattr(config, "image_token_id", -1)),
            image_seq_length=int(getattr(config, "image_seq_length", 0) or 0),
        )

    # ---- classes ---------------------------------------------------------------------
    def model_class(self) -> type:
        return getattr(importlib.import_module("transformers"), self.model_class_name)

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of this (patch size x spatial merge)."""
        return self.patch_size * self.merge_size

    # ---- tokens ----------------------------------------------------------------------
    def end_ids(self, tokenizer) -> list[int]:
        """Tokens that end a completion: the end-of-turn token and the tokenizer's EOS."""
        ids = set(token_ids(tokenizer, [self.end_of_turn]))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id >= 0:
            ids.add(tokenizer.eos_token_id)
        return sorted(ids)

    def suppress_ids(self, tokenizer) -> list[int]:
        """Vision tokens: a completion holding one would corrupt the image-token layout
        when it is scored ("Image features and image tokens do not match")."""
        return token_ids(tokenizer, self.vision_tokens)

    # ---- modules ---------------------------------------------------------------------
    @staticmethod
    def core(model) -> Any:
        """The multimodal base model (vision tower, language model) under any wrapper."""
        return _unwrap(model).model

    @staticmethod
    def lm_head(model) -> torch.nn.Module:
        return _unwrap(model).lm_head

    def language_layers(self, model) -> list[torch.nn.Module]:
        return list(self.core(model).language_model.layers)

    def is_vision_parameter(self, name: str) -> bool:
        """Whether parameter / module ``name`` belongs to the vision tower or projector."""
        return any(f".{part}." in f".{name}." for part in self.vision_module_names)

    # ---- repeated prompts ---------------------------------------------------------------
    def repeat_cache(self, cache, repeats: int) -> None:
        """Repeat each prompt's cache ``repeats`` times along the batch (prompt-major)."""
        cache.batch_repeat_interleave(repeats)

    # ---- pixel layout (common part) -----------------------------------------------------
    def pixel_rows(self, prompts) -> list[int]:
        raise NotImplementedError

    def image_meta(self, prompts, image_index: list[int]):
        raise NotImplementedError

    def pixel_values_of(self, prompts, image_index: list[int]) -> torch.Tensor:
        """The ``pixel_values`` rows of images ``image_index``, in that order."""
        parts = torch.split(prompts.pixel_values, self.pixel_rows(prompts))
        return torch.cat([parts[i] for i in image_index])

    def select_images(self, encoded, index: list[int]):
        """Encoder outputs for images ``index`` (repeats allowed), without re-encoding.
        ``encoded.pooler_output`` holds one tensor per image."""
        out = type(encoded)(**{k: v for k, v in encoded.items()})
        out.pooler_output = tuple(encoded.pooler_output[i] for i in index)
        deepstack = getattr(encoded, "deepstack_features", None)
        if deepstack is not None:
            out.deepstack_features = [tuple(layer[i] for i in index) for layer in deepstack]
        return out


@dataclass(frozen=True)
class QwenVLFamily(Family):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5: M-RoPE positions from ``get_rope_index``,
    ``pixel_values`` as flattened patches (``image_grid_thw`` rows per image), the tower
    at ``model.visual`` with its merger as projector."""

    position_rows = 3  # M-RoPE: temporal, height, width

    def prompt_positions(self, model, prompts) -> torch.Tensor:
        """M-RoPE positions [3, P, T] of the left-padded prompts (padding positions are 0)."""
        mm_types = prompts.mm_token_type_ids_PT
        if mm_types is None:  # text only: every token is text
            mm_types = torch.zeros_like(prompts.input_ids_PT)
        positions, _ = self.core(model).get_rope_index(
            prompts.input_ids_PT, mm_types, prompts.image_grid_thw, attention_mask=prompts.attention_mask_PT
        )
        return positions

    @staticmethod
    def model_positions(positions_RBT: torch.Tensor) -> torch.Tensor:
        return positions_RBT

    def pixel_rows(self, prompts) -> list[int]:
        return qwen_pixel_rows(prompts.image_grid_thw)

    def image_meta(self, prompts, image_index: list[int]):
        return prompts.image_grid_thw[image_index]

    def vision_tower(self, model) -> torch.nn.Module:
        return self.core(model).visual

    def projector(self, model) -> torch.nn.Module:
        return self.core(model).visual.merger

    def vision_modules(self, model, include_projector: bool) -> list[torch.nn.Module]:
        visual = self.vision_tower(model)
        return [m for name, m in visual.named_children() if include_projector or name != "merger"]

    def vision_blocks(self, model) -> list[torch.nn.Module]:
        return list(self.vision_tower(model).blocks)

    def encode_images(self, model, pixel_values: torch.Tensor, image_meta: torch.Tensor):
        """Run the vision tower once over all given images; per-image outputs."""
        return self.core(model).get_image_features(pixel_values, image_meta, return_dict=True)

    def image_inputs(self, encoded, image_meta) -> dict[str, Any]:
        """Forward kwargs that hand pre-encoded images to the model."""
        return {"mm_encoder_outputs": {"image": encoded}, "image_grid_thw": image_meta}

    def hidden_states(self, model, input_ids, attention_mask, mm_token_type_ids, image_meta, encoded=None):
        """Last hidden states [B, T, H] of the multimodal forward, images pre-encoded
        (the model computes its M-RoPE positions from the ids and grids)."""
        kwargs = self.image_inputs(encoded, image_meta) if encoded is not None else {}
        out = self.core(model)(
            input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
            use_cache=False, **kwargs,
        )
        return out.last_hidden_state


def qwen_pixel_rows(image_grid_thw: torch.Tensor) -> list[int]:
    """Rows of Qwen's patch-flattened ``pixel_values`` each image occupies (t x h x w)."""
    if image_grid_thw is None:
        raise ValueError("these prompts have no image_grid_thw: their pixel_values are not in the Qwen "
                         "patch layout (InternVL: one row per tile); the family's pixel_rows(prompts) knows "
                         "the layout, and Qwen-layout code (DVRP's noised view) does not support this family")
    return image_grid_thw.prod(-1).tolist()


@dataclass(frozen=True)
class Qwen35Family(QwenVLFamily):
    """Qwen3.5: Qwen3-VL's vision side; the language model mixes full attention with
    Gated DeltaNet (linear attention) layers, whose cache holds convolution and
    recurrent states that ``batch_repeat_interleave`` does not repeat."""

    def repeat_cache(self, cache, repeats: int) -> None:
        for layer in cache.layers:
            if hasattr(layer, "conv_states"):  # linear-attention state (and maybe keys/values)
                _repeat_linear_states(layer, repeats)
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
                layer.values = layer.values.repeat_interleave(repeats, dim=0)


def _repeat_linear_states(layer, repeats: int) -> None:
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            layer.conv_states[i] = layer.conv_states[i].repeat_interleave(repeats, dim=0)
        if layer.is_recurrent_states_initialized[i]:
            layer.recurrent_states[i] = layer.recurrent_states[i].repeat_interleave(repeats, dim=0)


@dataclass(frozen=True)
class InternVLFamily(Family):
    """InternVL (HF ``InternVLForConditionalGeneration``): a Qwen2/Llama language model
    with plain 1-D RoPE positions; each image is cut into fixed-size tiles (plus a
    thumbnail) and ``pixel_values`` holds one [3, S, S] row per tile; every tile becomes
    ``image_seq_length`` ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>``. The
    tower is ``model.vision_tower``, the projector ``model.multi_modal_projector``.

    Pre-encoded images are supported (``mm_encoder_outputs``): the tiles of all distinct
    images run through the tower once and are split per image by tile count."""

    position_rows = 1  # plain RoPE

    def prompt_positions(self, model, prompts) -> torch.Tensor:
        """Plain positions [1, P, T]: 0, 1, ... over the real tokens, 0 on left padding."""
        mask = prompts.attention_mask_PT.long()
        return ((mask.cumsum(-1) - 1).clamp(min=0) * mask)[None]

    @staticmethod
    def model_positions(positions_RBT: torch.Tensor) -> torch.Tensor:
        return positions_RBT[0]

    def tiles_per_image(self, prompts) -> list[int]:
        """Tiles of each image, read from the prompts' tokens: image k is the k-th run of
        ``<IMG_CONTEXT>`` tokens (prompt-major, the order of ``pixel_values``)."""
        if prompts.pixel_values is None:
            return []
        if self.image_token_id < 0 or self.image_seq_length <= 0:
            raise RuntimeError("the InternVL adapter needs the checkpoint's image_token_id and image_seq_length: "
                               "get it with family_for_config(model.config)")
        context_id, per_tile = self.image_token_id, self.image_seq_length
        tiles = []
        for ids in prompts.input_ids_PT.tolist():
            run = 0
            for token in [*ids, -1]:
                if token == context_id:
                    run += 1
                elif run:
                    tiles.append(run // per_tile)
                    run = 0
        return tiles

    def pixel_rows(self, prompts) -> list[int]:
        return self.tiles_per_image(prompts)

    def image_meta(self, prompts, image_index: list[int]):
        tiles = self.tiles_per_image(prompts)
        return torch.tensor([tiles[i] for i in image_index], dtype=torch.long)

    def vision_tower(self, model) -> torch.nn.Module:
        return self.core(model).vision_tower

    def projector(self, model) -> torch.nn.Module:
        return self.core(model).multi_modal_projector

    def vision_modules(self, model, include_projector: bool) -> list[torch.nn.Module]:
        return [self.vision_tower(model), *([self.projector(model)] if include_projector else [])]

    def vision_blocks(self, model) -> list[torch.nn.Module]:
        return list(self.vision_tower(model).encoder.layer)

    def encode_images(self, model, pixel_values: torch.Tensor, image_meta: torch.Tensor):
        """All tiles through the tower in one call; ``pooler_output`` split per image
        (``image_meta`` = tiles per image), each [tiles x tokens per tile, hidden]."""
        out = self.core(model).get_image_features(pixel_values=pixel_values, return_dict=True)
        per_tile = out.pooler_output  # [tiles, tokens per tile, hidden]
        sizes = [int(n) for n in image_meta.tolist()]
        out.pooler_output = tuple(part.flatten(0, 1) for part in torch.split(per_tile, sizes))
        return out

    def image_inputs(self, encoded, image_meta) -> dict[str, Any]:
        merged = type(encoded)(**{k: v for k, v in encoded.items()})
        merged.pooler_output = torch.cat(list(encoded.pooler_output))[None]  # [1, tokens, hidden]
        return {"mm_encoder_outputs": {"image": merged}}

    def hidden_states(self, model, input_ids, attention_mask, mm_token_type_ids, image_meta, encoded=None):
        """Last hidden states [B, T, H]; positions count real tokens (left padding excluded)."""
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
        kwargs = self.image_inputs(encoded, image_meta) if encoded is not None else {}
        out = self.core(model)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False, **kwargs
        )
        return out.last_hidden_state


def _qwen(name: str, model_class_name: str, **kw) -> QwenVLFamily:
    cls = kw.pop("cls", QwenVLFamily)
    return cls(name, name, model_class_name, **kw)


FAMILIES: dict[str, Family] = {
    "qwen2_vl": _qwen("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": _qwen("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": _qwen("qwen3_vl", "Qwen3VLForConditionalGeneration", patch_size=16),
    "qwen3_5": _qwen("qwen3_5", "Qwen3_5ForConditionalGeneration", patch_size=16, cls=Qwen35Family),
    "internvl": InternVLFamily(
        "internvl", "internvl", "InternVLForConditionalGeneration", patch_size=14, merge_size=2,
        vision_tokens=INTERNVL_VISION_TOKENS, vision_module_names=("vision_tower", "multi_modal_projector"),
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
    return _BY_MODEL_TYPE[model_type].for_config(config)

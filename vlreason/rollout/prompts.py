"""Canonical rows -> chat prompts -> one ``PromptBatch`` (images resized once).

Images are decoded and resized to the run's single ``PixelBudget`` here, once per
prompt; the processor is then told not to resize again, so rollout, log-prob
recompute, reference and teacher all see exactly the same image tokens.

Image placement: a question with ``<image>`` placeholders
(:data:`vlreason.data.schema.IMAGE_PLACEHOLDER`, one per image) becomes a user turn
whose image and text parts alternate at those positions, the k-th placeholder holding
the k-th image; the placeholders themselves never reach the prompt text. A question
without placeholders gives the images first, then the text. A row whose placeholder
count differs from its image count is a ValueError (``decode_row_images`` checks it,
so callers that skip undecodable rows skip these too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlreason.config import doc
from vlreason.data.images import decode_image
from vlreason.data.schema import IMAGE_PLACEHOLDER, image_placeholders
from vlreason.rollout.batch import PromptBatch
from vlreason.views.budget import PixelBudget

# Stands in for the question's placeholders while the template is filled, so that only
# the question's own placeholders (not the template's or the choices' text) place images.
_IMAGE_SLOT = "\x00image\x00"


@dataclass
class PromptConfig:
    system_prompt: str = doc("System prompt; empty: none of ours (see template_default_system).", "")
    template_default_system: bool = doc(
        "With system_prompt empty, keep the system turn a chat template inserts on its own (Qwen2-VL "
        "and Qwen2.5-VL insert 'You are a helpful assistant.'); false: no system turn at all "
        "(Vision-R1's 'no system prompt').", True)
    template: str = doc(
        "User text; {question} is replaced by the row's question (and {choices} by its options).",
        "{question}",
    )
    max_prompt_tokens: int = doc(
        "Rows whose prompt (image tokens included) is longer are skipped with a warning; "
        "prompts are never cut through image tokens.",
        2048,
    )


def decode_row_images(row: dict[str, Any]) -> list[Image.Image]:
    """The row's images as RGB PIL images, decoded by the same strict decoder as
    preprocessing (``vlreason.data.images.decode_image``: truncated files, bad EXIF,
    palettes, alpha and 16-bit images handled alike); the size limit was applied when the
    dataset was built, so none is applied again here."""
    images = []
    for i, data in enumerate(row.get("images") or []):
        try:
            images.append(decode_image(data, max_pixels=None))
        except ValueError as err:  # ImageError: a dataset edited after preprocessing
            raise ValueError(f"row '{row.get('id')}': image {i} no longer decodes ({err})") from err
    check_placement(row, len(images))
    return images


def check_placement(row: dict[str, Any], num_images: int) -> None:
    """ValueError unless the question places no image or exactly ``num_images``."""
    count = image_placeholders(row["question"])
    if count and count != num_images:
        raise ValueError(
            f"row '{row.get('id')}': the question has {count} {IMAGE_PLACEHOLDER} placeholders "
            f"for {num_images} images"
        )


def build_messages(row: dict[str, Any], num_images: int, cfg: PromptConfig, *, assistant: str | None = None) -> list[dict]:
    """System turn (if any), the user turn with ``num_images`` images placed as the
    question says (see the module docstring), and the assistant turn when given."""
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]})
    messages.append({"role": "user", "content": user_content(row, num_images, cfg)})
    if assistant is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


def user_content(row: dict[str, Any], num_images: int, cfg: PromptConfig) -> list[dict]:
    """The user turn's parts: images and text interleaved at the question's placeholders,
    or all images then the text when it has none. Empty text parts are left out."""
    check_placement(row, num_images)
    question = row["question"]
    placed = image_placeholders(question) > 0
    choices = row.get("choices") or []
    text = cfg.template.format(
        question=question.replace(IMAGE_PLACEHOLDER, _IMAGE_SLOT) if placed else question,
        choices="\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)),
    )
    if placed and text.count(_IMAGE_SLOT) != num_images:  # a template without (or with two) {question}
        text, placed = text.replace(_IMAGE_SLOT, ""), False
    if not placed:
        return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    content: list[dict] = []
    for i, part in enumerate(text.split(_IMAGE_SLOT)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return content


_SYSTEM_HEAD, _TURN_END = "<|im_start|>system\n", "<|im_end|>"


def render_prompt(processor, messages: list[dict], cfg: PromptConfig) -> str:
    """The chat template applied to ``messages`` with the assistant turn opened. When the
    config asks for no system turn at all, a system turn the template put in front of a
    conversation that has none (ChatML, as the Qwen templates write it) is removed."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if cfg.system_prompt or cfg.template_default_system or messages[0]["role"] == "system":
        return text
    if text.startswith(_SYSTEM_HEAD):
        end = text.find(_TURN_END)
        if end >= 0:
            text = text[end + len(_TURN_END):]
            text = text[1:] if text.startswith("\n") else text
    return text


def strip_images(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "images"}


def build_prompt_batch(
    rows: list[dict[str, Any]],
    processor,
    budget: PixelBudget,
    cfg: PromptConfig,
    *,
    images: list[list[Image.Image]] | None = None,
) -> PromptBatch:
    """Tokenise ``rows`` as left-padded generation prompts.

    ``images`` replaces the rows' own images (same count per row), for image views
    (crops, masks, noise) that must be scored with the same text.
    """
    if not rows:
        raise ValueError("build_prompt_batch needs at least one row")
    for row in rows:
        refuse_special_tokens(row, processor.tokenizer)
    per_row = images if images is not None else [decode_row_images(r) for r in rows]
    resized = [[budget.resize(img) for img in imgs] for imgs in per_row]
    texts = [render_prompt(processor, build_messages(r, len(imgs), cfg), cfg) for r, imgs in zip(rows, resized)]
    flat = [img for imgs in resized for img in imgs]
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        text=texts, images=flat or None, return_tensors="pt", padding=True, do_resize=False
    )
    return PromptBatch(
        input_ids_PT=inputs["input_ids"],
        attention_mask_PT=inputs["attention_mask"],
        mm_token_type_ids_PT=inputs.get("mm_token_type_ids"),
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        images_per_prompt=[len(imgs) for imgs in resized],
        rows=[strip_images(r) for r in rows],
    )


def refuse_special_tokens(row: dict[str, Any], tokenizer) -> None:
    """A question or choice holding one of the tokenizer's special tokens as text
    (``<|image_pad|>``, ``<|im_end|>``...) would be read as that token: an extra image
    slot whose features do not exist, or a turn the user did not write. Such a row is
    refused (``ValueError`` naming the row and the token; the recipes skip and count it)
    rather than fed to the model."""
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    texts = [str(row.get("question", "")), *(str(c) for c in row.get("choices") or [])]
    for token in special:
        if any(token in text for text in texts):
            raise ValueError(f"row '{row.get('id')}': its question or choices contain the special token "
                             f"'{token}' as text; remove it from the data")


def prompt_lengths(rows: list[dict[str, Any]], processor, budget: PixelBudget, cfg: PromptConfig) -> list[int]:
    """Token length of each row's prompt, image tokens included (without running the model)."""
    lengths = []
    for row in rows:
        batch = build_prompt_batch([row], processor, budget, cfg)
        lengths.append(int(batch.attention_mask_PT.sum()))
    return lengths


def tokenize_targets(processor, texts: list[str], *, max_tokens: int | None = None,
                     end_of_turn: str = "<|im_end|>") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assistant targets + end-of-turn token (the family's: ``policy.family.end_of_turn``;
    ``<|im_end|>`` for every family so far), right-padded: (ids, mask, truncated)."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(end_of_turn)
    # A target is text: a special token written in it ("<|image_pad|>", "<|im_end|>") is
    # tokenised as its characters, never as the token (no image slot without features,
    # no early end of turn)
    seqs = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos] for t in texts]
    truncated = [max_tokens is not None and len(s) > max_tokens for s in seqs]
    if max_tokens is not None:
        seqs = [s[:max_tokens] for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, torch.tensor(truncated)

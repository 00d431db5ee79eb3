"""Canonical rows -> chat prompts -> one ``PromptBatch`` (images resized once).

Images are decoded and resized to the run's single ``PixelBudget`` here, once per
prompt; the processor is then told not to resize again, so rollout, log-prob
recompute, reference and teacher all see exactly the same image tokens.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlreason.config import doc
from vlreason.rollout.batch import PromptBatch
from vlreason.views.budget import PixelBudget


@dataclass
class PromptConfig:
    system_prompt: str = doc("System prompt; empty for none (Vision-R1 uses none).", "")
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
    """The row's images as RGB PIL images (rows come from a validated canonical dataset)."""
    images = []
    for i, data in enumerate(row.get("images") or []):
        try:
            with Image.open(io.BytesIO(data)) as img:
                images.append(img.convert("RGB"))
        except Exception as err:  # a dataset edited after preprocessing
            raise ValueError(f"row '{row.get('id')}': image {i} no longer decodes ({err})") from err
    return images


def build_messages(row: dict[str, Any], num_images: int, cfg: PromptConfig, *, assistant: str | None = None) -> list[dict]:
    choices = row.get("choices") or []
    text = cfg.template.format(
        question=row["question"],
        choices="\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)),
    )
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]})
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    if assistant is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


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
    per_row = images if images is not None else [decode_row_images(r) for r in rows]
    resized = [[budget.resize(img) for img in imgs] for imgs in per_row]
    texts = [
        processor.apply_chat_template(build_messages(r, len(imgs), cfg), add_generation_prompt=True, tokenize=False)
        for r, imgs in zip(rows, resized)
    ]
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


def prompt_lengths(rows: list[dict[str, Any]], processor, budget: PixelBudget, cfg: PromptConfig) -> list[int]:
    """Token length of each row's prompt, image tokens included (without running the model)."""
    lengths = []
    for row in rows:
        batch = build_prompt_batch([row], processor, budget, cfg)
        lengths.append(int(batch.attention_mask_PT.sum()))
    return lengths


def tokenize_targets(processor, texts: list[str], *, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assistant targets + end-of-turn token, right-padded: (ids, mask, truncated)."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
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

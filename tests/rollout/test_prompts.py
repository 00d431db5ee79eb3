"""Prompt building: ``<image>`` placeholders place each image inside the user text (in
order, several per row), never reach the prompt as text; rows without placeholders keep
the images-first layout."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlreason.models.loading import load_processor
from vlreason.rollout.prompts import (
    PromptConfig,
    build_messages,
    build_prompt_batch,
    decode_row_images,
)
from vlreason.views.budget import PixelBudget

VISION = "<|vision_start|>{}<|vision_end|>"


def _png(size: tuple[int, int], colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _kinds(content: list[dict]) -> list[str]:
    return [part["text"] if part["type"] == "text" else "IMG" for part in content]


def test_placeholders_interleave_images_and_text():
    row = {"id": "r", "question": "<image>Left, <image> right: which is bigger?", "choices": []}
    user = build_messages(row, 2, PromptConfig())[-1]
    assert user["role"] == "user"
    assert _kinds(user["content"]) == ["IMG", "Left, ", "IMG", " right: which is bigger?"]


def test_template_and_choices_around_placed_images():
    cfg = PromptConfig(template="Q: {question}\n{choices}", system_prompt="sys")
    row = {"id": "r", "question": "A <image> B <image>", "choices": ["x", "y"]}
    messages = build_messages(row, 2, cfg, assistant="done")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert _kinds(messages[1]["content"]) == ["Q: A ", "IMG", " B ", "IMG", "\nA. x\nB. y"]


def test_rows_without_placeholders_put_images_first():
    row = {"id": "r", "question": "How many?", "choices": []}
    assert _kinds(build_messages(row, 2, PromptConfig())[-1]["content"]) == ["IMG", "IMG", "How many?"]


def test_template_without_question_drops_placeholders_and_puts_images_first():
    row = {"id": "r", "question": "<image> and <image>", "choices": []}
    content = build_messages(row, 2, PromptConfig(template="Describe."))[-1]["content"]
    assert _kinds(content) == ["IMG", "IMG", "Describe."]


def test_placeholder_count_mismatch_is_a_value_error():
    row = {"id": "r7", "question": "<image> vs <image>", "choices": [], "images": [_png((28, 28))]}
    with pytest.raises(ValueError, match="r7.*2 <image> placeholders for 1 images"):
        build_messages(row, 1, PromptConfig())
    with pytest.raises(ValueError, match="r7"):  # callers that skip bad rows catch this
        decode_row_images(row)


@pytest.fixture(scope="module")
def processor(tiny_path):
    return load_processor(str(tiny_path))


def _prompt_text(batch, processor, index: int = 0) -> str:
    ids = batch.input_ids_PT[index][batch.attention_mask_PT[index].bool()]
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def test_image_pad_tokens_sit_at_the_placeholders_in_order(processor):
    budget = PixelBudget(min_pixels=28 * 28, max_pixels=112 * 112, factor=28)
    wide, square = _png((112, 56)), _png((56, 56), (0, 0, 255))  # 8 and 4 image tokens
    placed = {"id": "p", "question": "Left:<image> then<image> which is wider?", "answer": "1",
              "choices": [], "images": [wide, square]}
    plain = {"id": "q", "question": "How many?", "answer": "2", "choices": [], "images": [square, wide]}
    batch = build_prompt_batch([placed, plain], processor, budget, PromptConfig())

    merge = processor.image_processor.merge_size ** 2
    tokens = [int(n) // merge for n in batch.image_grid_thw.prod(-1)]
    assert tokens == [8, 4, 4, 8], "images must reach the processor in row order"
    pad = "<|image_pad|>"
    text = _prompt_text(batch, processor, 0)
    assert "<image>" not in text
    assert ("Left:" + VISION.format(pad * 8) + " then" + VISION.format(pad * 4) + " which is wider?") in text
    assert text.index("Left:") < text.index(pad) < text.index("which is wider?")

    plain_text = _prompt_text(batch, processor, 1)  # no placeholders: images first, as before
    assert (VISION.format(pad * 4) + VISION.format(pad * 8) + "How many?") in plain_text
    assert batch.images_per_prompt == [2, 2]


def test_a_special_token_written_in_the_question_or_choices_is_refused(processor):
    budget = PixelBudget(56 * 56, 112 * 112)
    image = _png((56, 56))
    for field, value in (("question", "What is <|image_pad|> here?"), ("choices", ["red", "<|im_end|>"])):
        row = {"id": "hostile", "question": "Which colour?", "answer": "A", "images": [image], "choices": []}
        row[field] = value
        with pytest.raises(ValueError, match=r"row 'hostile'.*special token '<\|(image_pad|im_end)\|>'"):
            build_prompt_batch([row], processor, budget, PromptConfig())


def test_a_special_token_written_in_a_target_is_text_not_the_token(processor):
    from vlreason.rollout.prompts import tokenize_targets

    text = "<think>see <|image_pad|></think><answer><|vision_start|>red<|im_end|></answer>"
    ids, mask, truncated = tokenize_targets(processor, [text, "short"])
    tok = processor.tokenizer
    specials = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>")}
    row = ids[0][mask[0].bool()].tolist()
    assert row[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the one real end of turn, appended
    assert not specials & set(row[:-1])
    assert tok.decode(row[:-1]) == text

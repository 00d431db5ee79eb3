"""`vlreason tiny-model` output loads with transformers' Auto classes and generates
from an image prompt, for each family the installed transformers supports."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlreason.cli import main
from vlreason.models.tiny import FAMILIES, family_available


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_and_generates(tmp_path, family):
    ok, why = family_available(family)
    if not ok:
        pytest.skip(why)
    out = tmp_path / family
    assert main(["tiny-model", str(out), "--family", family, "--seed", "3"]) == 0
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.model_type == family
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 112), "red")], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if family == "internvl":  # tiles of 56 px (4 of them + a thumbnail), image_seq_length tokens each
        assert inputs["pixel_values"].shape == (5, 3, 56, 56)
        assert image_tokens == model.config.image_seq_length * 5
    else:  # Qwen: one token per 2 x 2 merged patches
        assert image_tokens == int(inputs["image_grid_thw"].prod() // 4)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    # reasoning tags are single tokens that survive decoding
    tok = processor.tokenizer
    ids = tok("<think>x</think><answer>3</answer>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think><answer>3</answer>"


def test_tiny_model_deterministic_for_seed(tmp_path):
    assert main(["tiny-model", str(tmp_path / "a"), "--seed", "1"]) == 0
    assert main(["tiny-model", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert main(["tiny-model", str(tmp_path / "c"), "--seed", "2"]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_big_vocab_variant(tmp_path):
    assert main(["tiny-model", str(tmp_path / "big"), "--vocab-size", "151936"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "big")
    assert model.get_output_embeddings().weight.shape[0] == 151936


def test_vocab_too_small_is_a_clear_error(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "x"), "--vocab-size", "100"]) == 2
    assert "vocab-size" in capsys.readouterr().err


def test_cached_path_is_built_once_then_reused(tmp_path, monkeypatch):
    import vlreason.models.tiny as tiny

    monkeypatch.setenv("VLREASON_CACHE", str(tmp_path))
    builds = []

    def counting_build(path, spec):
        builds.append(spec.seed)
        return real_build(path, spec)

    real_build = tiny.build_tiny_model
    monkeypatch.setattr(tiny, "build_tiny_model", counting_build)
    first = tiny.tiny_model_path(seed=5)
    assert first.parent == tmp_path / "tiny-models" and builds == [5]
    assert json.loads((first / "vlreason_tiny.json").read_text())["seed"] == 5
    digest = _digest(first)
    assert tiny.tiny_model_path(seed=5) == first and builds == [5]  # reused, not rebuilt
    assert _digest(first) == digest
    other = tiny.tiny_model_path(seed=6)
    assert other != first and builds == [5, 6]
    # a folder left without its marker (a build that died) is rebuilt, not trusted
    (other / "vlreason_tiny.json").unlink()
    (other / "model.safetensors").write_bytes(b"half-written")
    assert tiny.tiny_model_path(seed=6) == other and builds == [5, 6, 6]
    assert load_file(str(other / "model.safetensors"))  # parses: the half-written file was replaced

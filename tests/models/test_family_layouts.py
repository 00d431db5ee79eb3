"""Families own their layout: InternVL's plain positions and tile layout give the same
log-probs as a plain HF forward on raw pixels, its adapter needs the checkpoint's token
ids, and Qwen3.5 / InternVL tiny checkpoints go through `vlreason tiny-model`, one
`vlreason train grpo` step and `vlreason eval`.

Qwen3.5 and InternVL in the family-general rollout tests: tests/rollout/test_prefix.py
(greedy prefix sampler = HF generate, loop logits = full forward),
tests/rollout/test_rollout.py (vision tower once per prompt group; Qwen3.5's log-probs
against a plain forward)."""

from __future__ import annotations

import json

import pytest
import torch

from vlreason.cli import main
from vlreason.models.families import FAMILIES as ADAPTERS
from vlreason.models.families import Family, get_family
from vlreason.models.loading import ModelConfig
from vlreason.models.tiny import family_available, tiny_model_path
from vlreason.paths import demo_data
from vlreason.rollout.policy import Policy, RolloutConfig


@pytest.fixture(scope="module")
def internvl() -> Policy:
    ok, why = family_available("internvl")
    if not ok:
        pytest.skip(why)
    rollout = RolloutConfig(num_generations=2, max_new_tokens=6, max_pixels=112 * 112, temperature=1.0)
    return Policy.load(ModelConfig(name_or_path=str(tiny_model_path(family="internvl"))), rollout)


def test_internvl_layout_tokens_and_positions(internvl, rows):
    family, tok = internvl.family, internvl.processor.tokenizer
    prompts = internvl.prompts(rows)
    assert (prompts.attention_mask_PT == 0).any(), "the prompts must involve left padding"
    # tiles per image read from the tokens match the pixel tensor: [tiles, 3, 56, 56]
    tiles = family.pixel_rows(prompts)
    assert len(tiles) == 3 and sum(tiles) == prompts.pixel_values.shape[0]
    assert prompts.pixel_values.shape[1:] == (3, 56, 56) and prompts.image_grid_thw is None
    # plain positions: 0.. over real tokens, 0 on padding; the decode continues at real length
    positions = family.prompt_positions(internvl.model, prompts)
    assert positions.shape == (1, *prompts.input_ids_PT.shape)
    for p in range(prompts.num_prompts):
        real = prompts.attention_mask_PT[p].bool()
        assert positions[0, p, real].tolist() == list(range(int(real.sum())))
        assert not positions[0, p, ~real].any()
    # tokens: <|im_end|> ends a turn, InternVL's own vision tokens are suppressed
    assert tok.convert_tokens_to_ids("<|im_end|>") in family.end_ids(tok)
    assert family.suppress_ids(tok) == sorted(tok.convert_tokens_to_ids(t)
                                              for t in ("<IMG_CONTEXT>", "<img>", "</img>", "<video>"))
    assert tok.convert_tokens_to_ids("<|image_pad|>") not in family.suppress_ids(tok)  # not an InternVL token


def test_internvl_logprobs_match_plain_forward_on_raw_pixels(internvl, rows):
    """Pre-encoded tiles, split per image and reused by the G completions, score exactly
    as the model's own forward on each prompt's raw tiles (no padding, no pre-encoding)."""
    prompts = internvl.prompts(rows)
    batch = internvl.sample(prompts, seed=4)
    out = internvl.token_outputs(batch)
    tiles = internvl.family.pixel_rows(prompts)
    starts = torch.tensor([0, *tiles]).cumsum(0).tolist()
    prompt_len = prompts.input_ids_PT.shape[1]
    for i in range(batch.num_completions):
        p = int(batch.group_ids_N[i])
        images = prompts.image_index([p])
        pixels = prompts.pixel_values[starts[images[0]] : starts[images[-1] + 1]]
        real = prompts.attention_mask_PT[p].bool()
        ids = torch.cat([prompts.input_ids_PT[p][real], batch.completion_ids_NT[i]])[None]
        with torch.no_grad():
            logits = internvl.model(input_ids=ids, pixel_values=pixels).logits[0]
        start = int(real.sum()) - 1
        ref = torch.log_softmax(logits[start : start + batch.completion_ids_NT.shape[1]].float(), -1)
        ref = ref.gather(-1, batch.completion_ids_NT[i][:, None])[:, 0]
        valid = batch.completion_mask_NT[i].bool()
        torch.testing.assert_close(out.logprobs_NT[i][valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert prompt_len > int(prompts.attention_mask_PT.sum(-1).min()), "want a left-padded prompt"


def test_adapter_needs_the_checkpoint_ids_and_holds_no_builders(internvl, rows):
    prompts = internvl.prompts(rows)
    with pytest.raises(RuntimeError, match="image_token_id"):
        get_family("internvl").pixel_rows(prompts)  # the bare adapter has not read a config
    assert internvl.family.image_token_id == internvl.model.config.image_token_id
    for name in ("tiny_config", "tiny_text", "tiny_vision", "build_processor"):
        assert not hasattr(Family, name), name
    assert {"qwen3_5", "internvl"} <= set(ADAPTERS)


def test_internvl_freezing_and_lora_find_its_vision_modules(internvl):
    """InternVL's tower is ``vision_tower`` and its projector ``multi_modal_projector``
    (not Qwen's ``visual`` / ``merger``): freezing and LoRA's exclusion follow the adapter."""
    from vlreason.models.loading import LoraConfig, load_model

    path = internvl.model.name_or_path
    frozen, family = load_model(ModelConfig(name_or_path=path, freeze_vision=True))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert not any(".vision_tower." in f".{n}" for n in trainable)
    assert any(".multi_modal_projector." in f".{n}" for n in trainable)  # the projector still trains
    lora, _ = load_model(ModelConfig(name_or_path=path, lora=LoraConfig(enabled=True)))
    adapted = {n for n, _ in lora.named_parameters() if "lora_" in n}
    assert adapted and not any(family.is_vision_parameter(n) for n in adapted)
    assert any(".language_model." in n for n in adapted)


@pytest.mark.parametrize("family", ["qwen3_5", "internvl"])
def test_tiny_checkpoint_through_grpo_step_and_eval(tmp_path, family):
    ok, why = family_available(family)
    if not ok:
        pytest.skip(why)
    model = tmp_path / "model"
    assert main(["tiny-model", str(model), "--family", family]) == 0
    assert json.loads((model / "config.json").read_text())["model_type"] == family
    run = tmp_path / "run"
    assert main(["train", "grpo", f"output_dir={run}", f"model.name_or_path={model}", "max_steps=1",
                 "rollout.num_generations=2", "rollout.max_new_tokens=4", "prompts_per_step=1",
                 "algorithm.micro_batch_prompts=1", "heldout_eval=false"]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["completion_len"] > 0 and record["loss"] is not None
    assert json.loads((run / "final" / "config.json").read_text())["model_type"] == family
    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(run / "final"), "--data", str(demo_data("eval")), "--out", str(report),
                 "limit=2", "num_samples=1", "max_new_tokens=4"]) == 0
    summary = json.loads(report.read_text())
    assert summary["rows"] == 2 and summary["skipped_rows"] == 0 and 0 <= summary["accuracy"] <= 1


def test_qwen35_repeat_cache_repeats_linear_attention_states_prompt_major():
    """Qwen3.5's hybrid cache: each prompt's keys/values AND its Gated DeltaNet conv and
    recurrent states go to rows p*G ... p*G+G-1 (tiny random weights make the states of
    two prompts nearly equal, so the decode tests alone could not see a wrong order)."""
    from transformers import DynamicCache, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    cache = DynamicCache(config=config)
    P, G = 3, 2
    linear, full = cache.layers
    linear.lazy_initialization(conv_states=torch.zeros(P, 8, 4), recurrent_states=torch.zeros(P, 2, 4, 4))
    linear.conv_states[0] = torch.arange(P, dtype=torch.float)[:, None, None].expand(P, 8, 4).clone()
    linear.recurrent_states[0] = 10 + torch.arange(P, dtype=torch.float)[:, None, None, None].expand(P, 2, 4, 4).clone()
    keys = 20 + torch.arange(P, dtype=torch.float)[:, None, None, None].expand(P, 2, 5, 4)
    full.update(keys.clone(), keys.clone() + 100)
    get_family("qwen3_5").repeat_cache(cache, G)
    prompt_of_row = [p for p in range(P) for _ in range(G)]
    assert linear.conv_states[0][:, 0, 0].tolist() == prompt_of_row
    assert linear.recurrent_states[0][:, 0, 0, 0].tolist() == [10 + p for p in prompt_of_row]
    assert full.keys[:, 0, 0, 0].tolist() == [20 + p for p in prompt_of_row]
    assert full.values[:, 0, 0, 0].tolist() == [120 + p for p in prompt_of_row]


def test_qwen_layout_code_refuses_internvl_prompts_clearly(internvl, rows):
    """Code written for Qwen's patch layout (DVRP's noised view) fails with a message, not
    an AttributeError deep inside, when handed InternVL's tiles."""
    from vlreason.rollout.forward import pixel_rows

    prompts = internvl.prompts(rows)
    with pytest.raises(ValueError, match="not in the Qwen patch layout"):
        pixel_rows(prompts.image_grid_thw)

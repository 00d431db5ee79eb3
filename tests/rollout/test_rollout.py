"""Rollout and training forward on tiny real Qwen-VL models: images encoded once per
prompt group, log-probs equal to a plain HF forward, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from vlreason.models.families import get_family
from vlreason.models.loading import ModelConfig
from vlreason.models.tiny import FAMILIES, family_available, tiny_model_path
from vlreason.rollout.forward import completion_hidden_states
from vlreason.rollout.generate import VISION_TOKENS, completion_masks
from vlreason.rollout.policy import Policy, RolloutConfig

G = 4


def _policy(family="qwen2_5_vl", with_reference=False) -> Policy:
    ok, why = family_available(family)
    if not ok:
        pytest.skip(why)
    path = tiny_model_path(family=family)
    rollout = RolloutConfig(num_generations=G, max_new_tokens=10, max_pixels=112 * 112)
    return Policy.load(ModelConfig(name_or_path=str(path)), rollout, with_reference=with_reference)


class VisionCounter:
    """Counts vision-tower forward calls and the ``pixel_values`` rows they encode (Qwen's
    patches, InternVL's tiles), on the tower the family names."""

    def __init__(self, family, *models):
        self.calls, self.rows = 0, 0
        self.handles = [family.vision_tower(m).register_forward_hook(self.hook, with_kwargs=True) for m in models]

    def hook(self, module, args, kwargs, output):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["pixel_values"]).shape[0]

    def reset(self):
        self.calls, self.rows = 0, 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5", "internvl"])
def test_vision_tower_runs_once_per_prompt_group(rows, family):
    policy = _policy(family, with_reference=True)
    prompts = policy.prompts(rows)
    distinct_rows = sum(policy.family.pixel_rows(prompts))  # 3 distinct images
    assert distinct_rows == prompts.pixel_values.shape[0] and len(policy.family.pixel_rows(prompts)) == 3
    counter = VisionCounter(policy.family, policy.model, policy.reference)

    batch = policy.sample(prompts, seed=0)
    assert batch.num_completions == len(rows) * G
    assert (counter.calls, counter.rows) == (1, distinct_rows), "generation re-encoded images per completion"

    counter.reset()
    policy.token_outputs(batch)
    assert (counter.calls, counter.rows) == (1, distinct_rows), "policy pass re-encoded images per completion"

    counter.reset()
    policy.reference_logprobs(batch)
    assert (counter.calls, counter.rows) == (1, distinct_rows), "reference pass re-encoded images per completion"


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).position_rows == 3])
def test_logprobs_match_plain_forward(rows, family):
    """M-RoPE families (InternVL's tile layout: tests/models/test_family_layouts.py)."""
    policy = _policy(family)
    prompts = policy.prompts(rows)
    batch = policy.sample(prompts, seed=1)
    out = policy.token_outputs(batch)
    model = policy.model
    prompt_len = prompts.input_ids_PT.shape[1]
    rows_per_image = prompts.image_grid_thw.prod(-1).tolist()
    for i in range(batch.num_completions):
        p = int(batch.group_ids_N[i])
        first = sum(prompts.images_per_prompt[:p])
        images = range(first, first + prompts.images_per_prompt[p])
        start = sum(rows_per_image[:first])
        stop = start + sum(rows_per_image[j] for j in images)
        ids = torch.cat([prompts.input_ids_PT[p], batch.completion_ids_NT[i]])[None]
        mask = torch.cat([prompts.attention_mask_PT[p], batch.completion_mask_NT[i]])[None]
        mm = torch.cat([prompts.mm_token_type_ids_PT[p], torch.zeros_like(batch.completion_ids_NT[i])])[None]
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                       pixel_values=prompts.pixel_values[start:stop],
                       image_grid_thw=prompts.image_grid_thw[list(images)]).logits
        ref = torch.log_softmax(logits[0, prompt_len - 1 : -1].float(), -1)
        ref = ref.gather(-1, batch.completion_ids_NT[i][:, None])[:, 0]
        valid = batch.completion_mask_NT[i].bool()
        torch.testing.assert_close(out.logprobs_NT[i][valid], ref[valid], atol=1e-5, rtol=1e-5)
        assert torch.all(out.logprobs_NT[i][~valid] == 0)


def test_sampling_is_seeded_and_never_emits_vision_tokens(rows):
    policy = _policy()
    prompts = policy.prompts(rows)
    a = policy.sample(prompts, seed=5)
    b = policy.sample(prompts, seed=5)
    c = policy.sample(prompts, seed=6)
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
    assert not torch.equal(a.completion_ids_NT, c.completion_ids_NT)
    vision_ids = [policy.processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert not torch.isin(a.completion_ids_NT, torch.tensor(vision_ids)).any()


def test_completion_masks_cut_after_first_end_token():
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 1, 1, 1]])
    out, mask, truncated = completion_masks(ids, end_ids=[9], pad_id=0)
    # row 0 ends at position 1 (the end token counts), row 1 never ends, row 2 at once
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.tolist() == [[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_micro_batches_share_prompt_data(rows):
    policy = _policy()
    batch = policy.sample(policy.prompts(rows), seed=0)
    part = batch.select([4, 5])
    assert part.prompts is batch.prompts
    assert part.group_ids_N.tolist() == [1, 1]
    assert part.texts == batch.texts[4:6]


def test_temperature_scales_the_scored_distribution(rows):
    policy = _policy()
    batch = policy.sample(policy.prompts(rows), seed=0)
    plain = policy.token_outputs(batch).logprobs_NT.detach()
    hot = policy.token_outputs(batch, temperature=2.0).logprobs_NT.detach()
    hidden = completion_hidden_states(policy.model, policy.family, batch).detach()
    logits = policy.family.lm_head(policy.model)(hidden) / 2.0
    ref = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids_NT[..., None])[..., 0]
    mask = batch.completion_mask_NT.bool()
    torch.testing.assert_close(hot[mask], ref[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hot[mask], plain[mask])

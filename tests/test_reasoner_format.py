"""Reasoners' solutions reach the rewards in the target <think>..</think><answer>..</answer>
format whatever the chat template does: normalise_solution (pure), a tiny transformers
reasoner whose chat template opens <think> in the generation prompt (QwQ-32B / R1-distill
style), with a scripted generate and with the real tiny LM. The OpenAI-compatible server
cases (a reply with </think> but no opening tag, reasoning_content) are in
tests/test_reasoners.py next to the stub server."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vlreason.models.tiny import CHAT_TEMPLATE
from vlreason.reasoners import (
    TransformersReasoner,
    normalise_solution,
    prompt_opens_think,
    think_left_open,
    tiny_reasoner_path,
)
from vlreason.rewards import accuracy_reward, hard_format_and_correct
from vlreason.rewards.format import is_strict_format

# the tiny template, but the generation prompt opens the think block (as QwQ-32B's does)
THINK_TEMPLATE = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")


@pytest.mark.parametrize("raw, opened, expected", [
    # already well formed: unchanged (whitespace around stripped)
    ("  <think>I look.</think><answer>red</answer>\n", False, "<think>I look.</think><answer>red</answer>"),
    ("<think>I look.</think><answer>red</answer>", True, "<think>I look.</think><answer>red</answer>"),
    # the prompt opened <think>: the reply only closes it
    ("I look.\n</think>\n\n<answer>red</answer>", True, "<think>I look.\n</think>\n\n<answer>red</answer>"),
    # an R1-style summary between </think> and <answer> goes into the think block
    ("I look.</think>\nSo it is red.\n<answer>red</answer>", True,
     "<think>I look.\n\nSo it is red.</think><answer>red</answer>"),
    # answer only: left alone (no empty think invented), not strict, still gradable
    ("<answer>red</answer>", False, "<answer>red</answer>"),
    # the prompt opened <think> but it was never closed (cut at the length limit): malformed
    ("I look and look", True, "<think>I look and look"),
])
def test_normalise_solution(raw, opened, expected):
    out = normalise_solution(raw, prompt_opened_think=opened)
    assert out == expected
    assert normalise_solution(out, prompt_opened_think=think_left_open(out)) == out  # idempotent
    well_formed = expected.startswith("<think>") and expected.endswith("</answer>")
    assert is_strict_format(out) == well_formed
    assert hard_format_and_correct(out, "red") == float(well_formed)
    assert accuracy_reward(out, "red") == float(out.endswith("<answer>red</answer>"))


def test_detection_helpers():
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n")
    # a Qwen3-style template with thinking switched off closes the block itself
    assert not prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert think_left_open("T</think><answer>a</answer>")
    assert not think_left_open("<think>T</think><answer>a</answer>")
    assert not think_left_open("<answer>a</answer>")


class _ScriptedLM(torch.nn.Module):
    """Stands in for the causal LM: generate() appends fixed token ids to every prompt."""

    def __init__(self, completion_ids: list[int]):
        super().__init__()
        self.completion = torch.tensor(completion_ids)

    def generate(self, input_ids, attention_mask, **kwargs):
        tail = self.completion.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


@pytest.fixture(scope="module")
def think_tokenizer():
    tok = AutoTokenizer.from_pretrained(tiny_reasoner_path())
    tok.chat_template = THINK_TEMPLATE
    return tok


def test_template_that_opens_think_gives_well_formed_solutions(think_tokenizer):
    tok = think_tokenizer
    # what a QwQ-style model writes after "<think>\n": the think text and </think> only
    ids = tok("I count the shapes.\n</think>\n\n<answer>3</answer>", add_special_tokens=False)["input_ids"]
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    reasoner = TransformersReasoner("scripted", model=_ScriptedLM(ids), tokenizer=tok, device="cpu")
    assert reasoner.render("How many?").endswith("<think>\n")
    out = reasoner.solve(["How many?", "Count them."], 2, 8, 0.0, seed=0)
    assert out == [["<think>I count the shapes.\n</think>\n\n<answer>3</answer>"] * 2] * 2
    assert all(hard_format_and_correct(t, "3") == 1.0 for ts in out for t in ts)
    assert hard_format_and_correct(out[0][0], "4") == 0.0


def test_tiny_lm_with_think_template_opens_every_solution(think_tokenizer):
    """The real (random) tiny LM: whatever noise it writes, the think block the template
    opened is in front of it (detected on the rendered prompt, not on the text)."""
    opened = TransformersReasoner(tiny_reasoner_path(), tokenizer=think_tokenizer, device="cpu")
    texts = [t for ts in opened.solve(["What colour?", "How many?"], 2, 6, 1.0, seed=3) for t in ts]
    assert len(texts) == 4 and all(t.startswith("<think>") for t in texts)
    plain = TransformersReasoner(tiny_reasoner_path(), device="cpu")
    assert not prompt_opens_think(plain.render("What colour?"))

"""Vision-R1 cold-start data by modality bridging (data_pipelines/cold_start.py): the warm
tiny VLM describes the demo rows' images (the question shown), a scripted text reasoner
reasons from the description only, rows with a strict-format correct solution are kept
as a canonical dataset with `solution`; a rerun asks the reasoner nothing (cache); and
`vlreason train vision_r1` starts from the dataset (a tiny run)."""

from __future__ import annotations

import json
import re

from data_pipelines.cold_start import ColdStartDataConfig, build_cold_start_data, main
from vlreason.cli import main as cli
from vlreason.config import load_config
from vlreason.data.schema import load_canonical
from vlreason.rewards import accuracy_reward
from vlreason.rewards.format import is_strict_format

PROMPTS: list[str] = []
_DESCRIPTION = re.compile(r"with a first analysis:\n(.*?)\n\nQuestion: (.*?)\n", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class DescriptionReader:
    """Reasons from the description alone: answers what the description's own analysis
    concluded (its <answer> block, else its last word). Solution 0 is well formed,
    solution 1 is the bare answer (malformed: never kept under the hard reward)."""

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        PROMPTS.extend(prompts)
        out = []
        for p in prompts:
            description, question = _DESCRIPTION.search(p).groups()
            m = _ANSWER.search(description)
            words = re.findall(r"\w+", description)
            guess = m.group(1).strip() if m else (words[-1] if words else "nothing")
            quoted = re.sub(r"<[^>]*>", " ", description).strip()[:60]  # the VLM's own tags are not the reasoner's
            out.append([f"<think>The description says: {quoted} So for '{question}' the answer is "
                        f"{guess}.</think><answer>{guess}</answer>", guess][:n])
        return out


def reader(cfg) -> DescriptionReader:
    return DescriptionReader()


ARGS = ["max_rows=8", "chunk_rows=4", "bridge.num_captions=2", "bridge.caption_max_new_tokens=32",
        "reasoner.kind=python", f"reasoner.path={__name__}:reader"]


def test_bad_config_is_refused():
    import pytest

    for bad in ("chunk_rows=0", "bridge.reward=f1", "bridge.threshold=1.0"):
        with pytest.raises(ValueError):
            load_config(ColdStartDataConfig, None, [bad])
    cfg = load_config(ColdStartDataConfig)
    assert "{question}" in cfg.bridge.caption_prompt and cfg.bridge.reward == "hard"


def test_demo_rows_become_a_cold_start_dataset_and_vision_r1_starts_from_it(tmp_path):
    PROMPTS.clear()
    assert main([f"output_dir={tmp_path / 'cs'}", *ARGS]) == 0
    out = tmp_path / "cs" / "data"
    summary = json.loads((out / "summary.json").read_text())
    collected = [json.loads(x) for x in (out / "collected.jsonl").read_text().splitlines()]
    kept = load_canonical(out / "kept")
    # every row described twice, each description reasoned about by the text reasoner
    assert summary["input_rows"] == summary["rows"] == len(collected) == 8
    assert len(PROMPTS) == 16 and summary["reasoner"]["cache_misses"] == 16
    assert all("Question: " in p and "<image>" not in p for p in PROMPTS)
    # kept = exactly the rows with a strict-format, correct solution (checked here independently)
    good = {rec["id"] for rec in collected
            if any(is_strict_format(y) and accuracy_reward(y, rec["answer"]) == 1.0 for ys in rec["solutions"] for y in ys)}
    assert {row["id"] for row in kept} == good and summary["kept_rows"] == len(good) >= 1
    for row in kept:
        assert is_strict_format(row["solution"]) and accuracy_reward(row["solution"], row["answer"]) == 1.0
        assert json.loads(row["meta"])["cold_start"] == "modality_bridging" and row["images"]
    print(f"\ncold start: {len(kept)} of 8 demo rows kept; summary {summary}")
    # a rerun is answered from the reasoner cache
    PROMPTS.clear()
    again = build_cold_start_data([f"output_dir={tmp_path / 'cs'}", *ARGS])
    assert PROMPTS == [] and json.loads((again / "summary.json").read_text())["reasoner"]["calls"] == 0
    # Vision-R1 cold start on it, then a tiny PTST stage
    run = tmp_path / "vr1"
    assert cli(["train", "vision_r1", f"output_dir={run}", f"cold_start.data={out / 'kept'}",
                "cold_start.steps=2", "cold_start.prompts_per_step=2", "cold_start.micro_batch_prompts=2",
                "ptst.stages=[{name: stage1, max_new_tokens: 16, num_generations: 2, steps: 1}]",
                "prompts_per_step=1", "algorithm.micro_batch_prompts=1", "stage_eval=false",
                "progress=false", "trackers=[jsonl]"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["cold_start", "cold_start", "stage1"]
    assert all(r["loss"] > 0 for r in records[:2])

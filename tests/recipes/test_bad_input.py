"""Bad input at train time: each case gives a clear message and never loses the run."""

from __future__ import annotations

import json
import logging

from vlreason.cli import main
from vlreason.data.schema import canonical_row, load_canonical, save_canonical
from vlreason.paths import demo_data

FAST = ["max_steps=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
        "prompts_per_step=2", "algorithm.micro_batch_prompts=1", "progress=false",
        "heldout_eval=false"]


def _demo_rows(n: int) -> list[dict]:
    ds = load_canonical(demo_data("train"))
    return [canonical_row(**{k: ds[i][k] for k in ("id", "images", "question", "answer", "source")})
            for i in range(n)]


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_row_whose_image_no_longer_decodes_is_skipped_and_counted(tmp_path, caplog):
    rows = _demo_rows(3)
    rows[1]["images"] = [b"\x89PNG\r\n\x1a\n this is not an image any more"]
    data = save_canonical(rows, tmp_path / "data")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(["train", "grpo", f"output_dir={run}", f"data.train={data}", *FAST]) == 0
    assert f"skipping row '{rows[1]['id']}'" in caplog.text and "no longer decodes" in caplog.text
    assert _metrics(run)[-1]["data/skipped_rows"] >= 1


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    data = save_canonical([], tmp_path / "empty")
    assert main(["train", "grpo", f"output_dir={tmp_path / 'run'}", f"data.train={data}", *FAST]) == 2
    assert "dataset is empty" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "grpo", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'nope'}", *FAST]) == 2
    assert "dataset not found" in capsys.readouterr().err


def test_prompt_longer_than_the_limit_is_skipped_never_cut(tmp_path, caplog):
    # every demo prompt has more image tokens than 10: all rows skipped -> a clear error,
    # with a checkpoint of nothing lost (the failure is before the first update)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        try:
            main(["train", "grpo", f"output_dir={run}", "rollout.prompt.max_prompt_tokens=10", *FAST])
        except RuntimeError as err:
            assert "none of this step's rows could be used" in str(err)
        else:
            raise AssertionError("expected a RuntimeError")
    assert "never cut through image tokens" in caplog.text


def test_single_completion_groups_warn_and_stay_finite(tmp_path, caplog):
    run = tmp_path / "run"
    args = [a for a in FAST if not a.startswith("rollout.num_generations")]
    with caplog.at_level(logging.WARNING):
        assert main(["train", "grpo", f"output_dir={run}", "rollout.num_generations=1", *args]) == 0
    assert "GRPO cannot learn" in caplog.text
    records = _metrics(run)
    assert all(r["loss"] == 0.0 and r["skipped_steps"] == 0 for r in records)


def test_special_tokens_written_in_the_data_are_skipped_in_rl_and_text_in_sft(tmp_path, caplog):
    """A question holding '<|image_pad|>' as text would ask for image features that do not
    exist: GRPO and SFT skip the row and count it. A target holding it is only text."""
    rows = _demo_rows(4)
    rows[1]["question"] = rows[1]["question"] + " <|image_pad|>"
    rows[2]["images"] = [b"not an image"]
    rows[3]["solution"] = "<think>looks <|vision_start|> red</think><answer>" + rows[3]["answer"] + "</answer>"
    for row in rows[:3]:
        row["solution"] = "<think>look</think><answer>" + row["answer"] + "</answer>"
    data = save_canonical(rows, tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "grpo", f"output_dir={tmp_path / 'rl'}", f"data.train={data}", *FAST]) == 0
    assert f"skipping row '{rows[1]['id']}'" in caplog.text and "special token '<|image_pad|>'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", "sft", f"output_dir={tmp_path / 'sft'}", f"data.train={data}", "max_steps=1",
                     "prompts_per_step=4", "sft.micro_batch_prompts=2", "progress=false"]) == 0
    assert f"skipping row '{rows[1]['id']}'" in caplog.text and f"skipping row '{rows[2]['id']}'" in caplog.text
    assert _metrics(tmp_path / "sft")[-1]["data/skipped_rows_step"] == 2

"""vlreason.evaluation against hand-worked values: a scripted policy whose completions are
known, so accuracy, format rate, length statistics, truncation and pass@k are exact."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlreason.evaluation import EvalConfig, evaluate, percentile, summarise

GOOD = "<think>look</think><answer>{}</answer>"  # formatted
BARE = "<answer>{}</answer>"  # answer tags without <think>: format 0


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), "red").save(buf, "PNG")
    return buf.getvalue()


def _row(row_id: str, answer: str, images: list[bytes] | None = None) -> dict:
    return {"id": row_id, "images": [_png()] if images is None else images,
            "question": "What is shown?", "answer": answer, "choices": [], "boxes": []}


class ScriptedPolicy:
    """Returns, for each prompt row, the scripted ``(text, length, truncated)`` samples."""

    def __init__(self, script: dict[str, list[tuple[str, int, bool]]]):
        self.script = script
        self.model = torch.nn.Linear(1, 1)
        self.calls: list[tuple[list[str], int, int, float]] = []  # (row ids, seed, G, temperature)
        self.mode_during_sample: list[bool] = []

    def prompts(self, rows, images=None):
        assert len(images) == len(rows) and all(isinstance(im[0], Image.Image) for im in images)
        return rows

    def sample(self, rows, *, seed, sampling):
        G = sampling.num_generations
        self.calls.append(([r["id"] for r in rows], seed, G, sampling.temperature))
        self.mode_during_sample.append(self.model.training)
        samples = [s for r in rows for s in self.script[r["id"]][:G]]
        assert len(samples) == len(rows) * G, "script too short"
        return SimpleNamespace(
            texts=[text for text, _, _ in samples],
            group_ids_N=torch.arange(len(rows)).repeat_interleave(G),
            completion_lengths_N=torch.tensor([n for _, n, _ in samples]),
            truncated_N=torch.tensor([t for _, _, t in samples]),
        )


SCRIPT = {
    # row a (answer red): both right and formatted
    "a": [(GOOD.format("red"), 10, False), (GOOD.format("red"), 20, False)],
    # row b (answer 2): wrong but formatted, then right without <think> (format 0)
    "b": [(GOOD.format("3"), 30, False), (BARE.format("2"), 40, False)],
    # row c (answer blue): both wrong and formatted, the second cut at the length limit
    "c": [(GOOD.format("red"), 50, False), (GOOD.format("green"), 60, True)],
}


def test_sampled_evaluation_by_hand():
    data = [_row("a", "red"), _row("b", "2"), _row("c", "blue"), _row("d", "4", images=[b"broken"])]
    policy = ScriptedPolicy(SCRIPT)
    cfg = EvalConfig(num_samples=2, temperature=1.0, batch_size=2, seed=7)
    summary, records = evaluate(policy, data, cfg)
    # correct: a 2, b 1, c 0 -> 3 / 6; formatted: 2 + 1 + 2 -> 5 / 6; truncated 1 / 6
    # pass@2: a and b have a correct sample, c none -> 2 / 3 rows; d's image fails: skipped
    # lengths 10..60: mean 35; p50 at rank 2.5 -> 30 + 0.5 * 10 = 35; p90 at rank 4.5 -> 55
    assert summary == pytest.approx({
        "rows": 3, "samples_per_row": 2, "accuracy": 0.5, "format_rate": 5 / 6,
        "length_mean": 35.0, "length_p50": 35.0, "length_p90": 55.0,
        "truncation_rate": 1 / 6, "pass@2": 2 / 3, "skipped_rows": 1,
    })
    assert [(r["id"], r["correct"], r["format"]) for r in records] == [
        ("a", 1.0, 1.0), ("a", 1.0, 1.0), ("b", 0.0, 1.0), ("b", 1.0, 0.0), ("c", 0.0, 1.0), ("c", 0.0, 1.0)]
    assert [r["truncated"] for r in records] == [False] * 5 + [True]
    # batches of 2 rows, seeded by their first row's index; the model sampled in eval mode
    # and is handed back in training mode, as it came
    assert policy.calls == [(["a", "b"], 7, 2, 1.0), (["c"], 9, 2, 1.0)]
    assert policy.mode_during_sample == [False, False] and policy.model.training


def test_greedy_limit_and_no_pass_at_k():
    policy = ScriptedPolicy(SCRIPT)
    policy.model.eval()
    summary, records = evaluate(policy, [_row("a", "red"), _row("b", "2"), _row("c", "blue")], EvalConfig(limit=2))
    # first sample of a (right) and b (wrong) only: accuracy 1 / 2, lengths 10 and 30
    assert summary["rows"] == 2 and summary["accuracy"] == 0.5 and summary["format_rate"] == 1.0
    assert summary["length_mean"] == 20.0 and summary["length_p90"] == pytest.approx(28.0)
    assert not any(key.startswith("pass@") for key in summary)
    assert [r["id"] for r in records] == ["a", "b"] and not policy.model.training


def test_multiple_choice_and_lenient_answers():
    rows = [{**_row("m", "B"), "choices": ["blue", "red"]}, _row("x", "7")]
    script = {"m": [(GOOD.format("red"), 5, False)], "x": [("so the answer is \\boxed{7}", 5, False)]}
    strict, _ = evaluate(ScriptedPolicy(script), rows, EvalConfig())
    lenient, _ = evaluate(ScriptedPolicy(script), rows, EvalConfig(lenient=True))
    # "red" is choice B; the unformatted \boxed{7} counts only when lenient
    assert strict["accuracy"] == 0.5 and lenient["accuracy"] == 1.0


def test_no_usable_row_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        evaluate(ScriptedPolicy(SCRIPT), [], EvalConfig())
    with pytest.raises(ValueError, match="2 skipped"):
        evaluate(ScriptedPolicy(SCRIPT), [_row("a", "red", [b"x"]), _row("b", "2", [b"y"])], EvalConfig())


def test_summarise_and_percentile_by_hand():
    # rows r1: (1, 0, 0) and r2: (0, 0, 0) with k = 3: accuracy 1 / 6, pass@3 = 1 / 2
    records = [{"id": rid, "correct": c, "format": 1.0, "length": n, "truncated": False}
               for rid, c, n in [("r1", 1.0, 4), ("r1", 0.0, 8), ("r1", 0.0, 1), ("r2", 0.0, 2),
                                 ("r2", 0.0, 100), ("r2", 0.0, 3)]]
    out = summarise(records, 3)
    assert out["accuracy"] == pytest.approx(1 / 6) and out["pass@3"] == 0.5 and out["rows"] == 2
    # lengths sorted 1 2 3 4 8 100: p50 at rank 2.5 -> 3.5; p90 at rank 4.5 -> 8 + 0.5 * 92 = 54
    assert out["length_p50"] == 3.5 and out["length_p90"] == 54.0
    assert percentile([5.0], 0.9) == 5.0 and percentile([], 0.5) == 0.0

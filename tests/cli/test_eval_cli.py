"""`vlreason eval`: JSON report with accuracy, format rate, lengths, truncation, pass@k;
undecodable rows are skipped and counted, not fatal."""

from __future__ import annotations

import json

import pytest

from vlreason.cli import main
from vlreason.data.schema import canonical_row, load_canonical, save_canonical
from vlreason.paths import demo_data, warm_model


def test_eval_writes_report_with_pass_at_k(tmp_path, capsys):
    out = tmp_path / "report.json"
    records = tmp_path / "records.jsonl"
    assert main(["eval", "--model", str(warm_model()), "--data", str(demo_data("eval")), "--out", str(out),
                 "--records", str(records), "limit=6", "num_samples=2", "temperature=1.0", "max_new_tokens=40"]) == 0
    report = json.loads(out.read_text())
    for key in ("accuracy", "format_rate", "length_mean", "length_p50", "length_p90", "truncation_rate", "pass@2"):
        assert key in report, key
    assert report["rows"] == 6 and report["samples_per_row"] == 2 and report["skipped_rows"] == 0
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(recs) == 12 and {"id", "completion", "correct", "format"} <= recs[0].keys()
    # each completion is scored against its own row's answer, two per row, in dataset order
    ds = load_canonical(demo_data("eval"))
    assert [(r["id"], r["answer"]) for r in recs] == [(ds[i]["id"], ds[i]["answer"]) for i in range(6) for _ in "ab"]
    # the report summarises exactly these records (summary arithmetic: tests/test_evaluation.py)
    assert report["accuracy"] == pytest.approx(sum(r["correct"] for r in recs) / 12)
    assert report["format_rate"] == pytest.approx(sum(r["format"] for r in recs) / 12)
    assert report["pass@2"] == pytest.approx(sum(max(recs[i]["correct"], recs[i + 1]["correct"]) for i in range(0, 12, 2)) / 6)
    assert "accuracy" in capsys.readouterr().out


def test_eval_skips_undecodable_rows(tmp_path):
    ds = load_canonical(demo_data("eval"))
    rows = [canonical_row(**{k: ds[i][k] for k in ("id", "images", "question", "answer", "source")}) for i in range(3)]
    rows[0]["images"] = [b"not an image"]
    data = save_canonical(rows, tmp_path / "data")
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(warm_model()), "--data", str(data), "--out", str(out), "max_new_tokens=8"]) == 0
    report = json.loads(out.read_text())
    assert report["skipped_rows"] == 1 and report["rows"] == 2


def test_eval_bad_override_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(warm_model()), "--data", str(demo_data("eval")), "num_sample=2"]) == 2
    assert "Did you mean 'num_samples'" in capsys.readouterr().err

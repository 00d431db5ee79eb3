"""`vlreason preprocess`: exit codes, summary, report.json."""

from __future__ import annotations

import json

from PIL import Image

from vlreason.cli import main


def _source(tmp_path, rows) -> str:
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"id": "a", "image": "red.png", "question": "Colour?", "answer": "red"}
MISSING = {"id": "b", "image": "nope.png", "question": "Colour?", "answer": "red"}


def test_preprocess_writes_dataset_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["preprocess", _source(tmp_path, [GOOD, MISSING]), "--out", str(out), "--num-proc", "1"]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["kept"], report["rejected_by_reason"]) == (1, {"missing file": 1})
    printed = capsys.readouterr().out
    assert "kept 1 of 2 rows" in printed and "missing file" in printed and "report.json" in printed


def test_fatal_errors_exit_non_zero_without_traceback(tmp_path, capsys):
    source = _source(tmp_path, [MISSING])
    assert main(["preprocess", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o1")]) == 1
    assert "source not found" in capsys.readouterr().err

    assert main(["preprocess", source, "--out", str(tmp_path / "o2"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "rows.jsonl line 1: missing file" in err and "Traceback" not in err

    assert main(["preprocess", source, "--out", str(tmp_path / "o3")]) == 1
    assert "no row was kept" in capsys.readouterr().err
    assert (tmp_path / "o3" / "report.json").exists()


def test_unwritable_out_is_exit_2_before_any_work(tmp_path, capsys):
    source = _source(tmp_path, [GOOD])
    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file" / "out", tmp_path / "a-file"):
        # the source is not even read: a missing one would be exit 1 ("source not found")
        assert main(["preprocess", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlreason preprocess: error: ") and err.count("\n") == 1
        assert main(["preprocess", source, "--out", str(out)]) == 2
        capsys.readouterr()
    assert (tmp_path / "a-file").read_text() == ""


def test_failed_run_leaves_no_empty_out_folder(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert main(["preprocess", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 1
    assert not out.exists()


def test_column_flags(tmp_path, capsys):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    row = {"pic": "red.png", "prompt": "Colour?<image>", "gt": "red", "options": ["red", "blue"]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    args = ["--image-column", "pic", "--question-column", "prompt", "--answer-column", "gt"]
    assert main(["preprocess", str(tmp_path / "rows.jsonl"), "--out", str(out), *args]) == 0
    from vlreason.data.schema import load_canonical

    got = load_canonical(out)[0]
    assert (got["question"], got["answer"], got["choices"]) == ("Colour?<image>", "red", ["red", "blue"])

"""No work is lost to a bad output path: every writing verb (train, eval, preview, plot)
creates missing parent folders, and refuses an unwritable path with a one-line error and
exit code 2 before it loads a model, draws a view or a figure.

Unwritable paths that hold even for root (who ignores folder permissions): a folder under
/proc (no new entries there) and a path whose parent is a regular file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines.synthetic import make_color
from vlreason.cli import main
from vlreason.data.schema import save_canonical
from vlreason.paths import demo_data, warm_model

PROC = Path("/proc/vlreason-test")


def _unwritable(tmp_path: Path) -> list[Path]:
    """Folders that cannot be created, whoever asks: under /proc, and under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [PROC / "out", blocker / "out"]


def _one_line_error(err: str, folder: Path, verb: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlreason {verb}") and f"cannot write to {folder}" in lines[0], err


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load (or tiny-model build for a recipe's default) fails the test."""
    from vlreason.rollout.policy import Policy

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(Policy, "load", refuse)
    import recipes.grpo

    monkeypatch.setattr(recipes.grpo.GRPORecipe, "default_model", staticmethod(refuse))


@pytest.fixture(scope="module")
def preview_data(tmp_path_factory):
    return save_canonical(make_color(2, 0, size=56), tmp_path_factory.mktemp("preview") / "ds")


# ---------------------------------------------------------------- eval


def test_eval_creates_missing_nested_parents(tmp_path):
    out = tmp_path / "new" / "nested" / "report.json"
    records = tmp_path / "other" / "deep" / "records.jsonl"
    assert main(["eval", "--model", str(warm_model()), "--data", str(demo_data("eval")), "--out", str(out),
                 "--records", str(records), "limit=2", "max_new_tokens=8"]) == 0
    assert json.loads(out.read_text())["rows"] == 2
    assert len(records.read_text().splitlines()) == 2


@pytest.mark.parametrize("which", ["--out", "--records"])
def test_eval_unwritable_path_fails_before_the_model_loads(tmp_path, capsys, no_model_load, which):
    for bad in _unwritable(tmp_path):
        paths = {"--out": str(tmp_path / "ok.json"), "--records": str(tmp_path / "ok.jsonl"), which: str(bad / "x.json")}
        argv = ["eval", "--model", str(warm_model()), "--data", str(demo_data("eval"))]
        assert main([*argv, *(a for kv in paths.items() for a in kv)]) == 2
        _one_line_error(capsys.readouterr().err, bad, "eval")
    assert not (tmp_path / "ok.json").exists() and not (tmp_path / "ok.jsonl").exists()


def test_eval_default_report_path_is_checked_too(capsys, no_model_load):
    # no --out: the report goes into the MODEL folder, here /proc, which takes no new files
    assert main(["eval", "--model", "/proc", "--data", str(demo_data("eval"))]) == 2
    _one_line_error(capsys.readouterr().err, Path("/proc"), "eval")


# ---------------------------------------------------------------- preview


def test_preview_creates_missing_nested_parents(tmp_path, preview_data):
    out = tmp_path / "a" / "b" / "c" / "grid.png"
    assert main(["preview", "resize", "--data", str(preview_data), "--out", str(out), "--cell", "32"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_preview_unwritable_path_fails_before_any_view(tmp_path, capsys, preview_data, monkeypatch):
    from vlreason.views import VIEWS

    def refuse(*args, **kwargs):
        raise AssertionError("a view was drawn before the output path was checked")

    monkeypatch.setitem(VIEWS, "resize", refuse)
    for bad in _unwritable(tmp_path):
        assert main(["preview", "resize", "--data", str(preview_data), "--out", str(bad / "x.png")]) == 2
        _one_line_error(capsys.readouterr().err, bad, "preview")


# ---------------------------------------------------------------- plot


def _run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "reward": s / 10}) for s in range(1, 6)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_plot_creates_missing_nested_parents(tmp_path):
    out = tmp_path / "figs" / "deep" / "curves.png"
    assert main(["plot", str(_run_dir(tmp_path / "run")), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_unwritable_path_fails_before_drawing(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a figure was drawn before the output path was checked")

    monkeypatch.setattr("vlreason.plotting.Figure", refuse)
    run = _run_dir(tmp_path / "run")
    for bad in _unwritable(tmp_path):
        assert main(["plot", str(run), "--out", str(bad / "c.png")]) == 2
        _one_line_error(capsys.readouterr().err, bad, "plot")


# ---------------------------------------------------------------- train


def test_train_creates_missing_nested_output_dir(tmp_path):
    run = tmp_path / "new" / "nested" / "run"
    assert main(["train", "grpo", f"output_dir={run}", "max_steps=1", "rollout.num_generations=2",
                 "rollout.max_new_tokens=4", "prompts_per_step=1", "algorithm.micro_batch_prompts=1"]) == 0
    assert (run / "config.yaml").is_file() and (run / "final").is_dir()


def test_train_unwritable_output_dir_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    for bad in _unwritable(tmp_path):
        assert main(["train", "grpo", f"output_dir={bad / 'run'}", "max_steps=1"]) == 2
        _one_line_error(capsys.readouterr().err, bad, "train grpo")


def test_train_output_dir_that_is_a_file_is_refused(tmp_path, capsys, no_model_load):
    run = tmp_path / "run"
    run.write_text("not a folder")
    assert main(["train", "grpo", f"output_dir={run}", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"output path {run} is a file" in err
    assert run.read_text() == "not a folder"

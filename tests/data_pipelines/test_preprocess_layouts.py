"""Public dataset layouts through `preprocess`: the EasyR1 / verl parquet (``images`` list,
``problem`` with ``<image>`` placeholders, ``answer``), a single ``image`` column,
``options`` / ``choices``, and other column names mapped by flag; and the EasyR1 layout
end to end through ``vlreason preprocess`` and one ``vlreason train grpo`` step."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import datasets
import pytest
from PIL import Image

from data_pipelines import preprocess as pp
from data_pipelines.preprocess import PreprocessError, preprocess
from vlreason.cli import main
from vlreason.data.images import decode_image
from vlreason.data.schema import load_canonical
from vlreason.rollout import policy as policy_module


def _png(colour=(255, 0, 0), size=(28, 28)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(colour, size=(28, 28)) -> dict:
    return {"bytes": _png(colour, size), "path": None}


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def easyr1_parquet(path: Path, rows: list[dict]) -> Path:
    """A parquet file in the EasyR1 layout, written the way `datasets` writes it."""
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def _run(source, out, **kwargs) -> pp.Report:
    return preprocess(source, out, progress=False, **kwargs)


def test_easyr1_layout_keeps_placeholders_and_rejects_count_mismatch(tmp_path):
    source = easyr1_parquet(
        tmp_path / "train.parquet",
        [
            {"images": [_image(RED), _image(BLUE)], "problem": "<image>A or <image>B: which is blue?",
             "answer": "B"},
            {"images": [_image(GREEN)], "problem": "<image>What colour?", "answer": "green"},
            {"images": [_image(RED)], "problem": "No placeholder here. Colour?", "answer": "red"},
            {"images": [_image(RED)], "problem": "<image> vs <image>?", "answer": "same"},
            {"images": [_image(RED), _image(BLUE)], "problem": "Only <image> once", "answer": "x"},
        ],
    )
    report = _run(source, tmp_path / "out")
    assert [(r.line, r.reason) for r in report.rejected_rows] == [
        (3, pp.PLACEHOLDER_MISMATCH),
        (4, pp.PLACEHOLDER_MISMATCH),
    ]
    assert "2 <image> placeholders for 1 image" in report.rejected_rows[0].detail
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["rejected_by_reason"] == {pp.PLACEHOLDER_MISMATCH: 2}

    ds = load_canonical(tmp_path / "out")
    assert ds["question"] == [
        "<image>A or <image>B: which is blue?",
        "<image>What colour?",
        "No placeholder here. Colour?",
    ]
    assert ds["answer"] == ["B", "green", "red"]
    two = ds[0]["images"]
    assert [decode_image(b).getpixel((1, 1)) for b in two] == [RED, BLUE], "image order kept"


def test_single_image_column_and_options_become_choices(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(
        {"image": [_image(RED)], "question": ["<image>Colour?"], "options": [["red", "blue"]],
         "answer": ["A"]},
        features=features,
    ).to_parquet(str(tmp_path / "mc.parquet"))
    report = _run(tmp_path / "mc.parquet", tmp_path / "out")
    assert (report.kept, report.rejected) == (1, 0)
    row = load_canonical(tmp_path / "out")[0]
    assert row["choices"] == ["red", "blue"] and row["question"] == "<image>Colour?"
    assert len(row["images"]) == 1


def test_choices_list_in_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "Q?", "answer": "A", "choices": ["x", 2]}) + "\n"
        + json.dumps({"image": "a.png", "question": "Q?", "answer": "A", "options": ["y", "z"]}) + "\n"
    )
    _run(tmp_path / "rows.jsonl", tmp_path / "out")
    assert load_canonical(tmp_path / "out")["choices"] == [["x", "2"], ["y", "z"]]


def _custom_parquet(path: Path) -> Path:
    datasets.Dataset.from_dict(
        {
            "pictures": [[_png(RED), _png(GREEN)], [_png(BLUE)]],
            "prompt": ["<image> then <image>: first colour?", "Colour?"],
            "label": ["red", "blue"],
            "question": ["ignored", "ignored"],
        }
    ).to_parquet(str(path))
    return path


def test_column_flags_map_other_names(tmp_path):
    source = _custom_parquet(tmp_path / "custom.parquet")
    with pytest.raises(PreprocessError, match="image column"):
        _run(source, tmp_path / "none")
    report = _run(source, tmp_path / "out", image_column="pictures", question_column="prompt",
                  answer_column="label")
    assert (report.kept, report.rejected) == (2, 0)
    ds = load_canonical(tmp_path / "out")
    assert ds["question"] == ["<image> then <image>: first colour?", "Colour?"]
    assert ds["answer"] == ["red", "blue"]
    assert [len(images) for images in ds["images"]] == [2, 1]


def test_column_flag_naming_an_absent_column_is_fatal(tmp_path):
    source = _custom_parquet(tmp_path / "custom.parquet")
    with pytest.raises(PreprocessError, match="no column 'query'"):
        _run(source, tmp_path / "out", image_column="pictures", question_column="query")


def test_column_flags_apply_to_jsonl_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"img": ["a.png", "a.png"], "q": "<image><image>Same?", "gt": "yes"}) + "\n"
        + json.dumps({"image": "a.png", "q": "Colour?", "gt": "red"}) + "\n"
    )
    report = _run(tmp_path / "rows.jsonl", tmp_path / "out", image_column="img", question_column="q",
                  answer_column="gt")
    assert [r.reason for r in report.rejected_rows] == [pp.MISSING_IMAGE]  # row 2 has no `img`
    row = load_canonical(tmp_path / "out")[0]
    assert (row["question"], row["answer"], len(row["images"])) == ("<image><image>Same?", "yes", 2)


# ----------------------------------------------------------------------------- end to end

PAD = "<|image_pad|>"


def test_easyr1_parquet_through_preprocess_and_one_grpo_step(tmp_path, monkeypatch):
    source = easyr1_parquet(
        tmp_path / "train.parquet",
        [
            {"images": [_image(RED, (56, 56)), _image(BLUE, (84, 56))],
             "problem": "First<image>second<image>Which one is blue?", "answer": "second"},
            {"images": [_image(GREEN)], "problem": "<image>What colour is it?", "answer": "green"},
        ],
    )
    data = tmp_path / "data"
    assert main(["preprocess", str(source), "--out", str(data), "--no-progress"]) == 0
    assert json.loads((data / "report.json").read_text())["kept"] == 2

    seen = []  # every prompt batch the recipe builds

    def recording(*args, **kwargs):
        batch = real(*args, **kwargs)
        seen.append(batch)
        return batch

    real = policy_module.build_prompt_batch
    monkeypatch.setattr(policy_module, "build_prompt_batch", recording)
    run = tmp_path / "run"
    assert main(["train", "grpo", f"data.train={data}", f"output_dir={run}", "max_steps=1",
                 "rollout.num_generations=2", "rollout.max_new_tokens=4",
                 "prompts_per_step=2", "algorithm.micro_batch_prompts=1",
                 "heldout_eval=false"]) == 0

    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and math.isfinite(record["loss"])
    assert record["data/skipped_rows"] == 0

    from vlreason.models.loading import load_processor

    tokenizer = load_processor(str(run / "final")).tokenizer
    two = [(b, i) for b in seen for i, n in enumerate(b.images_per_prompt) if n == 2]
    assert two, "the two-image row never reached a prompt"
    batch, index = two[0]
    ids = batch.input_ids_PT[index][batch.attention_mask_PT[index].bool()]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "<image>" not in text
    first, second, question = text.index("First"), text.index("second"), text.index("Which one")
    pads = [i for i in range(len(text)) if text.startswith(PAD, i)]
    assert first < pads[0] < second < pads[-1] < question
    between = text[first:question]
    assert between.count("<|vision_start|>") == 2 and between.count(PAD) == len(pads)

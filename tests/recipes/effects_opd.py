"""Effect check for Vision-OPD, collected through tests/recipes/test_effects.py (this module's
name keeps pytest from collecting it a second time): on fine-detail rows, distilling from a teacher
that sees the evidence crop raises the student's held-out full-image accuracy, and raises
it more than the same training with ``teacher.view=full`` (no privileged view: the
teacher is the student's EMA on the student's own image). Same start, same seed, same
data, same steps; only ``teacher.view`` differs. CPU, tiny model, slow.

Design (the tiny model learns colour, not position; issue 11's calibration):

* rows: ``synthetic/fine_detail`` at 224 px: an 8-px coloured mark (one of 4 colours) in a
  grey cluttered image; the student sees the full image at a 224 x 224 budget (the mark is
  8 px, one patch of 14); the teacher's image (``data_pipelines/opd_crops.py``: the box
  with no margin, grown to 16 px, enlarged 4x) is 64 px with the mark 32 px across.
* start: SFT (answer-only target ``<answer>colour</answer>``) on a mix of the teacher's
  crops with their true colour and the full images with a colour drawn at random. The
  crops teach the model to read a crop; the full images teach the answer format on full
  images but carry no information about the colour, so the start reads the crop
  (teacher) and answers the full image at about chance (student). Without the full-image
  half the student's format breaks on full images (measured: 0.0 accuracy at the start)
  and any arm whose teacher has a good format would "win" by repairing the format alone.
* arms: 30 Vision-OPD steps (8 prompts x G=4, 12 new tokens, lr 1e-3, EMA 0.05, seed 0),
  ``teacher.view=crop`` (method) vs ``teacher.view=full`` (control).
* held out: 64 fresh rows (seed 99), greedy, full image at the student's budget; the
  teacher's accuracy on the same rows' crops is checked first.

Asserted (1 seed, seed 0): the teacher on the crop beats the start on the full image by
at least 0.3; the method arm's held-out accuracy rises by at least 0.10 over the start
and beats the control arm by at least 0.10.

Measured (seed 0, 2-core CPU shared with other jobs, this test at commit 8d39e6a, 14 min
23 s at load 9-12; a prototype of the same procedure gave the same numbers): teacher on
crop 0.828, start on full 0.203 (chance 0.25), method 0.328, control 0.203. The margins are close to what was measured (0.125 each, i.e. 8 of
64 held-out rows; the binomial standard error at 0.3 is about 0.057): one seed, small
headroom. The method's rise is 2 standard errors, not a large effect; more steps or
rows were not tried in the time available.

An earlier design (SFT on crops only) started the student at 0.0 on full images (its
answer format broke on full images); there the method reached 0.203 and the control
stayed at 0.0, but that gap is format repair by a teacher with a good format, not
colour reading, hence the random-colour full images in the SFT mix here.
"""

from __future__ import annotations

import random

import pytest

from vlreason.cli import main

COLOURS = ["red", "green", "blue", "yellow"]
CROP = {"margin": 0.0, "min_size": 16, "upscale": 4.0}
STUDENT_PIXELS = 224 * 224


def _datasets(root):
    import datasets

    from data_pipelines.opd_crops import add_teacher_crops
    from data_pipelines.synthetic import make_fine_detail
    from vlreason.data.schema import rows_to_dataset

    paths = {}
    for name, n, seed in (("train", 256, 0), ("held", 64, 99)):
        ds = add_teacher_crops(rows_to_dataset(make_fine_detail(n, seed, size=224, marker=8)), **CROP)
        ds.save_to_disk(str(root / name))
        crops = ds.map(lambda r: {"images": r["teacher_images"]}).remove_columns(["teacher_images"])
        crops.save_to_disk(str(root / f"{name}_crop"))
        paths[name], paths[f"{name}_crop"] = root / name, root / f"{name}_crop"
        if name == "train":
            coin = random.Random(1)
            full = ds.remove_columns(["teacher_images"]).map(lambda r, coin=coin: {"answer": coin.choice(COLOURS)})
            datasets.concatenate_datasets([crops, full]).shuffle(seed=0).save_to_disk(str(root / "sft_mix"))
            paths["sft_mix"] = root / "sft_mix"
    return paths


def _accuracy(model_dir, data, max_pixels: int) -> float:
    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.rollout.policy import Policy, RolloutConfig

    policy = Policy.load(ModelConfig(name_or_path=str(model_dir)), RolloutConfig(max_pixels=max_pixels))
    summary, _ = evaluate(policy, load_canonical(data), EvalConfig(max_new_tokens=12))
    return summary["accuracy"]


def _opd(out, start, train, view: str) -> None:
    assert main(["train", "vision_opd", f"output_dir={out}", f"model.name_or_path={start}", f"data.train={train}",
                 "max_steps=30", "rollout.num_generations=4", "rollout.max_new_tokens=12",
                 f"rollout.max_pixels={STUDENT_PIXELS}", "prompts_per_step=8",
                 "algorithm.micro_batch_prompts=8", "optim.lr=1e-3", f"teacher.view={view}",
                 f"teacher.upscale={CROP['upscale']}", "progress=false", "seed=0", "trackers=[jsonl]"]) == 0


@pytest.mark.slow
def test_vision_opd_crop_teacher_raises_full_image_accuracy_more_than_a_full_image_teacher(tmp_path):
    paths = _datasets(tmp_path)
    sft = tmp_path / "sft"
    assert main(["train", "sft", f"output_dir={sft}", f"data.train={paths['sft_mix']}", "max_steps=120",
                 "optim.lr=2e-3", "optim.warmup_steps=10", "prompts_per_step=16", "sft.micro_batch_prompts=16",
                 "sft.target=answer", "sft.answer_template=<answer>{answer}</answer>", "progress=false"]) == 0
    teacher = _accuracy(sft / "final", paths["held_crop"], 16 * STUDENT_PIXELS)
    start = _accuracy(sft / "final", paths["held"], STUDENT_PIXELS)
    assert teacher >= start + 0.3, (teacher, start)  # the crop is a privileged view
    _opd(tmp_path / "method", sft / "final", paths["train"], "crop")
    _opd(tmp_path / "control", sft / "final", paths["train"], "full")
    method = _accuracy(tmp_path / "method" / "final", paths["held"], STUDENT_PIXELS)
    control = _accuracy(tmp_path / "control" / "final", paths["held"], STUDENT_PIXELS)
    print(f"Vision-OPD effect, held-out full-image accuracy (greedy): teacher on crop {teacher:.3f}, "
          f"start {start:.3f}, method (crop teacher) {method:.3f}, control (full-image teacher) {control:.3f}")
    assert method >= start + 0.10, (start, method)
    assert method >= control + 0.10, (method, control)

"""The Vision-OPD recipe: a short run (loss finite, student and EMA teacher move, metrics,
teacher files next to the checkpoints), a frozen teacher with ``teacher.ema=0``, the
teacher really sees the crop, loss 0 when teacher == student on the same image, rows
without boxes, stop + ``resume=auto`` == an uninterrupted run (teacher included), a
bf16 teacher whose EMA accumulates in an fp32 shadow (saved as such), and (slow) the
student's JSD to the teacher falls over training and the EMA works through an FSDP2
(DTensor) student in a one-process gloo group.

Runs go through ``vlreason.recipe_base.run_recipe`` (the CLI registry entry is added
separately)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.vision_opd import TEACHER_FILE, VisionOPDRecipe
from vlreason.config import load_config
from vlreason.recipe_base import run_recipe
from vlreason.train.metrics import StepTimer
from vlreason.views import crop_to_box

FAST = ["rollout.num_generations=2", "rollout.max_new_tokens=24", "prompts_per_step=2",
        "algorithm.micro_batch_prompts=1", "optim.lr=1e-3", "progress=false", "trackers=[jsonl]", "keep_last=0"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(run: Path, *overrides: str) -> Path:
    return run_recipe(VisionOPDRecipe, None, [f"output_dir={run}", *FAST, *overrides])


def test_shipped_config_is_the_embedded_default_and_bad_values_are_refused():
    from vlreason.config import ConfigError, to_dict

    cls = VisionOPDRecipe.config_class
    shipped = Path(__file__).parents[2] / "recipes" / "configs" / "vision_opd.yaml"
    assert to_dict(load_config(cls, shipped)) == to_dict(load_config(cls))
    cfg = load_config(cls)
    assert (cfg.teacher.ema, cfg.algorithm.alpha, cfg.algorithm.topk, cfg.algorithm.ratio_cap) == (0.05, 0.5, 100, 2.0)
    for bad in ("teacher.ema=1.5", "teacher.view=zoom", "teacher.no_box=drop", "algorithm.divergence=tv"):
        with pytest.raises((ConfigError, ValueError)):
            load_config(cls, None, [bad])


@pytest.fixture(scope="module")
def base_weights() -> dict[str, torch.Tensor]:
    """The default start (assets/warm-tiny) under the model's parameter names."""
    from transformers import AutoModelForImageTextToText

    from vlreason.paths import warm_model

    model = AutoModelForImageTextToText.from_pretrained(warm_model())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("opd") / "straight"
    _run(run, "max_steps=4", "save_steps=2")
    return run


def test_run_trains_student_and_ema_teacher(straight, base_weights):
    records = _metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "jsd", "agreement", "completion_len", "truncated_frac", "weight_mean",
                "teacher/distance", "data/skipped_rows", "data/no_box_rows",
                "time/rollout", "time/teacher", "time/update"):
        assert key in records[-1], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(0.0 <= r["agreement"] <= 1.0 for r in records)
    # one update per rollout: the importance weight is 1 (up to rounding)
    assert all(abs(r["weight_mean"] - 1.0) < 1e-4 for r in records)
    # the teacher is fed the crop: fewer image tokens than the student's full image
    assert records[0]["teacher_image_tokens"] < records[0]["student_image_tokens"]

    student = load_file(str(straight / "checkpoints" / "step-4" / "model.safetensors"))
    assert student.keys() <= base_weights.keys()
    unchanged = [n for n in student if torch.equal(student[n], base_weights[n])]
    assert not unchanged, f"trainable tensors that did not change: {unchanged}"
    # the teacher moved by EMA: away from the start, but not all the way to the student
    teacher = load_file(str(straight / "checkpoints" / "step-4" / TEACHER_FILE))
    assert teacher.keys() == student.keys()
    assert all(not torch.equal(teacher[n], base_weights[n]) for n in teacher)
    for n in teacher:
        assert (teacher[n] - base_weights[n]).norm() < (student[n] - base_weights[n]).norm(), n
    assert (straight / "checkpoints" / "step-2" / TEACHER_FILE).is_file()  # in every checkpoint
    assert (straight / "final" / "model.safetensors").is_file()


def test_stop_and_resume_matches_uninterrupted_run(straight, tmp_path):
    """Stopped after 2 steps (checkpoint with its teacher), resumed to 4: same student,
    same teacher, same metrics as the straight run."""
    run = tmp_path / "resumed"
    _run(run, "max_steps=2")
    assert (run / "checkpoints" / "step-2" / TEACHER_FILE).is_file()
    _run(run, "max_steps=4", "resume=auto")
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    for name in ("checkpoints/step-4/model.safetensors", f"checkpoints/step-4/{TEACHER_FILE}"):
        a, b = load_file(str(straight / name)), load_file(str(run / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
    for ra, rb in zip(_metrics(straight), _metrics(run)):
        assert ra["jsd"] == pytest.approx(rb["jsd"], rel=1e-5, abs=1e-7)
        assert ra["completion_len"] == rb["completion_len"]


def test_ema_zero_keeps_the_teacher_frozen(tmp_path, base_weights):
    run = tmp_path / "frozen"
    _run(run, "max_steps=2", "teacher.ema=0")
    teacher = load_file(str(run / "checkpoints" / "step-2" / TEACHER_FILE))
    student = load_file(str(run / "checkpoints" / "step-2" / "model.safetensors"))
    assert all(torch.equal(teacher[n], base_weights[n]) for n in teacher)
    assert any(not torch.equal(student[n], base_weights[n]) for n in student)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A set-up recipe for in-process checks (no training loop)."""
    cfg = load_config(VisionOPDRecipe.config_class, None, [
        f"output_dir={tmp_path_factory.mktemp('opd') / 'inproc'}", *FAST])
    cfg.model.name_or_path = str(VisionOPDRecipe.default_model())
    r = VisionOPDRecipe(cfg)
    r.setup()
    return r


def _first_row(recipe) -> dict:
    return recipe.stream.dataset[0]


def test_teacher_input_is_the_crop(recipe):
    from vlreason.rollout.prompts import decode_row_images

    row = _first_row(recipe)
    recipe.stream.position = 0
    recipe.stream.shuffle = False
    student, teacher = recipe.next_prompts(0)
    full = decode_row_images(row)[0]
    t = recipe.cfg.teacher
    crop = crop_to_box(full, row["boxes"][0], margin=t.margin, upscale=t.upscale, min_size=t.min_size)
    expected_teacher = recipe.policy.prompts([row], images=[[crop]])
    expected_student = recipe.policy.prompts([row])
    n_t = int(expected_teacher.image_grid_thw.prod(-1).item())
    n_s = int(expected_student.image_grid_thw.prod(-1).item())
    assert not torch.equal(teacher.image_grid_thw[0], student.image_grid_thw[0])
    torch.testing.assert_close(teacher.image_grid_thw[0], expected_teacher.image_grid_thw[0])
    torch.testing.assert_close(teacher.pixel_values[:n_t], expected_teacher.pixel_values)
    torch.testing.assert_close(student.pixel_values[:n_s], expected_student.pixel_values)
    assert [r["id"] for r in teacher.rows] == [r["id"] for r in student.rows]
    # draw_box changes the student's image (a red outline), not the teacher's crop
    recipe.cfg.algorithm.draw_box = True
    try:
        s_img, t_img = recipe.views(row)
    finally:
        recipe.cfg.algorithm.draw_box = False
    import numpy as np

    assert not np.array_equal(np.asarray(s_img[0]), np.asarray(full))
    assert s_img[0].size == full.size and t_img[0].size == crop.size


def test_loss_is_zero_when_teacher_is_student_on_the_same_image(recipe):
    recipe.cfg.teacher.view = "full"
    try:
        micro, _ = recipe.prepare(0, StepTimer())
        losses = [recipe.step(mb)[0] for mb in micro]
        metrics = recipe.after_update(0)  # the step's jsd / agreement, from the loss pass
    finally:
        recipe.cfg.teacher.view = "crop"
    total = sum(float(loss.detach()) for loss in losses)
    assert abs(total) < 1e-6
    assert metrics["jsd"] < 1e-6 and metrics["agreement"] == 1.0
    assert all(loss.requires_grad for loss in losses)


def test_rows_without_a_box_are_skipped_and_counted_or_use_the_full_image(recipe):
    from vlreason.data.stream import RowStream

    with_box = dict(_first_row(recipe))
    without = {**with_box, "id": "no-box", "boxes": []}
    old_stream = recipe.stream
    try:
        recipe.cfg.prompts_per_step = 2
        recipe.stream = recipe.rows.stream = RowStream([without, with_box], seed=0, shuffle=False)
        before = recipe.no_box_rows
        student, teacher = recipe.next_prompts(0)
        assert [r["id"] for r in student.rows] == [with_box["id"]]
        assert recipe.no_box_rows == before + 1
        recipe.cfg.teacher.no_box = "full"
        recipe.stream = recipe.rows.stream = RowStream([without, with_box], seed=0, shuffle=False)
        student, teacher = recipe.next_prompts(0)
        assert [r["id"] for r in student.rows] == ["no-box", with_box["id"]]
        assert torch.equal(student.image_grid_thw[0], teacher.image_grid_thw[0])  # full image for both
        assert not torch.equal(student.image_grid_thw[1], teacher.image_grid_thw[1])  # the crop
    finally:
        recipe.cfg.teacher.no_box = "skip"
        recipe.stream = recipe.rows.stream = old_stream


def test_ema_update_is_the_paper_formula(recipe):
    """after_update: theta_T <- 0.95 theta_T + 0.05 theta_S on the trainable tensors."""
    student = dict(recipe.model.named_parameters())
    teacher = dict(recipe.teacher.named_parameters())
    name = recipe.trainable[0]
    saved_s, saved_t = student[name].detach().clone(), teacher[name].detach().clone()
    try:
        with torch.no_grad():
            student[name].add_(torch.randn_like(student[name]))
        expected = 0.95 * saved_t + 0.05 * student[name].detach()
        metrics = recipe.after_update(0)
        torch.testing.assert_close(teacher[name].detach(), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(recipe.teacher_shadow[name], expected, atol=1e-6, rtol=1e-6)
        assert metrics["teacher/distance"] > 0
    finally:
        with torch.no_grad():
            student[name].copy_(saved_s)
            teacher[name].copy_(saved_t)
            recipe.teacher_shadow[name].copy_(saved_t)


def test_bf16_teacher_accumulates_its_ema_in_an_fp32_shadow_and_saves_it(tmp_path):
    """model.dtype=bfloat16: the teacher's forward copy is bf16, its EMA lives in an fp32
    shadow that takes increments far below bf16's rounding step, and the checkpoint holds
    that fp32 shadow (load_extra restores it exactly)."""
    cfg = load_config(VisionOPDRecipe.config_class, None, [
        f"output_dir={tmp_path / 'bf16'}", "model.dtype=bfloat16", *FAST])
    cfg.model.name_or_path = str(VisionOPDRecipe.default_model())
    r = VisionOPDRecipe(cfg)
    r.setup()
    teacher = dict(r.teacher.named_parameters())
    student = dict(r.model.named_parameters())
    name = r.trainable[0]
    assert teacher[name].dtype == torch.bfloat16
    assert all(r.teacher_shadow[n].dtype == torch.float32 for n in r.trainable)
    start_shadow = r.teacher_shadow[name].clone()
    # the student moves by 0.01; each EMA increment (<= 5e-4) is below half a bf16 step for
    # most weights, so only an fp32 accumulator follows it exactly
    with torch.no_grad():
        student[name].copy_((student[name].float() + 0.01).to(student[name].dtype))
    moved = student[name].detach().float() - start_shadow
    for _ in range(3):
        r.after_update(0)
    expected = start_shadow + (1 - 0.95**3) * moved  # three EMA steps towards a fixed student
    torch.testing.assert_close(r.teacher_shadow[name], expected, atol=1e-7, rtol=1e-5)
    assert not torch.equal(r.teacher_shadow[name], start_shadow)
    assert torch.equal(teacher[name].detach(), r.teacher_shadow[name].to(torch.bfloat16))  # refreshed copy
    r.save_extra(tmp_path)
    saved = load_file(str(tmp_path / TEACHER_FILE))
    assert saved[name].dtype == torch.float32 and torch.equal(saved[name], r.teacher_shadow[name].cpu())
    with torch.no_grad():
        r.teacher_shadow[name].zero_()
    r.load_extra(tmp_path)
    assert torch.equal(r.teacher_shadow[name].cpu(), saved[name])
    assert torch.equal(teacher[name].detach(), saved[name].to(torch.bfloat16))


@pytest.mark.slow
def test_student_jsd_to_the_teacher_falls(tmp_path):
    run = tmp_path / "learn"
    _run(run, "max_steps=10", "teacher.ema=0", "prompts_per_step=4", "rollout.num_generations=4")
    jsd = [r["jsd"] for r in _metrics(run)]
    first, last = sum(jsd[:3]) / 3, sum(jsd[-3:]) / 3
    assert last < first, jsd


OPD_IN_GLOO = """
import sys, torch.distributed as dist
dist.init_process_group("gloo")
from vlreason.cli import main
code = main(["train", "vision_opd", *sys.argv[1:]])
dist.destroy_process_group()
sys.exit(code)
"""


@pytest.mark.slow
def test_fsdp2_bf16_teacher_ema_through_sharded_student(tmp_path, base_weights):
    """parallel.strategy=fsdp2 in a one-process gloo group, bf16 compute: the student's
    parameters are DTensors, the EMA reads their full tensors; the checkpoint holds the
    fp32 shadow, which moved away from the start."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = tmp_path / "fsdp2"
    args = [f"output_dir={run}", *FAST, "max_steps=2", "parallel.strategy=fsdp2", "model.dtype=bfloat16"]
    proc = subprocess.run([sys.executable, "-c", OPD_IN_GLOO, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "parallel: fsdp2 on 1 processes" in proc.stdout
    teacher = load_file(str(run / "checkpoints" / "step-2" / TEACHER_FILE))
    assert teacher and all(t.dtype == torch.float32 for t in teacher.values())
    assert any(not torch.equal(teacher[n], base_weights[n]) for n in teacher)
    assert all(r["teacher/distance"] > 0 for r in _metrics(run))


def test_several_updates_per_rollout_weight_departs_from_one_and_is_capped(tmp_path):
    """algorithm.updates_per_rollout=4, mini_batches=2: one rollout serves four updates
    (mini-batch 0, 1, 0, 1); logp_old is fixed at the rollout's weights (mini-batch 0's
    from update 0's own forward, mini-batch 1's from a pass before it), so once the
    student has moved the importance weight departs from 1, and it never exceeds
    algorithm.ratio_cap (here 1.02, reached by some token); the fifth step samples anew."""
    cap = 1.02
    cfg = load_config(VisionOPDRecipe.config_class, None, [
        f"output_dir={tmp_path / 'k4'}", *FAST, "prompts_per_step=1", "algorithm.updates_per_rollout=4",
        "algorithm.mini_batches=2", f"algorithm.ratio_cap={cap}"])
    cfg.model.name_or_path = str(VisionOPDRecipe.default_model())
    r = VisionOPDRecipe(cfg)
    r.setup()
    seen = []
    for step in range(5):
        micro, metrics = r.prepare(step, StepTimer())
        outs = [r.step(mb)[1] for mb in micro]
        seen.append((metrics, outs, [id(mb) for mb in micro]))
        assert all(mb.old_logprobs_NT is not None for mb in micro)
        # stands in for an optimizer update: a step that raises the sampled tokens' log-probs
        params = [p for p in r.model.parameters() if p.requires_grad]
        logp = sum(r.policy.token_outputs(mb).logprobs_NT.sum() for mb in micro)
        grads = torch.autograd.grad(logp, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g / norm, alpha=0.5)
    assert [m["rollout/mini_batch"] for m, _, _ in seen] == [0, 1, 0, 1, 0]
    assert [m["rollout/reused"] for m, _, _ in seen] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert seen[2][2] == seen[0][2] and seen[3][2] == seen[1][2]  # the same micro-batches reused
    for u in (0, 4):  # a fresh rollout's first update runs at the rollout's weights
        assert all(o["weight_mean"] == pytest.approx(1.0, abs=1e-5) for o in seen[u][1])
    for u in (1, 2, 3):  # the student has moved since the rollout
        assert all(abs(o["weight_mean"] - 1.0) > 1e-3 for o in seen[u][1]), seen[u][1]
        assert all(o["weight_max"] <= cap + 1e-6 for o in seen[u][1])
    assert any(o["weight_max"] == pytest.approx(cap) for u in (1, 2, 3) for o in seen[u][1])
    with pytest.raises((ValueError, Exception), match="must divide"):
        load_config(VisionOPDRecipe.config_class, None, ["algorithm.updates_per_rollout=3",
                                                         "algorithm.mini_batches=2"])


def test_teacher_reads_the_rows_teacher_image_under_its_own_budget(recipe):
    """A row carrying teacher_images (data_pipelines/opd_crops.py) gives the teacher that
    image, not a run-time crop; teacher prompts use the teacher's budget (default: the
    student's max_pixels x upscale^2), so an enlarged crop is not shrunk to the student's."""
    import numpy as np
    from PIL import Image

    from data_pipelines.opd_crops import teacher_crop_row
    from vlreason.data.images import encode_image

    row = dict(_first_row(recipe))
    given = Image.fromarray(np.full((168, 168, 3), 200, dtype=np.uint8))
    _, teacher = recipe.views({**row, "teacher_images": [encode_image(given)]})
    assert np.array_equal(np.asarray(teacher[0]), np.asarray(given))
    student_budget, budget = recipe.policy.budget, recipe.teacher_budget
    assert budget.max_pixels == round(student_budget.max_pixels * recipe.cfg.teacher.upscale ** 2)
    prompts = recipe.teacher_prompts([row], [[given]])
    h, w = (int(v) * 14 for v in prompts.image_grid_thw[0, 1:])
    assert (w, h) == budget.target_size(168, 168) == (168, 168)  # within the teacher's budget
    assert student_budget.target_size(168, 168) != (168, 168)  # the student's would shrink it
    # the pipeline's crop equals the recipe's run-time crop
    t = recipe.cfg.teacher
    written = teacher_crop_row(row, margin=t.margin, upscale=t.upscale, min_size=t.min_size)
    _, from_data = recipe.views(written)
    _, at_run_time = recipe.views(row)
    assert np.array_equal(np.asarray(from_data[0]), np.asarray(at_run_time[0]))


def test_paper_config_has_the_papers_numbers_and_says_where_each_value_comes_from():
    import re

    path = Path(__file__).parents[2] / "recipes" / "configs" / "vision_opd_paper.yaml"
    cfg = load_config(VisionOPDRecipe.config_class, path)
    a, t, ro = cfg.algorithm, cfg.teacher, cfg.rollout
    assert (cfg.prompts_per_step, ro.num_generations, ro.temperature, ro.max_new_tokens) == (96, 8, 1.0, 1024)
    assert (a.topk, a.divergence, a.alpha, a.ratio_cap, a.aggregation) == (100, "jsd", 0.5, 2.0, "token-mean")
    assert (t.ema, t.view, t.upscale, a.draw_box) == (0.05, "crop", 2.0, True)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps) == (2e-6, 10, 6241 // 96)
    assert ro.max_pixels >= 1024 * 1024 > 112 * 112  # a real student budget for fine detail
    for line in path.read_text().splitlines():  # every value carries its source
        if re.match(r"^\s*[a-z_]+: \S", line):
            assert re.search(r"#.*(\[M|\[ours\]|set it|all rows)", line), line

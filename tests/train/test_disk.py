"""Disk and paths: before the first step the run directory is checked for write access
and for room for one checkpoint (a one-line error otherwise); a checkpoint write that
runs out of space mid-run leaves the previous checkpoint intact and loadable, stops the
run with a message naming the folder, and the run resumes once there is space."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from toy_recipe import ToyLinear  # tests/train/toy_recipe.py

from vlreason.outputs import OutputPathError
from vlreason.train import disk
from vlreason.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from vlreason.train.disk import CheckpointWriteError, DiskSpaceError, estimate_checkpoint_bytes
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
from vlreason.train.schedule import build_optimizer

Toy = ToyLinear  # remembers its weights after each update (.weights)


def _cfg(run: Path, **kw) -> LoopConfig:
    return LoopConfig(output_dir=str(run), trackers=["jsonl"], progress=False,
                      optim=OptimConfig(lr=0.01, max_grad_norm=0.0), **kw)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("trained", [False, True], ids=["before-first-step", "resumed"])
def test_estimate_brackets_the_size_of_a_real_checkpoint(tmp_path, trained):
    """Parameters + optimizer state + plain copy is at most what a real save writes, and
    the total with its margin is at least that; frozen parameters are not counted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256), torch.nn.Linear(256, 8))
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.0)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    if trained:  # the optimizer state exists: it is measured rather than assumed
        model(torch.randn(2, 256)).sum().backward()
        optimizer.step()
    need = estimate_checkpoint_bytes(model, optimizer)
    assert need["parameters"] == trainable
    assert need["optimizer"] >= 2 * trainable and need["optimizer"] < 2 * trainable + 4096
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, rng=True)
    written = _dir_bytes(path)
    assert need["parameters"] + need["optimizer"] + need["plain_copy"] <= written <= need["total"], (need, written)


# --------------------------------------------------------------- before training


def test_no_room_for_one_checkpoint_stops_before_the_first_step(tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = Toy()
    trainer = Trainer(_cfg(run, max_steps=3), recipe)
    need = estimate_checkpoint_bytes(recipe.model, trainer.optimizer)["total"]
    seen = []

    def free(path):
        seen.append(Path(path))
        return need - 1

    monkeypatch.setattr(disk, "free_bytes", free)
    with pytest.raises(DiskSpaceError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and f"not enough free space in {run / 'checkpoints'}" in message
    assert seen == [run / "checkpoints"]
    assert trainer.step == 0 and recipe.position == 0 and list_checkpoints(run) == []
    assert not (run / "metrics.jsonl").exists() or _steps(run) == []
    # exactly one checkpoint's worth of space is enough
    monkeypatch.setattr(disk, "free_bytes", lambda path: need)
    trainer.fit()
    assert _steps(run) == [1, 2, 3]


def test_unwritable_run_or_checkpoints_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputPathError, match=f"cannot write to {blocker}"):
        Trainer(_cfg(blocker / "run", max_steps=1), Toy()).fit()  # a run dir below a regular file
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints folder goes")
    recipe = Toy()
    with pytest.raises(OutputPathError, match="checkpoints is a file; expected a folder") as info:
        Trainer(_cfg(run, max_steps=1), recipe).fit()
    assert "\n" not in str(info.value) and recipe.position == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoints_folder_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="cannot write to .*checkpoints"):
            Trainer(_cfg(run, max_steps=1), Toy()).fit()
    finally:
        (run / "checkpoints").chmod(0o755)


def test_cli_refuses_a_run_without_room_for_a_checkpoint(tmp_path, monkeypatch, capsys):
    from vlreason.cli import main

    monkeypatch.setattr(disk, "free_bytes", lambda path: 1024)
    run = tmp_path / "run"
    assert main(["train", "grpo", f"output_dir={run}", "max_steps=1", "rollout.num_generations=2",
                 "rollout.max_new_tokens=4", "prompts_per_step=1", "algorithm.micro_batch_prompts=1",
                 "heldout_eval=false"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"not enough free space in {run / 'checkpoints'}" in err[0], err
    assert "1.0 KiB is free" in err[0]
    assert list_checkpoints(run) == [] and not (run / "final").exists()


# ------------------------------------------------------------------ disk full mid-run


def _enospc(*args, **kwargs):
    """A writer on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


WRITERS = {
    "dcp": "torch.distributed.checkpoint.filesystem._write_item",  # torch's DCP writer (state/)
    "safetensors": "vlreason.train.checkpoint.save_file",  # model.safetensors
    "torch.save": "torch.save",  # rng.pt, scheduler.pt
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_disk_full_mid_run_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch, writer):
    """Saves every step with keep_last=1; the save of step 3 fails with ENOSPC in one of
    the writers. The run stops with a one-line CheckpointWriteError naming the folder and
    step-2, the failed save is not retried, step-2 is the only checkpoint, intact and
    loadable with the weights of step 2, no temp folder is left, and once there is space
    resume=auto finishes the run with no gaps in metrics.jsonl."""
    import vlreason.train.loop as loop

    target = WRITERS[writer]
    saves = []
    real_save = loop.save_checkpoint

    def counting_save(run_dir, step, **kwargs):
        saves.append(step)
        return real_save(run_dir, step, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", counting_save)

    class FullAt3(Toy):
        def after_update(self, step):
            super().after_update(step)
            if step + 1 == 3:  # the disk fills up during step 3
                monkeypatch.setattr(target, _enospc)

    run = tmp_path / "run"
    recipe = FullAt3()
    with pytest.raises(CheckpointWriteError) as info:
        Trainer(_cfg(run, max_steps=5, save_steps=1, keep_last=1), recipe).fit()
    monkeypatch.undo()
    message = str(info.value)
    ckpts = run / "checkpoints"
    assert "\n" not in message
    assert f"cannot write checkpoint step-3 in {ckpts}: No space left on device" in message
    assert f"the newest complete checkpoint, {ckpts / 'step-2'}, is intact" in message
    assert saves == [1, 2, 3] and recipe.position == 3  # stopped at once, the save not retried
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2"]  # no step-3.tmp-*
    fresh = Toy()
    torch.nn.init.zeros_(fresh.model.weight)
    _, state = load_checkpoint(ckpts / "step-2", model=fresh.model, restore_rng=False)
    assert state["step"] == 2 and state["recipe"] == {"position": 2}
    for name, param in fresh.model.named_parameters():
        assert torch.equal(param.detach(), recipe.weights[2][name]), name
    # space again: resume finishes the run from step 2
    resumed = Toy()
    trainer = Trainer(_cfg(run, max_steps=5, save_steps=1, keep_last=1, resume="auto"), resumed)
    trainer.fit()
    assert trainer.step == 5 and resumed.position == 5
    assert _steps(run) == [1, 2, 3, 4, 5]
    assert [p.name for p in list_checkpoints(run)] == ["step-5"]

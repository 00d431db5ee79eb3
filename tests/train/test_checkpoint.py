"""Atomic checkpoints: exact resume of model / optimizer / scheduler / RNG, pruning,
the ``latest`` pointer and resume resolution."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from vlreason.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from vlreason.train.schedule import build_optimizer, build_scheduler


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(5, 3)  # consumes the torch RNG, like dropout / sampling would
        loss = model(x).pow(2).mean() + random.random() + float(np.random.rand())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def _save(run_dir: Path, step: int, **kwargs) -> Path:
    return save_checkpoint(
        run_dir,
        step,
        model_state={"w": torch.ones(2) * step},
        trainer_state={"step": step},
        rng=False,
        **kwargs,
    )


def test_roundtrip_restores_training_and_rng_exactly(tmp_path: Path):
    random.seed(1)
    np.random.seed(1)
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 3)
    path = save_checkpoint(
        tmp_path,
        3,
        model_state=dict(model.state_dict()),
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"step": 3, "data_position": 15, "stage": "s1"},
        config={"seed": 1, "output_dir": tmp_path, "betas": (0.9, 0.99)},
    )
    assert path == tmp_path / "checkpoints" / "step-3"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    draws_after_save = _draws()
    _train(model, optimizer, scheduler, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = scheduler.get_last_lr()

    fresh, fresh_opt, fresh_sched = _setup(seed=123)  # different init and RNG state
    model_state, trainer_state = load_checkpoint(path, optimizer=fresh_opt, scheduler=fresh_sched)
    fresh.load_state_dict(model_state)
    assert trainer_state == {"step": 3, "data_position": 15, "stage": "s1"}
    draws_after_load = _draws()
    assert draws_after_load[:2] == draws_after_save[:2]
    assert torch.equal(draws_after_load[2], draws_after_save[2])
    _train(fresh, fresh_opt, fresh_sched, 2)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert fresh_sched.get_last_lr() == expected_lr
    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config == {"seed": 1, "output_dir": str(tmp_path), "betas": [0.9, 0.99]}


def test_sharded_bfloat16_roundtrip_through_the_safe_reader(tmp_path: Path):
    """The model= (DCP) path in bfloat16 with a frozen layer: the allow-listed metadata
    reader and the weights-only byte entries restore weights, AdamW moments and the
    param_groups (lr, betas, names) exactly, and resuming trains identically."""
    model, optimizer, scheduler = _setup()
    model.to(torch.bfloat16)
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)

    def train(model, optimizer, steps: int) -> None:
        for step in range(steps):
            loss = model(torch.full((5, 3), 0.5 + step, dtype=torch.bfloat16)).float().pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train(model, optimizer, 2)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, rng=False)
    train(model, optimizer, 1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, _, _ = _setup(seed=123)
    fresh.to(torch.bfloat16)
    fresh[0].weight.requires_grad_(False)
    fresh[0].weight.data.copy_(model[0].weight)  # frozen weights are not in the checkpoint
    fresh_opt = build_optimizer(fresh.named_parameters(), lr=0.5, weight_decay=0.0)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, restore_rng=False)
    groups = [(g["name"], g["lr"], g["betas"], g["weight_decay"]) for g in fresh_opt.param_groups]
    assert groups == [(g["name"], g["lr"], g["betas"], g["weight_decay"]) for g in optimizer.param_groups]
    train(fresh, fresh_opt, 1)
    for key, value in fresh.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, expected[key]), key


def test_tied_and_view_tensors_are_saved(tmp_path: Path):
    weight = torch.arange(6.0).reshape(2, 3)
    state = {"embed.weight": weight, "lm_head.weight": weight, "row": weight[1]}
    path = save_checkpoint(tmp_path, 1, model_state=state, rng=False)
    loaded, _ = load_checkpoint(path, restore_rng=False)
    assert torch.equal(loaded["lm_head.weight"], weight) and torch.equal(loaded["row"], weight[1])
    assert torch.equal(weight, torch.arange(6.0).reshape(2, 3))  # caller's tensors untouched


def test_latest_pointer_and_keep_last(tmp_path: Path):
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-5"]
    assert (root / "latest").read_text() == "step-5\n"
    assert latest_checkpoint(tmp_path) == root / "step-5"
    # Rewinding (resumed from an earlier step): the checkpoint just written is never pruned,
    # and `latest` names it even though a higher step exists.
    _save(tmp_path, 2, keep_last=1)
    assert (root / "step-2").is_dir() and (root / "latest").read_text() == "step-2\n"
    assert latest_checkpoint(tmp_path) == root / "step-2"
    assert not any(p.name.startswith(("step-4", "latest.tmp")) for p in root.iterdir())


def test_resaving_a_step_replaces_it(tmp_path: Path):
    _save(tmp_path, 3)
    path = save_checkpoint(tmp_path, 3, model_state={"w": torch.zeros(1)}, rng=False)
    loaded, _ = load_checkpoint(path, restore_rng=False)
    assert torch.equal(loaded["w"], torch.zeros(1))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] in (
        ["step-3", "latest"],
        ["latest", "step-3"],
    )


def test_crash_mid_write_leaves_no_complete_checkpoint(tmp_path: Path):
    _save(tmp_path, 1)

    def crash(tmp_dir: Path) -> None:
        assert tmp_dir.name.startswith("step-2.tmp-")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path, 2, extra=crash)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    assert resolve_resume(tmp_path, "auto") == root / "step-1"


def test_auto_ignores_leftover_tmp_and_incomplete_dirs(tmp_path: Path):
    assert resolve_resume(tmp_path, "auto") is None  # nothing saved yet
    _save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    # A temp dir left by a killed process (with every file present) and a step dir
    # without trainer state: neither counts, even with the pointer naming them.
    leftover = root / "step-9.tmp-4242"
    leftover.mkdir()
    for name in ("model.safetensors", "trainer_state.json"):
        (leftover / name).write_bytes((root / "step-3" / name).read_bytes())
    (root / "step-7").mkdir()
    (root / "step-7" / "model.safetensors").write_bytes(b"")
    (root / "latest").write_text("step-7\n")
    assert resolve_resume(tmp_path, "auto") == root / "step-3"
    (root / "latest").unlink()
    assert resolve_resume(tmp_path, "auto") == root / "step-3"


def test_resolve_resume_paths(tmp_path: Path):
    run = tmp_path / "run"
    assert resolve_resume(run, None) is None and resolve_resume(run, "") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(run, str(tmp_path / "nope"))
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(tmp_path / "other", str(run))
    _save(run, 4)
    _save(run, 8)
    ckpts = run / "checkpoints"
    assert resolve_resume(tmp_path / "other", str(ckpts / "step-4")) == ckpts / "step-4"
    assert resolve_resume(tmp_path / "other", str(run)) == ckpts / "step-8"
    assert resolve_resume(tmp_path / "other", ckpts) == ckpts / "step-8"
    (ckpts / "step-9").mkdir()  # incomplete: no files
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(run, str(ckpts / "step-9"))


def test_trainer_state_json_and_step_mismatch(tmp_path: Path):
    path = save_checkpoint(tmp_path, 5, model_state={}, trainer_state={"epoch": 1}, rng=False)
    assert json.loads((path / "trainer_state.json").read_text()) == {"epoch": 1, "step": 5}
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, 6, model_state={}, trainer_state={"step": 5})
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        load_checkpoint(path, optimizer=_setup()[1], restore_rng=False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path)


def test_keep_last_deletes_only_after_the_new_checkpoint_is_published(tmp_path: Path, monkeypatch):
    """Every deletion of an old checkpoint happens after the new one is complete under its
    final name and ``latest`` names it; each old one is renamed away before its files go."""
    import shutil

    import vlreason.train.checkpoint as ckpt

    root = tmp_path / "checkpoints"
    real_rmtree = shutil.rmtree
    deletions = []
    current = {}

    def watching_rmtree(path, *args, **kwargs):
        path = Path(path)
        if ".deleting-" in path.name:
            new = root / f"step-{current['step']}"
            deletions.append((path.name.split(".")[0], ckpt.is_complete(new),
                              (root / "latest").read_text().strip(), ckpt.is_complete(path)))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", watching_rmtree)
    for step in range(1, 6):
        current["step"] = step
        _save(tmp_path, step, keep_last=2)
    assert [name for name, *_ in deletions] == ["step-1", "step-2", "step-3"]
    for name, new_complete, latest, old_complete in deletions:
        assert new_complete and old_complete is False, name
        assert latest == f"step-{int(name.split('-')[1]) + 2}"  # the checkpoint just published
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-5"]


def test_keep_last_never_deletes_the_only_complete_checkpoint(tmp_path: Path):
    root = tmp_path / "checkpoints"
    _save(tmp_path, 1, keep_last=1)

    def crash(tmp_dir: Path) -> None:
        raise OSError(28, "No space left on device")

    # a failed save prunes nothing
    with pytest.raises(OSError, match="No space left on device"):
        _save(tmp_path, 2, keep_last=1, extra=crash)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    # an incomplete directory with a higher step does not count as a kept checkpoint
    (root / "step-9").mkdir()
    (root / "step-9" / "model.safetensors").write_bytes(b"")
    _save(tmp_path, 2, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]
    assert resolve_resume(tmp_path, "auto") == root / "step-2"
    # keep_last=1 over many saves always leaves exactly the newest
    for step in range(3, 7):
        _save(tmp_path, step, keep_last=1)
        assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-{step}"]
        loaded, state = load_checkpoint(root / f"step-{step}", restore_rng=False)
        assert state["step"] == step and torch.equal(loaded["w"], torch.ones(2) * step)


def test_a_kill_in_the_middle_of_pruning_leaves_no_half_deleted_checkpoint(tmp_path: Path, monkeypatch):
    """The process dies after deleting some files of an old checkpoint: no directory named
    step-N is missing files, resume picks the new one, and the next save clears the rest."""
    import shutil

    import vlreason.train.checkpoint as ckpt

    root = tmp_path / "checkpoints"
    _save(tmp_path, 1)
    real_rmtree = shutil.rmtree

    def dies_half_way(path, *args, **kwargs):
        path = Path(path)
        (path / "model.safetensors").unlink()  # one file gone, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in root.iterdir())
    assert "step-1" not in names and any(n.startswith("step-1.deleting-") for n in names), names
    assert resolve_resume(tmp_path, "auto") == root / "step-2"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"]
    _save(tmp_path, 3, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-3"]

"""Kill anywhere: a tiny GRPO run (the real ``vlreason train grpo`` command, in a child
process) is killed with SIGKILL three times in one run -- during a rollout, during the
update, and in the middle of a checkpoint write (torch's DCP writer half-way through the
``state/`` folder), in a random order at random calls -- and each time restarted with
``resume=auto``. Every restart finds a complete checkpoint (never a
half-written one), and the run ends with the same weights and the same metrics lines (no
duplicates, no gaps) as an uninterrupted run. The same on two processes with FSDP2
(sharded checkpoints), killed three times (rollout, update, DCP write), each time in a
random process. The kill points between the metrics line, the rename into place, the
``latest`` pointer and pruning are exercised on GRPO (one process and two) and on a toy
model through the same loop and checkpoint code (fast: forked children, no model to load).

Each run is a child forked from a zygote that has done the imports (see ZYGOTE). In the
child one function of the run (the policy's sampler, the gradient clipping before the
optimizer step, torch's DCP file writer, ...) is wrapped to send the process SIGKILL on
its N-th call, or a random few milliseconds into it; which points, N and the delays are
drawn from a seed that is printed (set ``VLREASON_KILL_SEED`` to replay one)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_recipe import ToyLinear  # tests/train/toy_recipe.py

from vlreason.train.checkpoint import is_complete, list_checkpoints, resolve_resume

pytestmark = pytest.mark.slow

MAX_STEPS = 4
ARGS = [f"max_steps={MAX_STEPS}", "save_steps=1", "keep_last=2", "rollout.num_generations=4",
        "rollout.max_new_tokens=24", "prompts_per_step=1", "algorithm.micro_batch_prompts=1",
        "algorithm.reward=format", "optim.lr=1e-3", "heldout_eval=false", "progress=false",
        "trackers=[jsonl]"]

# A zygote: imports vlreason, the GRPO recipe, torch's DCP writer and the tiny model's
# transformers modules once (tens of seconds on a loaded 2-core machine), runs no torch
# computation itself, and forks one child per run, so that each restart costs the run and
# not the imports. It reads one JSON job per line from stdin -- {"argv", "kill", "log"},
# kill = [point, count, delay_ms] or null -- and answers {"exit": code} (-9: SIGKILL).
ZYGOTE = r"""
import json, os, signal, sys, threading, traceback

import torch
import torch.distributed.checkpoint.filesystem
import transformers
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl, processing_qwen2_5_vl
import vlreason.cli, vlreason.registry, vlreason.rollout.policy, vlreason.train.checkpoint
import vlreason.train.loop, vlreason.train.metrics
vlreason.registry.recipe_class("grpo")


def die(point, marker):
    with open(marker, "a") as f:
        f.write(point + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, when, point, count, delay, marker):
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == count
        if hit and when == "before":
            die(point, marker)
        if hit and when == "during":
            threading.Timer(delay, die, (point, marker)).start()
        out = real(*args, **kwargs)
        if hit and when == "after":
            die(point, marker)
        return out

    setattr(owner, name, wrapper)


TARGETS = {
    # a random few ms into the N-th sampling call
    "rollout": (vlreason.rollout.policy.Policy, "sample", "during"),
    # gradients computed, the optimizer step not yet taken
    "update": (vlreason.train.loop, "grad_norm_and_clip", "before"),
    # inside torch's DCP writer: the state/ folder half written
    "checkpoint-write": (torch.distributed.checkpoint.filesystem, "_write_item", "before"),
    # the step's metrics line is written, its checkpoint is not
    "after-metrics": (vlreason.train.metrics.MetricsLogger, "log", "after"),
    # step-N renamed into place, `latest` not yet updated
    "after-publish": (vlreason.train.checkpoint, "_publish", "after"),
    # published and named by `latest`, old checkpoints not yet pruned
    "before-prune": (vlreason.train.checkpoint, "_prune", "before"),
}

def child(job, rank, world):
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if world > 1:  # what torchrun sets
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
        if job["kill"] and rank == job.get("kill_rank", 0):
            point, count, delay_ms = job["kill"]
            owner, name, when = TARGETS[point]
            wrap(owner, name, when, point, count, delay_ms / 1000, job["marker"])
        code = vlreason.cli.main(job["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    job = json.loads(line)
    world = job.get("world", 1)
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            child(job, rank, world)
        pids.append(pid)
    codes = {}
    while len(codes) < world:
        pid, status = os.waitpid(-1, 0)
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0:  # as torchrun does: one process failed, the rest of the group goes
            for other in pids:
                if other not in codes:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    print(json.dumps({"exit": [codes[pid] for pid in pids]}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def run(self, argv: list[str], kill, log: Path, marker: Path, world: int = 1, kill_rank: int = 0) -> list[int]:
        """Exit codes of the ``world`` processes of one run (-9: SIGKILL)."""
        job = {"argv": argv, "kill": kill, "log": str(log), "marker": str(marker), "world": world,
               "port": _free_port(), "kill_rank": kill_rank}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the zygote died (exit {self.proc.wait()})"
        return json.loads(answer)["exit"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# (point, range of N): a life gains at most one step at the first three points and at
# most two at the last three, so every kill lands. Replay a schedule by hand with
# VLREASON_KILL_SEED=... and VLREASON_KILL_POINTS=after-publish,update,...
POINTS = {"rollout": (1, 2), "update": (1, 2), "checkpoint-write": (1, 40),
          "after-metrics": (1, 2), "after-publish": (1, 2), "before-prune": (1, 1)}


MAIN_ONLY = {"after-publish", "before-prune"}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _schedule(rng: random.Random, points: str) -> list[tuple[str, int, int]]:
    """Each of ``points`` once, shuffled, at random calls."""
    points = os.environ.get("VLREASON_KILL_POINTS", points).split(",")
    rng.shuffle(points)
    return [(p, rng.randint(*POINTS[p]), rng.randint(0, 60)) for p in points]


def _kill_and_resume(tmp_path: Path, args: list[str], max_steps: int, points: str, world: int = 1) -> Path:
    """The uninterrupted run, then the killed and resumed one; compare them."""
    seed = int(os.environ.get("VLREASON_KILL_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    schedule = _schedule(rng, points)
    # the process each kill lands in (renames and pruning happen on process 0 only)
    ranks = [0 if point in MAIN_ONLY else rng.randrange(world) for point, *_ in schedule]
    about = f"VLREASON_KILL_SEED={seed} schedule={schedule} ranks={ranks}"
    print(about)
    zygote = Zygote()
    try:
        straight = tmp_path / "straight"
        log = tmp_path / "straight.log"
        codes = zygote.run(["train", "grpo", f"output_dir={straight}", *args], None, log, tmp_path / "none", world)
        assert codes == [0] * world, log.read_text()[-3000:]

        run = tmp_path / "killed"
        marker, log = tmp_path / "kills.txt", tmp_path / "killed.log"
        kills, history = [], []
        for life, (point, count, delay) in enumerate([*schedule, (None, 0, 0)]):
            resume = ["resume=auto"] if life else []
            started = time.time()
            kill = None if point is None else [point, count, delay]
            rank = ranks[life] if point is not None else 0
            codes = zygote.run(["train", "grpo", f"output_dir={run}", *resume, *args], kill, log, marker, world, rank)
            history.append((point, count, delay, rank, codes, round(time.time() - started, 1)))
            if codes == [0] * world:
                break  # the run finished before this life's kill point
            assert codes[rank] == -signal.SIGKILL, f"{about}\n{history}\n{log.read_text()[-3000:]}"
            kills.append(point)
            # the restart's starting point: a complete checkpoint, the newest one on disk
            found = resolve_resume(run, "auto")
            complete = list_checkpoints(run)
            if found is not None:
                assert is_complete(found) and ".tmp-" not in found.name, (about, found)
                # after a kill between the rename and `latest`, `latest` names the step before the
                # renamed one, and resume follows it until a later save replaces the renamed one
                assert found == complete[-1] or "after-publish" in kills, (about, found, complete)
    finally:
        zygote.close()
    print(history)
    assert marker.read_text().split() == kills, about
    assert kills == [p for p, *_ in schedule], f"not every kill landed: {history} ({about})"

    # the same final weights as the uninterrupted run ...
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    from vlreason.paths import warm_model

    start = load_file(str(warm_model() / "model.safetensors"))
    assert any(not torch.equal(a[n], start[n]) for n in a), "training did not move the weights"
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=f"{name} ({about})")
    # ... and the same metrics lines, each step once
    ma, mb = _metrics(straight), _metrics(run)
    assert [r["step"] for r in mb] == list(range(1, max_steps + 1)), f"gaps or duplicates ({about})"
    for ra, rb in zip(ma, mb):
        assert ra["reward"] == rb["reward"] and ra["completion_len"] == rb["completion_len"], (ra, rb, about)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7), (ra, rb, about)
    # retention held and the killed saves left nothing behind
    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(run)] == [f"step-{max_steps - 1}", f"step-{max_steps}"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", f"step-{max_steps - 1}", f"step-{max_steps}"]
    return root


def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path):
    _kill_and_resume(tmp_path, ARGS, MAX_STEPS, "rollout,update,checkpoint-write")


def test_sigkill_after_metrics_publish_and_before_prune_on_grpo(tmp_path):
    """The same for the kill points between the step's metrics line, the rename of
    step-N into place, the ``latest`` pointer and pruning (also on the toy model below):
    after the metrics line (its checkpoint not written), after the rename (``latest``
    not yet updated; also after final/ is renamed) and before pruning. A life gains at
    most two steps at these points, so 5 steps leave room for all three kills."""
    args = [a for a in ARGS if not a.startswith("max_steps")]
    _kill_and_resume(tmp_path, [*args, "max_steps=5"], 5, "after-metrics,after-publish,before-prune")


def test_sigkill_anywhere_in_a_two_process_sharded_run(tmp_path):
    """The same on two processes with FSDP2 (every process writes its own DCP shard), with
    three kills (a few ms into a rollout, during the update, inside the DCP write): each
    lands in a random one of the processes, and the other is then killed too, as torchrun
    does (a process killed mid-rollout leaves the other waiting in a collective)."""
    args = [a for a in ARGS if not a.startswith("prompts_per_step")]
    root = _kill_and_resume(tmp_path, [*args, "prompts_per_step=2", "parallel.strategy=fsdp2"],
                            MAX_STEPS, "rollout,update,checkpoint-write", world=2)
    shards = sorted(p.name for p in (root / f"step-{MAX_STEPS}" / "state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


def test_sigkill_after_metrics_publish_and_before_prune_in_a_two_process_sharded_run(tmp_path):
    """The kill points between the metrics line, the rename into place, ``latest`` and
    pruning on two processes with FSDP2: after the metrics line in a random process,
    after the rename and before pruning in process 0 (the one that renames and prunes);
    the other process is then killed too, as torchrun does."""
    args = [a for a in ARGS if not a.startswith(("prompts_per_step", "max_steps"))]
    root = _kill_and_resume(tmp_path, [*args, "prompts_per_step=2", "parallel.strategy=fsdp2", "max_steps=5"],
                            5, "after-metrics,after-publish,before-prune", world=2)
    shards = sorted(p.name for p in (root / "step-5" / "state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


# ------------------------------------------------ the remaining kill points, on a toy model





def _toy_targets() -> dict:
    import torch.distributed.checkpoint.filesystem as dcp_fs

    import vlreason.train.checkpoint as checkpoint
    import vlreason.train.loop as loop
    import vlreason.train.metrics as metrics

    return {  # (owner, name, when), as in ZYGOTE
        "after-metrics": (metrics.MetricsLogger, "log", "after"),
        "after-publish": (checkpoint, "_publish", "after"),  # checkpoints, and final/
        "before-prune": (checkpoint, "_prune", "before"),
        "update": (loop, "grad_norm_and_clip", "before"),  # for replaying by hand (the GRPO tests
        "checkpoint-write": (dcp_fs, "_write_item", "before"),  # above run these two)
    }


def _toy_life(run: Path, max_steps: int, kill: tuple[str, int] | None, resume: bool) -> int:
    """One life of a toy run in a forked child; its exit code (-9: SIGKILL)."""
    from vlreason.train.loop import LoopConfig, OptimConfig, Trainer

    pid = os.fork()
    if pid == 0:  # the child: wrap the kill point, train, never return into pytest
        code = 1
        try:
            if kill is not None:
                owner, name, when = _toy_targets()[kill[0]]
                real, calls = getattr(owner, name), [0]

                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == kill[1] and when == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    out = real(*args, **kwargs)
                    if calls[0] == kill[1] and when == "after":
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out

                setattr(owner, name, wrapper)
            cfg = LoopConfig(output_dir=str(run), trackers=["jsonl"], progress=False, max_steps=max_steps,
                             save_steps=1, keep_last=2, resume="auto" if resume else "",
                             optim=OptimConfig(lr=0.05, max_grad_norm=1.0))
            recipe = ToyLinear(random_inputs=True)
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                Trainer(cfg, recipe, save_final=recipe.save_final).fit()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_sigkill_between_metrics_publish_pointer_and_prune_on_a_toy_model(tmp_path):
    """SIGKILL after a step's metrics line (before its checkpoint), after step-N is renamed
    into place (before ``latest`` names it; also after final/ is) and before pruning, in a
    random order at random calls, then ``resume=auto``: every restart starts from a
    complete checkpoint, and the run ends with the weights and metrics lines of an
    uninterrupted run, two checkpoints kept and nothing left over."""
    seed = int(os.environ.get("VLREASON_KILL_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    points = os.environ.get("VLREASON_KILL_POINTS", "after-metrics,after-publish,before-prune").split(",")
    rng.shuffle(points)
    schedule = [(p, rng.randint(1, 4 if p == "checkpoint-write" else 2)) for p in points]
    about = f"VLREASON_KILL_SEED={seed} schedule={schedule}"
    max_steps = 2 * len(schedule) + 2  # a life gains at most two steps, so every kill lands
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports torch._dynamo (~10 s) once, not per child
    assert _toy_life(tmp_path / "straight", max_steps, None, resume=False) == 0
    run, history = tmp_path / "killed", []
    for life, kill in enumerate([*schedule, None]):
        code = _toy_life(run, max_steps, kill, resume=life > 0)
        history.append((kill, code))
        if kill is None:
            assert code == 0, (about, history)
            break
        assert code == -signal.SIGKILL, (about, history)
        found = resolve_resume(run, "auto")
        assert found is None or (is_complete(found) and ".tmp-" not in found.name), (about, found)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), (name, about)
    ma, mb = _metrics(tmp_path / "straight"), _metrics(run)
    assert [r["step"] for r in mb] == list(range(1, max_steps + 1)), (about, history)
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb], about
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", f"step-{max_steps - 1}", f"step-{max_steps}"], about
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"], about

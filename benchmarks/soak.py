"""Soak: a long GRPO run on the tiny model, stopped with SIGTERM and resumed every K
steps, against the same run uninterrupted. Not a unit test: it prints figures.

Both runs are the real ``vlreason train grpo`` command in child processes. While they
run, the parent samples each child's resident memory (``VmRSS``) and open file
descriptors from ``/proc`` every ``--sample-s`` seconds, next to the number of steps
logged so far. It prints:

- the resident-memory slope after warm-up, in MiB per 100 steps (a least-squares line
  through the samples taken after ``--warmup`` steps of each process life: a leak shows
  as a steady positive slope, a flat run as about 0), for the uninterrupted run and for
  each life of the interrupted one, of the training process alone and with its child
  processes (the math-verify zygote and checker, started at the first math check; their
  RSS is summed, so pages they share copy-on-write are counted in each);
- open file descriptors at the start and the end of each life (a leak grows them);
- the size of metrics.jsonl per logged step;
- whether metrics.jsonl of the interrupted run has each step once (no gaps, no
  duplicates) and the same rewards as the uninterrupted run;
- whether the final weights equal the uninterrupted run's (max absolute difference).

Usage (from the repository root)::

    python benchmarks/soak.py --parallel          # 500 steps, SIGTERM every 100 (21 min on 2 CPU cores)
    python benchmarks/soak.py --steps 40 --every 10 --warmup 3   # a quick check

Linux only (``/proc``). ``--out`` keeps both run directories (default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grpo_args(steps: int) -> list[str]:
    return [f"max_steps={steps}", "save_steps=50", "keep_last=2", "rollout.num_generations=4",
            "rollout.max_new_tokens=24", "prompts_per_step=2", "algorithm.micro_batch_prompts=1",
            "optim.lr=1e-4", "heldout_eval=false", "progress=false", "trackers=[jsonl]"]


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (the math-verify workers run in their own)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def proc_stats(pid: int) -> tuple[float, int, float] | None:
    """(resident MiB, open file descriptors, resident MiB with child processes) of
    ``pid``, or None once it is gone."""
    rss = _rss_mib(pid)
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if rss is None:
        return None
    tree = rss + sum(r for r in map(_rss_mib, _descendants(pid)) if r is not None)
    return rss, fds, tree


class Life:
    """One child process: its samples (step, rss MiB, fds) and exit code."""

    def __init__(self, run: Path, args: list[str], resume: bool, stop_at: int | None, sample_s: float):
        cmd = [sys.executable, "-m", "vlreason", "train", "grpo", f"output_dir={run}",
               *(["resume=auto"] if resume else []), *args]
        self.run, self.stop_at, self.sample_s = run, stop_at, sample_s
        self.samples: list[tuple[int, float, int, float]] = []  # step, rss, fds, rss with children
        self.log = open(run.parent / f"{run.name}.log", "a")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.start_step = logged_steps(run) if resume else 0

    def wait(self) -> int:
        sent = False
        while self.proc.poll() is None:
            steps = logged_steps(self.run)
            stats = proc_stats(self.proc.pid)
            if stats is not None:
                self.samples.append((steps, *stats))
            if self.stop_at is not None and steps >= self.stop_at and not sent:
                self.proc.send_signal(signal.SIGTERM)  # the loop checkpoints at the step boundary
                sent = True
            time.sleep(self.sample_s)
        self.log.close()
        return self.proc.returncode


def slope_per_100(samples: list[tuple[int, float, int, float]], warmup_steps: int, column: int = 1) -> tuple[float, int]:
    """Least-squares slope of resident memory (MiB; ``column`` 1: the training process,
    3: with its child processes) over logged steps, after the first ``warmup_steps``
    steps of the life; (slope per 100 steps, samples used)."""
    if not samples:
        return float("nan"), 0
    first = samples[0][0]
    pts = [(row[0], row[column]) for row in samples if row[0] >= first + warmup_steps]
    xs = [p[0] for p in pts]
    if len(pts) < 3 or max(xs) == min(xs):
        return float("nan"), len(pts)
    mx, my = sum(xs) / len(xs), sum(p[1] for p in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    return 100 * sxy / sxx, len(pts)


def describe(name: str, life: Life, warmup: int) -> str:
    """One line: steps, exit code, resident memory and open descriptors after warm-up
    (the first and last samples of a process are its start and its shutdown)."""
    slope, n = slope_per_100(life.samples, warmup)
    tree_slope, _ = slope_per_100(life.samples, warmup, column=3)
    first = life.samples[0][0] if life.samples else 0
    after = [row for row in life.samples if row[0] >= first + warmup] or life.samples
    rss = [row[1] for row in after]
    fds = [row[2] for row in after]
    tree = [row[3] for row in after]
    steps = [row[0] for row in life.samples]
    span = f"steps {life.start_step}->{max(steps) if steps else '?'}"
    return (f"{name:<14} {span:<16} exit {life.proc.returncode:<3} after warm-up ({n} samples): "
            f"rss {min(rss, default=0):.0f}-{max(rss, default=0):.0f} MiB, slope {slope:+.2f} MiB/100 steps; "
            f"with child processes {min(tree, default=0):.0f}-{max(tree, default=0):.0f} MiB, slope "
            f"{tree_slope:+.2f} MiB/100 steps; open fds {fds[0] if fds else '?'}->{max(fds, default='?')} (first, max)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="GRPO steps of each run")
    parser.add_argument("--every", type=int, default=100, help="SIGTERM + resume every this many steps")
    parser.add_argument("--warmup", type=int, default=20, help="steps of each life left out of the slope")
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--out", help="keep the run directories here (default: a temp folder)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the uninterrupted and the interrupted run at the same time")
    opts = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        print("soak.py needs Linux /proc", file=sys.stderr)
        return 2
    out = Path(opts.out) if opts.out else Path(tempfile.mkdtemp(prefix="vlreason-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    straight_dir, soak_dir = out / "straight", out / "interrupted"
    args = grpo_args(opts.steps)
    started = time.time()
    print(f"soak: {opts.steps} GRPO steps, SIGTERM + resume every {opts.every}; runs in {out}", flush=True)

    straight = Life(straight_dir, args, resume=False, stop_at=None, sample_s=opts.sample_s)
    waiter = None
    if opts.parallel:
        waiter = threading.Thread(target=straight.wait)
        waiter.start()
    else:
        straight.wait()

    lives: list[Life] = []
    while logged_steps(soak_dir) < opts.steps:
        done = logged_steps(soak_dir)
        stop_at = done + opts.every if done + opts.every < opts.steps else None
        life = Life(soak_dir, args, resume=bool(lives), stop_at=stop_at, sample_s=opts.sample_s)
        code = life.wait()
        lives.append(life)
        print(describe(f"life {len(lives)}", life, opts.warmup), flush=True)
        if code != 0:
            print(f"life {len(lives)} exited {code}; see {soak_dir}.log", file=sys.stderr)
            return 1
        if len(lives) > 2 * (opts.steps // max(opts.every, 1)) + 2:
            print("too many lives; the run is not progressing", file=sys.stderr)
            return 1
    if waiter is not None:
        waiter.join()
    print(describe("uninterrupted", straight, opts.warmup), flush=True)
    if straight.proc.returncode != 0:
        print(f"the uninterrupted run exited {straight.proc.returncode}; see {straight_dir}.log", file=sys.stderr)
        return 1

    import torch
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (soak_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    print(f"metrics.jsonl: {len(records)} lines, steps each once: {steps == list(range(1, opts.steps + 1))}, "
          f"same rewards as uninterrupted: {[r['reward'] for r in records] == [r['reward'] for r in reference]}, "
          f"{(soak_dir / 'metrics.jsonl').stat().st_size / max(len(records), 1):.0f} bytes per step")
    a = load_file(str(straight_dir / "final" / "model.safetensors"))
    b = load_file(str(soak_dir / "final" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    equal = a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    print(f"final weights equal the uninterrupted run's: {equal} (max abs diff {diff:.3g}, "
          f"{len(lives)} lives, {len(lives) - 1} SIGTERM + resume)")
    pooled = [slope_per_100(life.samples, opts.warmup)[0] for life in lives]
    pooled = [s for s in pooled if s == s]
    if pooled:
        print(f"interrupted run: mean slope over lives {sum(pooled) / len(pooled):+.2f} MiB/100 steps")
    print(f"wall time {time.time() - started:.0f} s", flush=True)
    return 0 if equal and steps == list(range(1, opts.steps + 1)) else 1


if __name__ == "__main__":
    sys.exit(main())

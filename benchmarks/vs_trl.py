"""vlreason's GRPO step vs TRL's GRPOTrainer step, side by side, on the same small VLMs.

    pip install -e ".[bench]"        # TRL is an optional extra, never a runtime dependency
    python benchmarks/vs_trl.py [--steps N] [--rounds 2] [--sizes tiny vocab mid] [--betas 0.04 0]

Both sides get the same checkpoint (a small offline Qwen2.5-VL, ``bench_common.SIZES``:
``tiny`` is the default tiny model, vocabulary 1,024; ``vocab`` is the same model with the
real 151,936-token vocabulary, where the output layer is nearly all the compute; ``mid``
has the real vocabulary, hidden 512, 8 layers, MLP 4,864 and a 4-block vision tower, where
the decoder layers outweigh the output layer in the update), the same rows (the bundled
demo data's ``synthetic/color`` rows, images resized once to the same pixel budget), the
same G, completion length, prompts per step, micro-batch, learning rate, optimizer (AdamW,
constant schedule, clip 1.0), KL coefficient (beta > 0 loads a reference model on both
sides), loss (clipped surrogate, token-mean / "dapo", k3 KL), fp32 on CPU, no gradient
checkpointing, and the same Python reward (vlreason's ``format_accuracy``).

* vlreason: ``Policy`` + ``GRPOPhases`` (rollout, reward, advantages, reference) driven by
  ``Trainer.train_step`` (micro-batches, backward, clip, AdamW step): the code a recipe runs.
* TRL: ``GRPOTrainer.train()`` with ``per_device_train_batch_size = micro_prompts * G`` and
  ``gradient_accumulation_steps = prompts / micro_prompts``, so one optimizer step generates
  ``prompts * G`` completions once and backpropagates them in the same micro-batches.
  Two TRL runs per configuration (``--trl-modes``): ``fair`` (the headline: TRL's GPU
  behaviour on CPU, only completion positions through the output layer, and no entropy,
  which vlreason does not compute; ``trl_side.apply_fair_patch``) and ``unpatched`` (TRL as
  installed: on CPU it scores every position, prompt included, and computes the entropy).

Each side runs in its own subprocess (so peak RSS is per side), one after the other
(``--rounds N``: N times each, the order reversed every other round, the least disturbed
round's times kept). Per side: median step time over ``--steps`` steps after ``--warmup``
warm-up steps, the phase split (rollout / reward / reference / rest), peak RSS (``ru_maxrss``
of the child, and the peak above the RSS before the first step from a psutil sampler:
"step memory"), completion length, and what the vision tower encoded per step: a forward
hook on every model's ``model.visual`` counts calls, images (rows of ``grid_thw``) and patch
rows, split by pass (generation: policy without grad; reference: the reference model;
policy: with grad). Images handed to the image processor per step are counted too. The
vlreason child also records where a row's update FLOPs go (``bench_common.flop_split``).

Goals (printed as met / missed on the fair figure, the unpatched one beside it): step time
<= 0.5x TRL's; step memory <= 0.5x TRL's on ``mid``; peak RSS <= 0.6x TRL's on ``vocab``;
one encoding per distinct image per pass. When a goal is missed (or with ``--profile
always``) the JSON gets each side's profile of one extra step.

Timings on a shared 2-core machine are noisy: compare the ratios, not absolute seconds
(DESIGN.md, performance rules). Results: ``benchmarks/results_vs_trl.json`` and a table.

This file is the command line and the orchestration (children, rounds); ``bench_common.py``
holds the settings, sizes, rows and the measuring both sides share, ``vlreason_side.py`` and
``trl_side.py`` each side's run, ``vs_trl_report.py`` the merged rounds, goals and table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported (benchmarks.vs_trl) rather than run as a script
    sys.path.insert(0, str(HERE))

from bench_common import DEFAULT_STEPS, SIZES, Settings, summarise  # noqa: E402
from vs_trl_report import (  # noqa: E402
    GOAL_PEAK_RSS,
    GOAL_STEP_RSS_MID,
    GOAL_STEP_TIME,
    build_result,
    source_tree,
    split_rounds,
    trl_sides,
    versions,
    write_and_print,
)

DEFAULT_OUT = HERE / "results_vs_trl.json"
TRL_MODES = ("fair", "unpatched")


# ---------------------------------------------------------------------------- child / parent


def child_main(side: str, settings_json: str, result_path: str) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    settings = Settings(**json.loads(settings_json))
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as scratch:
        tempfile.tempdir = scratch  # this child's output dirs (nothing is saved) go, and are removed, here
        raw = run_side(side, settings)
        tempfile.tempdir = None
    summary = summarise(raw["records"], settings.warmup)
    summary.update(
        side=side,
        max_rss_mb=raw["max_rss"] / 2**20,
        rss_after_imports_mb=raw["rss_after_imports"] / 2**20,
        rss_before_steps_mb=raw["rss_before_steps"] / 2**20,
        step_rss_mb=(raw["rss_peak_steps"] - raw["rss_before_steps"]) / 2**20,
        child_wall_s=time.perf_counter() - started,
        load_avg_start_end=[load_start, os.getloadavg()],  # the machine's 1/5/15-minute load averages
        records=raw["records"],
    )
    for key in ("profile", "trl_mode", "patch", "flop_split"):
        if key in raw:
            summary[key] = raw[key]
    Path(result_path).write_text(json.dumps(summary, indent=1, default=float))


def run_child(side: str, settings: Settings, timeout_s: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONWARNINGS": "ignore", "ACCELERATE_DISABLE_RICH": "1"}
        cmd = [sys.executable, __file__, "--child", side, "--settings", json.dumps(asdict(settings)),
               "--result", str(result)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"{side} child failed (rc {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def run_side(side: str, settings: Settings) -> dict[str, Any]:
    """One side's raw measurements; its module (and so TRL) is imported only in its child."""
    if side == "vlreason":
        from vlreason_side import run_vlreason

        return run_vlreason(settings)
    from trl_side import run_trl

    return run_trl(settings)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0,
                        help="measured optimizer steps per side and round (0: 8 for tiny, 3 for vocab, 1 for mid)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each side this many times (ABBA order) and keep its least disturbed round")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per side (not measured)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--trl-modes", nargs="+", default=list(TRL_MODES), choices=TRL_MODES,
                        help="TRL runs per configuration: fair (trl_side.apply_fair_patch; the headline) and/or "
                             "unpatched (TRL as installed)")
    parser.add_argument("--betas", nargs="+", type=float, default=[0.04], help="KL coefficients (0: no reference)")
    parser.add_argument("--num-generations", "-G", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--micro-prompts", type=int, default=1, help="prompts per micro-batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (0: torch's default). 1 by default: on a shared 2-core "
                             "machine two OpenMP threads per process wait on each other and the timings "
                             "turn into noise")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="vlreason's rollout.logprob_chunk_size (0: its default)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="profile one extra step per side; auto keeps it in the JSON when a goal is missed")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--summarise", metavar="JSON",
                        help="recompute summaries, ratios and goals of a results file (no runs), write --out")
    parser.add_argument("--child", choices=["vlreason", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.child:
        child_main(args.child, args.settings, args.result)
        return 0
    if args.summarise:
        return summarise_file(args.summarise, args.out, args.profile)
    try:
        import trl  # noqa: F401
    except ImportError:
        print('TRL is not installed: pip install -e ".[bench]"  (or pip install "trl>=1.16,<2")', file=sys.stderr)
        return 2
    if args.prompts % args.micro_prompts:
        parser.error("--prompts must be a multiple of --micro-prompts")

    started = time.perf_counter()
    load_before = os.getloadavg()
    results = run_all(args)
    report = {
        "benchmark": "vlreason GRPO step vs TRL GRPOTrainer step (benchmarks/vs_trl.py)",
        "command": "python benchmarks/vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": versions(),
        "source_tree": source_tree(),
        "goals": {"step_time_ratio_max": GOAL_STEP_TIME, "peak_rss_ratio_max_big_vocab": GOAL_PEAK_RSS,
                  "step_rss_ratio_max_mid": GOAL_STEP_RSS_MID, "encodings_per_distinct_image_per_pass": 1},
        "trl_modes": args.trl_modes,
        "wall_s": time.perf_counter() - started,
        "load_avg_before_after": [load_before, os.getloadavg()],  # 1/5/15-minute load averages
        "results": results,
    }
    write_and_print(report, args.out)
    return 0


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every size x beta: each side ``--rounds`` times, merged into one result."""
    from bench_common import size_spec

    from vlreason.models.tiny import tiny_model_path

    results = []
    for size in args.sizes:
        path = str(tiny_model_path(size_spec(size)))  # built once here, not raced by the children
        for beta in args.betas:
            settings = Settings(size=size, model_path=path, beta=beta, num_generations=args.num_generations,
                                prompts_per_step=args.prompts, micro_batch_prompts=args.micro_prompts,
                                max_new_tokens=args.max_new_tokens, lr=args.lr, warmup=args.warmup,
                                steps=args.steps or DEFAULT_STEPS[size], profile=args.profile != "never", threads=args.threads,
                                logprob_chunk_size=args.chunk_size)
            runs = run_rounds(settings, args.rounds, args.timeout, args.trl_modes)
            trl_runs = {mode: runs[f"trl:{mode}"] for mode in args.trl_modes}
            results.append(build_result(settings, runs["vlreason"], trl_runs, args.profile))
    return results


def run_rounds(settings: Settings, rounds: int, timeout_s: int, trl_modes=TRL_MODES) -> dict[str, list[dict]]:
    """Every side ``rounds`` times; the order is reversed every other round (ABBA), so a drift
    in the machine's load hits every side alike. Keys: ``vlreason``, ``trl:<mode>``."""
    sides = ["vlreason"] + [f"trl:{mode}" for mode in trl_modes]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            print(f"[{settings.size} beta={settings.beta:g}] round {r + 1}/{rounds}: {side} ...", flush=True)
            name, _, mode = side.partition(":")
            child = replace(settings, profile=settings.profile and r == 0, trl_mode=mode or settings.trl_mode)
            started = time.perf_counter()
            runs[side].append(run_child(name, child, timeout_s))
            print(f"    {time.perf_counter() - started:.0f} s", flush=True)
    return runs


def summarise_file(path: str, out: str, profile: str) -> int:
    """Recompute the merged summaries, ratios and goals of a results file (no new runs)."""
    report = json.loads(Path(path).read_text())
    report["results"] = [
        build_result(Settings(**r["settings"]), split_rounds(r["vlreason"]),
                     {mode: split_rounds(side) for mode, side in trl_sides(r).items()}, profile)
        for r in report["results"]
    ]
    write_and_print(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

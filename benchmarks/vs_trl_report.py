"""The report of ``benchmarks/vs_trl.py``: each side's rounds merged, the ratios vlreason / TRL
against the goals, the table, the profiles, and the machine, versions and commit measured."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_common import Settings

HERE = Path(__file__).resolve().parent
GOAL_STEP_TIME = 0.5  # vlreason step time <= 0.5x TRL's
GOAL_PEAK_RSS = 0.6  # vlreason peak memory <= 0.6x TRL's with the big vocabulary


def merge_rounds(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's summary over its rounds.

    Times: the round with the lowest median step time (its median step and phases). On a
    shared machine another process's load only ever slows a round down, so the least
    disturbed round is the best estimate; every round's median stays in ``rounds``.
    Memory: the largest of the rounds.
    """
    if len(children) == 1:
        return children[0]
    best = min(children, key=lambda child: child["step_s_median"])
    out = {k: v for k, v in best.items() if k not in ("records", "profile")}
    for key in ("max_rss_mb", "step_rss_mb", "rss_before_steps_mb", "rss_after_imports_mb"):
        out[key] = max(child[key] for child in children)
    out["step_s_median_by_round"] = [child["step_s_median"] for child in children]
    out["rounds"] = [{k: v for k, v in child.items() if k not in ("records", "profile")} for child in children]
    out["records"] = [child["records"] for child in children]
    profiles = [child["profile"] for child in children if "profile" in child]
    if profiles:
        out["profile"] = profiles[0]
    return out


def split_rounds(side: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-round child results stored in a merged entry (for --summarise)."""
    if "rounds" not in side:
        return [side]
    children = [{**summary, "records": records} for summary, records in zip(side["rounds"], side["records"])]
    if "profile" in side:
        children[0]["profile"] = side["profile"]
    return children


def build_result(settings: Settings, ours_runs: list[dict], trl_runs: list[dict], profile: str) -> dict[str, Any]:
    ours, theirs = merge_rounds(ours_runs), merge_rounds(trl_runs)
    comparison = compare(settings, ours, theirs)
    missed = any(g["met"] is False and not g.get("secondary") for g in comparison["goals"])
    if not (profile == "always" or (profile == "auto" and missed)):
        ours.pop("profile", None)
        theirs.pop("profile", None)
    return {"settings": asdict(settings), "vlreason": ours, "trl": theirs, "comparison": comparison}


def goal_line(name: str, ratio: float | None, target: float) -> dict[str, Any]:
    if ratio is None:
        return {"goal": name, "target": target, "ratio": None, "met": None, "note": "not measured"}
    met = ratio <= target
    note = (f"met: {ratio:.2f}x <= {target}x" if met
            else f"missed by {ratio / target:.2f}x ({ratio:.2f}x vs the {target}x target)")
    return {"goal": name, "target": target, "ratio": round(ratio, 3), "met": met, "note": note}


def compare(settings: Settings, ours: dict, trl: dict) -> dict[str, Any]:
    def ratio(key):
        a, b = ours.get(key), trl.get(key)
        return a / b if a and b else None

    distinct = settings.prompts_per_step  # one image per prompt
    passes = ["generation", "policy"] + (["reference"] if settings.beta > 0 else [])
    per_pass = {p: ours["vision_per_step"][p]["images"] for p in passes}
    encode_ok = all(v == distinct for v in per_pass.values())
    goals = [goal_line("step time <= 0.5x TRL", ratio("step_s_median"), GOAL_STEP_TIME)]
    if settings.size == "vocab":
        goals.append(goal_line("peak RSS <= 0.6x TRL (big vocabulary)", ratio("max_rss_mb"), GOAL_PEAK_RSS))
        goals.append({**goal_line("step memory (peak RSS above pre-step RSS) <= 0.6x TRL, big vocabulary",
                                  ratio("step_rss_mb"), GOAL_PEAK_RSS), "secondary": True})
    goals.append({"goal": "one encoding per distinct image per pass", "target": distinct, "met": encode_ok,
                  "ratio": None,
                  "note": (f"{'met' if encode_ok else 'missed'}: images encoded per pass {per_pass}, "
                           f"{distinct} distinct images per step; TRL: "
                           f"{ {p: trl['vision_per_step'][p]['images'] for p in passes} }")})
    return {
        "ratios": {
            "step_time": ratio("step_s_median"),
            "peak_rss": ratio("max_rss_mb"),
            "step_rss": ratio("step_rss_mb"),
            "images_encoded": ratio("images_encoded_per_step"),
        },
        "goals": goals,
    }


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'config':<22}{'metric':<28}{'vlreason':>12}{'TRL':>12}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        s, ours, trl, cmp_ = r["settings"], r["vlreason"], r["trl"], r["comparison"]["ratios"]
        name = f"{s['size']} beta={s['beta']:g}"
        rows = [
            ("step time, median (s)", ours["step_s_median"], trl["step_s_median"], cmp_["step_time"], ".2f"),
            ("  rollout (s)", ours["phases_s_median"].get("rollout"), trl["phases_s_median"].get("rollout"), None, ".2f"),
            ("  reference (s)", ours["phases_s_median"].get("reference"), trl["phases_s_median"].get("reference"), None, ".2f"),
            ("  rest: update, reward (s)", ours["phases_s_median"].get("rest", 0) + ours["phases_s_median"].get("reward", 0),
             trl["phases_s_median"].get("rest", 0) + trl["phases_s_median"].get("reward", 0), None, ".2f"),
            ("peak RSS (MiB)", ours["max_rss_mb"], trl["max_rss_mb"], cmp_["peak_rss"], ".0f"),
            ("  RSS after imports (MiB)", ours["rss_after_imports_mb"], trl["rss_after_imports_mb"], None, ".0f"),
            ("  RSS before steps (MiB)", ours["rss_before_steps_mb"], trl["rss_before_steps_mb"], None, ".0f"),
            ("  step memory (MiB)", ours["step_rss_mb"], trl["step_rss_mb"], cmp_["step_rss"], ".0f"),
            ("images encoded / step", ours["images_encoded_per_step"], trl["images_encoded_per_step"],
             cmp_["images_encoded"], ".0f"),
        ]
        for p in ("generation", "reference", "policy"):
            rows.append((f"  {p} pass", ours["vision_per_step"][p]["images"], trl["vision_per_step"][p]["images"], None, ".0f"))
        rows += [
            ("vision-tower calls / step", ours["vision_calls_per_step"], trl["vision_calls_per_step"], None, ".0f"),
            ("images preprocessed / step", ours["image_processor_per_step"]["images"],
             trl["image_processor_per_step"]["images"], None, ".0f"),
            ("completion length (mean)", ours["completion_len_mean"], trl["completion_len_mean"], None, ".1f"),
        ]
        for i, (metric, a, b, q, spec) in enumerate(rows):
            print(f"{name if i == 0 else '':<22}{metric:<28}{fmt(a, spec):>12}{fmt(b, spec):>12}{fmt(q):>9}")
        for g in r["comparison"]["goals"]:
            mark = "MET   " if g["met"] else ("MISSED" if g["met"] is False else "n/a   ")
            print(f"{'':<22}goal {mark} {g['goal']}: {g['note']}")
        print()


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = "not installed"
    return out


def source_tree() -> dict[str, Any]:
    """The commit measured and the files changed on top of it (read-only git calls)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=30).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted": [line[3:] for line in git("status", "--porcelain").splitlines()]}


def write_and_print(report: dict[str, Any], out: str) -> None:
    results = report["results"]
    Path(out).write_text(json.dumps(report, indent=1, default=float))
    print()
    print_table(results)
    for r in results:
        for side in ("vlreason", "trl"):
            if r[side].get("profile"):
                print_profile(side, r["settings"], r[side]["profile"])
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


def print_profile(side: str, s: dict[str, Any], prof: dict[str, Any]) -> None:
    print(f"profile of one {side} step ({s['size']} beta={s['beta']:g}, {prof['profiled_step_s']:.2f} s "
          "under the profilers), top cumulative:")
    for row in prof["cprofile_cumulative"][:12]:
        print(f"    {row['cumulative_s']:8.3f}s  {row['function']}")
    print("  top torch ops by self CPU time:")
    for row in prof["torch_ops_self_cpu"][:8]:
        print(f"    {row['self_cpu_s']:8.3f}s  {row['op']} x{row['calls']}")
    print(f"  allocator peak {prof['alloc_peak_mib']:.0f} MiB, ops open then: "
          f"{' > '.join(prof['ops_open_at_alloc_peak'])}")
    print("  top allocating ops (MiB allocated, summed over calls):")
    for row in prof["torch_ops_allocating"][:6]:
        print(f"    {row['alloc_mib']:8.1f}  {row['op']} {row['input_shapes']} x{row['calls']}")

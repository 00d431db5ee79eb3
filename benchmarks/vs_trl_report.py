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
GOAL_STEP_RSS_MID = 0.5  # vlreason step memory (peak RSS above the pre-step RSS) <= 0.5x TRL's on mid
HEADLINE_MODE = "fair"  # the TRL run the goals are judged on (trl_side.apply_fair_patch)


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


def trl_sides(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A stored result's TRL entries by mode: ``trl`` (the headline, fair) and ``trl_unpatched``.
    Results written before the fair mode existed hold one unpatched entry under ``trl``."""
    out = {}
    if "trl" in result:
        out[result["trl"].get("trl_mode", "unpatched")] = result["trl"]
    if "trl_unpatched" in result:
        out["unpatched"] = result["trl_unpatched"]
    return out


def build_result(settings: Settings, ours_runs: list[dict], trl_runs: dict[str, list[dict]],
                 profile: str) -> dict[str, Any]:
    """vlreason against each TRL mode: ``trl`` / ``comparison`` hold the headline (fair when it
    ran, else the only mode), ``trl_unpatched`` / ``comparison_unpatched`` TRL as installed."""
    ours = merge_rounds(ours_runs)
    theirs = {mode: merge_rounds(runs) for mode, runs in trl_runs.items()}
    headline = HEADLINE_MODE if HEADLINE_MODE in theirs else next(iter(theirs))
    out: dict[str, Any] = {"settings": asdict(settings), "vlreason": ours, "headline_trl_mode": headline}
    missed = False
    for mode, side in theirs.items():
        suffix = "" if mode == headline else f"_{mode}"
        comparison = compare(settings, ours, side)
        comparison["trl_mode"] = mode
        out[f"trl{suffix}"], out[f"comparison{suffix}"] = side, comparison
        missed |= any(g["met"] is False and not g.get("secondary") for g in comparison["goals"])
    if not (profile == "always" or (profile == "auto" and missed)):
        for key in [k for k in out if k == "vlreason" or k.startswith("trl")]:
            out[key].pop("profile", None)
    return out


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
    if settings.size == "mid":
        goals.append(goal_line("step memory (peak RSS above pre-step RSS) <= 0.5x TRL, mid",
                               ratio("step_rss_mb"), GOAL_STEP_RSS_MID))
        goals.append({**goal_line("peak RSS <= 0.6x TRL, mid", ratio("max_rss_mb"), GOAL_PEAK_RSS),
                      "secondary": True})
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
            "step_time_floor": update_floor(ours, trl),
            "peak_rss": ratio("max_rss_mb"),
            "step_rss": ratio("step_rss_mb"),
            "images_encoded": ratio("images_encoded_per_step"),
        },
        "goals": goals,
    }


def update_seconds(side: dict[str, Any]) -> float:
    """A side's median update + reward time: what is left of its step without the rollout
    and the reference pass."""
    phases = side["phases_s_median"]
    return phases.get("rest", 0.0) + phases.get("reward", 0.0)


def update_floor(ours: dict[str, Any], trl: dict[str, Any]) -> float | None:
    """The step-time ratio vlreason would reach if its rollout and reference pass took no
    time at all: its update + reward time over TRL's whole step. Both sides' updates do
    the same work (the same model, tokens, loss and optimizer), so a step-time goal below
    this floor needs a faster update, not a faster rollout."""
    return update_seconds(ours) / trl["step_s_median"] if trl.get("step_s_median") else None


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    """One block per configuration: vlreason, TRL (headline mode) and the ratio, then TRL
    unpatched and its ratio where it ran; the goals on the headline, the unpatched verdict after."""
    for r in results:
        s, ours = r["settings"], r["vlreason"]
        head, unp = r["trl"], r.get("trl_unpatched")
        headline = r.get("headline_trl_mode", head.get("trl_mode", "unpatched"))
        header = (f"{'config':<20}{'metric':<28}{'vlreason':>10}{'TRL ' + headline[:5]:>10}{'ratio':>7}"
                  + (f"{'TRL unp.':>10}{'ratio':>7}" if unp is not None else ""))
        print(header)
        print("-" * len(header))
        name = f"{s['size']} beta={s['beta']:g}"

        def ph(side, key):
            return side["phases_s_median"].get(key)

        def vis(side, p):
            return side["vision_per_step"][p]["images"]

        rows = [  # metric, getter, ratio key, format
            ("step time, median (s)", lambda x: x["step_s_median"], "step_time", ".2f"),
            ("  rollout (s)", lambda x: ph(x, "rollout"), None, ".2f"),
            ("  reference (s)", lambda x: ph(x, "reference"), None, ".2f"),
            ("  rest: update, reward (s)", update_seconds, None, ".2f"),
            ("peak RSS (MiB)", lambda x: x["max_rss_mb"], "peak_rss", ".0f"),
            ("  RSS before steps (MiB)", lambda x: x["rss_before_steps_mb"], None, ".0f"),
            ("  step memory (MiB)", lambda x: x["step_rss_mb"], "step_rss", ".0f"),
            ("images encoded / step", lambda x: x["images_encoded_per_step"], "images_encoded", ".0f"),
        ]
        rows += [(f"  {p} pass", lambda x, p=p: vis(x, p), None, ".0f") for p in ("generation", "reference", "policy")]
        rows += [
            ("images preprocessed / step", lambda x: x["image_processor_per_step"]["images"], None, ".0f"),
            ("completion length (mean)", lambda x: x["completion_len_mean"], None, ".1f"),
        ]
        for i, (metric, get, key, spec) in enumerate(rows):
            line = (f"{name if i == 0 else '':<20}{metric:<28}{fmt(get(ours), spec):>10}{fmt(get(head), spec):>10}"
                    f"{fmt(r['comparison']['ratios'][key] if key else None):>7}")
            if unp is not None:
                line += f"{fmt(get(unp), spec):>10}{fmt(r['comparison_unpatched']['ratios'][key] if key else None):>7}"
            print(line)
        split = ours.get("flop_split")
        if split:
            share = split["update_share"]
            print(f"{'':<20}update FLOPs / row ({split['prompt_tokens']} prompt + {split['completion_tokens']} "
                  f"completion tokens): layers {share['text_layers_and_attention']:.0%}, output layer "
                  f"{share['output_layer']:.0%}, vision {share['vision']:.0%}; decode token: output layer "
                  f"{split['decode_token_flops']['output_layer_share']:.0%}")
        floor = r["comparison"]["ratios"].get("step_time_floor")
        if floor is not None:
            print(f"{'':<20}step-time floor ({headline}): {floor:.2f}x, vlreason's update + reward alone over "
                  f"TRL's whole step (its rollout and reference at zero)")
        for g in r["comparison"]["goals"]:
            mark = "MET   " if g["met"] else ("MISSED" if g["met"] is False else "n/a   ")
            print(f"{'':<20}goal {mark} ({headline}) {g['goal']}: {g['note']}")
        if unp is not None:
            for g in r["comparison_unpatched"]["goals"]:
                if g["ratio"] is not None:
                    print(f"{'':<20}     vs unpatched TRL: {g['goal']}: {g['note']}")
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
        for side in [k for k in r if k == "vlreason" or (k.startswith("trl") and isinstance(r[k], dict))]:
            if r[side].get("profile"):
                print_profile(side, r["settings"], r[side]["profile"])
    load = report.get("load_avg_before_after")
    if load:
        print(f"machine load (1-minute average) before {load[0][0]:.1f}, after {load[1][0]:.1f}")
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

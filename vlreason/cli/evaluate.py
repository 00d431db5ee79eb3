"""``vlreason eval --model DIR --data DIR [key=value ...]`` -> JSON report + table."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from vlreason.config import ConfigError, doc, load_config
from vlreason.evaluation import EvalConfig


@dataclass
class EvalRunConfig(EvalConfig):
    min_pixels: int = doc("Pixel budget minimum (use the training run's value).", 56 * 56)
    max_pixels: int = doc("Pixel budget maximum (use the training run's value).", 112 * 112)
    template: str = doc("User text template; {question} is replaced.", "{question}")
    system_prompt: str = doc("System prompt; empty for none.", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. RUN_DIR/final) or hub id")
    parser.add_argument("--data", required=True, help="canonical dataset directory")
    parser.add_argument("--out", help="JSON report path (default: MODEL/eval_<data name>.json)")
    parser.add_argument("--records", help="also write one JSON line per completion here")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. num_samples=4 temperature=1.0 max_new_tokens=256 limit=100")


def _report_path(args: argparse.Namespace) -> Path:
    """``--out``, or MODEL/eval_<data name>.json when MODEL is a folder, else ./eval_<data name>.json."""
    if args.out:
        return Path(args.out)
    model_dir = Path(args.model)
    return (model_dir if model_dir.is_dir() else Path(".")) / f"eval_{Path(args.data).name}.json"


def run(args: argparse.Namespace) -> int:
    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.outputs import OutputPathError, prepare_output
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.rollout.prompts import PromptConfig

    try:
        cfg = load_config(EvalRunConfig, None, args.overrides)
        data = load_canonical(args.data)
        # before the model is loaded: a bad --out / --records must not cost an evaluation
        out = prepare_output(_report_path(args))
        records_path = prepare_output(args.records) if args.records else None
    except (ConfigError, FileNotFoundError, ValueError, OutputPathError) as err:
        print(f"vlreason eval: error: {err}", file=sys.stderr)
        return 2
    rollout = RolloutConfig(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                            prompt=PromptConfig(template=cfg.template, system_prompt=cfg.system_prompt))
    policy = Policy.load(ModelConfig(name_or_path=args.model), rollout)
    eval_cfg = EvalConfig(**{k: getattr(cfg, k) for k in EvalConfig.__dataclass_fields__})
    summary, records = evaluate(policy, data, eval_cfg, progress=sys.stderr.isatty())
    report = {"model": args.model, "data": args.data, "config": eval_cfg.__dict__, **summary}
    out.write_text(json.dumps(report, indent=2))
    if records_path is not None:
        records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"report: {out}")
    return 0

"""Build ``assets/warm-tiny``: the tiny offline Qwen2.5-VL after a short SFT on the
bundled demo data, the starting point of the RL demos (``vlreason train grpo``).

    python -m data_pipelines.build_warm_model [--steps 600] [--out assets/warm-tiny]

Uses the project's own SFT recipe (``vlreason train sft``, found by name) from the seed-0 tiny model, then
evaluates greedily on the demo eval split and writes the figures into the
checkpoint's README. A few CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from vlreason.config import load_config
from vlreason.paths import assets_dir

SFT_OVERRIDES = [
    "model.name_or_path=",  # the cached tiny random model (vlreason tiny-model, seed 0)
    "optim.lr=2e-3", "optim.schedule=cosine", "optim.warmup_steps=20",
    "prompts_per_step=16", "sft.micro_batch_prompts=16", "save_steps=0", "keep_last=1",
    "eval_rows=64", "progress=false", "trackers=[jsonl]",
]


def build(out: Path, steps: int) -> dict:
    # The recipe by name, through the registry: data_pipelines never imports recipes/
    # (tests/test_layers.py).
    from vlreason.recipe_base import run_recipe
    from vlreason.registry import recipe_class

    sft = recipe_class("sft")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*SFT_OVERRIDES, f"output_dir={tmp}/run", f"max_steps={steps}"]
        load_config(sft.config_class, None, overrides)  # fail fast on a bad override
        run_recipe(sft, None, overrides)
        summary = json.loads((Path(tmp) / "run" / "eval.json").read_text())
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "run" / "final", out)
    (out / "README.md").write_text(
        "# warm-tiny\n\n"
        "The tiny offline Qwen2.5-VL (`vlreason tiny-model`, seed 0) after "
        f"{steps} SFT steps on `assets/demo/train` (solutions as targets), built by "
        "`python -m data_pipelines.build_warm_model`. Starting point of the RL demos.\n\n"
        "Greedy evaluation on `assets/demo/eval` at build time:\n\n"
        "```json\n" + json.dumps(summary, indent=2) + "\n```\n"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=assets_dir() / "warm-tiny")
    args = parser.parse_args()
    summary = build(args.out, args.steps)
    print(f"wrote {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()

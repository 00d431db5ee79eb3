"""A user's recipe, written outside the project, runs with ``vlreason train`` exactly like a
built-in one: as ``path/to/my_recipe.py`` and as ``package.module:Class``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from vlreason.cli import main

# A minimal GRPO wired from the library's pieces; it subclasses nothing (the loop only
# needs the interface), and registers a name of its own.
USER_RECIPE = '''\
"""My GRPO: the library's pieces wired by hand."""

from dataclasses import dataclass, field

from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.rollout.policy import RolloutConfig
from vlreason.paths import warm_model
from vlreason.recipe_base import RunConfig, load_policy, load_split
from vlreason.registry import register_recipe
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.loop import Trainer


@dataclass
class MyConfig(RunConfig):
    output_dir: str = doc("Run directory.", "runs/my_grpo")
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=2, max_new_tokens=4),
        metadata={"help": "Sampling and images."})
    prompts_per_step: int = doc("Prompt groups per optimizer step.", 1)
    algorithm: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(micro_batch_prompts=1),
        metadata={"help": "GRPO settings."})


@register_recipe("NAME")
class MyGRPO:
    config_class = MyConfig

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def default_model():
        return warm_model()

    def setup(self):
        cfg = self.cfg
        self.policy = load_policy(cfg, with_reference=cfg.algorithm.kl_coef > 0)
        self.model = self.policy.model
        self.stream = RowStream(load_split(cfg.data.train, "train"), seed=cfg.seed)
        self.phases = GRPOPhases(cfg.algorithm, self.policy, self.stream, cfg.seed,
                                 prompts_per_step=cfg.prompts_per_step)
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    def train(self):
        return self.trainer.fit()

    def cleanup(self):
        self.policy = self.model = self.trainer = None

    def prepare(self, step, timer):
        return self.phases.prepare(step, timer)

    def step(self, micro_batch):
        return self.phases.loss(micro_batch)

    def after_update(self, step):
        return None

    def state_dict(self):
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state):
        if "data" in state:
            self.stream.load_state_dict(state["data"])
'''

QUIET = ["progress=false", "trackers=[jsonl]", "save_steps=0"]


def write_recipe(folder: Path, module: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(USER_RECIPE.replace('"NAME"', repr(name)))
    return path


def check_run(run: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert math.isfinite(records[0]["loss"]) and "reward" in records[0]
    assert "num_generations: 2" in (run / "config.yaml").read_text()
    assert (run / "final" / "model.safetensors").is_file()


def test_user_recipe_file_runs_as_vlreason_train_path(tmp_path):
    path = write_recipe(tmp_path / "plugins", "my_recipe", "my_grpo_file")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "vlreason", "train", str(path), "max_steps=1", f"output_dir={run}", *QUIET],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_run(run)


def test_user_recipe_runs_as_module_colon_class(tmp_path, monkeypatch):
    from vlreason import registry

    write_recipe(tmp_path / "plugins", "my_recipe_mod", "my_grpo_module")
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))  # as PYTHONPATH would
    monkeypatch.delitem(sys.modules, "my_recipe_mod", raising=False)
    run = tmp_path / "run"
    try:
        assert main(["train", "my_recipe_mod:MyGRPO", "max_steps=1", f"output_dir={run}", *QUIET]) == 0
        check_run(run)
        # the name it registered now answers too, in this process
        assert main(["train", "my_grpo_module", "--show-config"]) == 0
    finally:
        registry._REGISTERED.pop("my_grpo_module", None)
        sys.modules.pop("my_recipe_mod", None)


def test_user_module_on_pythonpath_shows_its_config(tmp_path):
    write_recipe(tmp_path / "plugins", "my_recipe_env", "my_grpo_env")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "vlreason", "train", "my_recipe_env:MyGRPO", "--show-config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rollout.num_generations = 2" in done.stdout and "prompts_per_step = 1" in done.stdout


def test_unknown_recipe_name_lists_the_available_ones(capsys):
    assert main(["train", "grpoo", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'grpoo'" in err and "did you mean 'grpo'" in err
    for name in ("dvrp", "grpo", "sft", "sophia", "vision_opd", "vision_r1"):
        assert name in err
    assert "path/to/recipe.py or package.module:Class" in err


def test_missing_file_or_module_is_a_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.py")]) == 2
    assert "recipe file" in capsys.readouterr().err
    assert main(["train", "no_such_pkg.mod:Recipe"]) == 2
    assert "no module named 'no_such_pkg.mod'" in capsys.readouterr().err

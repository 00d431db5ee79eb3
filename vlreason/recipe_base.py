"""What every recipe shares outside the training loop: the registry, seeding, the
process group, and the command line (``vlreason train NAME`` == ``python recipes/NAME.py``)."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlreason.config import ConfigError, describe, doc, load_config, save_config
from vlreason.models.loading import ModelConfig
from vlreason.outputs import OutputPathError, prepare_output
from vlreason.registry import builtin_recipes, recipe_class  # noqa: F401  (recipe_class re-exported)
from vlreason.rollout.policy import RolloutConfig
from vlreason.train.checkpoint import latest_checkpoint
from vlreason.train.loop import LoopConfig

# The built-in recipes, name -> module: each registers itself with @register_recipe
# (vlreason/registry.py); recipes never inherit from each other.
RECIPES: dict[str, str] = builtin_recipes()


@dataclass
class DataConfig:
    train: str = doc("Canonical training dataset directory; empty: the bundled demo data.", "")
    eval: str = doc("Canonical evaluation dataset directory; empty: the bundled demo eval split.", "")


@dataclass
class RunConfig(LoopConfig):
    """What every recipe's config shares: the loop keys (``LoopConfig``: run directory,
    steps, checkpoints, optimizer, parallelism), the model, the data, the rollout
    (sampling, images, prompt format) and the batch, ``prompts_per_step``. A recipe's
    config extends it with its own section (``algorithm``, ``sft``, ``dvrp``, ...) and
    restates only the shared defaults it changes."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Datasets."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig,
                                   metadata={"help": "Sampling, images and prompt format."})
    prompts_per_step: int = doc(
        "Dataset rows (prompts) per optimizer step, over all processes: GRPO's prompt groups, "
        "SFT's examples, SOPHIA's captioned rows. The one batch key of every recipe.", 8)

    def validate(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")


class SetupError(RuntimeError):
    """A recipe could not start: bad model path, missing or empty dataset, bad settings."""


class Recipe:
    """The base of every recipe: the loop's recipe interface (``vlreason.train.loop``) with
    defaults, plus ``train`` and ``cleanup``.

    A recipe adds ``config_class``, ``default_model()``, ``setup()`` (which sets ``policy``,
    ``model`` and ``trainer``), ``prepare`` and ``step``. It overrides ``state_dict`` /
    ``load_state_dict`` when it has state to checkpoint (a data position, counters) and
    ``after_update`` when something runs after the optimizer step; the defaults here
    checkpoint nothing and do nothing, so a recipe (or a test double of one) without such
    state leaves them out."""

    config_class: type

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def default_model() -> Path:
        """The model when ``model.name_or_path`` is empty: the bundled warm tiny checkpoint
        (RL and distillation need a model that can already see and answer); recipes that
        start from scratch (SFT, Vision-R1's cold start) override it."""
        from vlreason.paths import warm_model

        return warm_model()

    def start_policy(self, *, with_reference: bool = False):
        """Load ``cfg.model`` as this recipe's ``policy`` (and ``model``), seeded; see :func:`load_policy`."""
        self.policy = load_policy(self.cfg, with_reference=with_reference)
        self.model = self.policy.model
        return self.policy

    def train(self) -> Path:
        return self.trainer.fit()

    def cleanup(self) -> None:
        self.policy = self.model = self.trainer = None

    def after_update(self, step: int) -> dict[str, Any] | None:
        """After each optimizer step; metrics it returns join the step's line. Default: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The recipe's state stored in every checkpoint. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. Default: nothing to restore."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_policy(cfg, *, with_reference: bool = False):
    """Seed everything, then load ``cfg.model`` as a Policy on this process's CUDA device
    when there is one (the one ``init_distributed`` selected), else on the CPU."""
    from vlreason.rollout.policy import Policy

    seed_everything(cfg.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Policy.load(cfg.model, cfg.rollout, device=device, with_reference=with_reference)


def load_split(path: str, default_split: str):
    """A canonical dataset: ``path``, or the bundled demo split when ``path`` is empty."""
    from vlreason.data.schema import load_canonical
    from vlreason.paths import demo_data

    return load_canonical(path or demo_data(default_split))


def init_distributed() -> None:
    """Join the process group when started by ``accelerate launch`` / torchrun, and make
    ``LOCAL_RANK``'s GPU this process's current device (NCCL collectives and the model
    use it)."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState()  # initialises torch.distributed (gloo on CPU, nccl on CUDA)


def check_output_dir(cfg) -> None:
    """Refuse to mix a fresh run into an earlier run's directory, unless asked; then
    create the directory and prove it writable (raises ``OutputPathError``), so that a
    bad ``output_dir`` fails before any model is built or loaded."""
    out = Path(cfg.output_dir)
    if not cfg.resume and not cfg.overwrite and out.is_dir() and latest_checkpoint(out) is not None:
        raise ConfigError(
            f"output_dir {out} holds checkpoints of an earlier run; pass resume=auto to "
            "continue it, overwrite=true to start over, or another output_dir"
        )
    prepare_output(out, is_dir=True)


def run_recipe(recipe_cls, config_path: str | None, overrides: list[str]) -> Path:
    cfg = load_config(recipe_cls.config_class, config_path, overrides)
    check_output_dir(cfg)  # on every process, before any of them changes the directory
    if not cfg.model.name_or_path:  # the recipe's embedded default model, recorded in config.yaml
        cfg.model.name_or_path = str(recipe_cls.default_model())
    init_distributed()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        out = Path(cfg.output_dir)
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    recipe = recipe_cls(cfg)
    try:
        recipe.setup()
    except (ValueError, FileNotFoundError, OSError) as err:
        raise SetupError(str(err)) from err
    try:
        result = recipe.train()
    finally:
        recipe.cleanup()
    return result


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the recipe's embedded defaults)")
    parser.add_argument("--show-config", action="store_true", help="print every config key with its default and help, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rollout.num_generations=8")


def run_from_args(recipe_cls, name: str, args: argparse.Namespace) -> int:
    if args.show_config:
        for key, default, help_text in describe(recipe_cls.config_class):
            print(f"{key} = {default}\n    {help_text}")
        return 0
    try:
        result = run_recipe(recipe_cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"vlreason train {name}: config error: {err}", file=sys.stderr)
        return 2
    except (SetupError, OutputPathError) as err:
        print(f"vlreason train {name}: error: {err}", file=sys.stderr)
        return 2
    print(f"done: {result}")
    return 0


def run_recipe_cli(recipe_cls, argv: list[str], name: str) -> int:
    parser = argparse.ArgumentParser(prog=f"recipes/{name}.py", description=(recipe_cls.__doc__ or "").strip().split("\n")[0])
    add_recipe_arguments(parser)
    return run_from_args(recipe_cls, name, parser.parse_args(argv))

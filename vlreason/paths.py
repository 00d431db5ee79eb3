"""Where the files vlreason ships live: the repository root, ``assets/``, the demo data.

The assets (bundled demo dataset, demo images, chat templates) sit next to the package
in the source tree, so they are found in a source checkout or an editable install
(``pip install -e .``). Set ``VLREASON_ASSETS`` to point at another copy of ``assets/``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_SPLITS = ("train", "eval")


def repo_root() -> Path:
    """The source tree's root (the folder holding ``vlreason/`` and ``assets/``)."""
    return Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    """``$VLREASON_ASSETS`` if set, else ``<repo_root>/assets``."""
    override = os.environ.get("VLREASON_ASSETS")
    return Path(override).expanduser() if override else repo_root() / "assets"


def demo_data(split: str = "train") -> Path:
    """The bundled synthetic demo dataset's ``split`` folder ("train" or "eval").

    Raises FileNotFoundError, saying how to get the data, when it is missing (e.g. a
    non-editable install, which does not copy ``assets/``).
    """
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; choose from {DEMO_SPLITS}")
    path = assets_dir() / "demo" / split
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"bundled demo dataset not found at {path}. It ships in the source tree's "
            "assets/ folder: install from a checkout with `pip install -e .`, set "
            "VLREASON_ASSETS to a copy of assets/, or rebuild it with "
            "`python -m data_pipelines.build_demo_data`."
        )
    return path


def warm_model() -> Path:
    """The bundled warm tiny checkpoint: the tiny offline Qwen2.5-VL after a short SFT
    on the demo data (format learnt, colours mostly right, counting weak), so RL demos
    start from a model that can already see. Rebuild with
    ``python -m data_pipelines.build_warm_model``."""
    path = assets_dir() / "warm-tiny"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled warm checkpoint not found at {path}; rebuild it with "
            "`python -m data_pipelines.build_warm_model` or set model.name_or_path"
        )
    return path

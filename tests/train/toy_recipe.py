"""The loop's own test recipe (imported by the tests in this folder): fits y = 2x + 1
with one small layer; its data position is part of the run's state, and ``final/`` holds
its weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


class ToyLinear:
    """``random_inputs``: x drawn from the RNG (checkpointed, so a resume draws the same)
    instead of a fixed ramp; ``pad``: bytes of padding in ``final/`` (to make it big);
    ``weights``: the weights after each update, by step."""

    def __init__(self, *, random_inputs: bool = False, pad: int = 0):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.position = 0
        self.random_inputs = random_inputs
        self.pad = pad
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def prepare(self, step, timer):
        self.position += 1
        x = torch.rand(2, 4) if self.random_inputs else torch.arange(8.0).view(2, 4) / (step + 1)
        return [(x, 2 * x.sum(1, keepdim=True) + 1)], {"data/position": self.position}

    def step(self, micro):
        x, y = micro
        return ((self.model(x) - y) ** 2).mean(), {}

    def after_update(self, step):
        self.weights[step + 1] = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def save_final(self, folder: Path) -> None:
        state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        if self.pad:
            state["pad"] = torch.ones(self.pad // 4)
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"position": self.position}) + "\n")

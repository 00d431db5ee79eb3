"""FSDP2's shard units and the memory plan's vision count come from the family adapter, so
they hold for InternVL's layout (``vision_tower.encoder.layer``) as for Qwen-VL's
(``visual.blocks``)."""

from __future__ import annotations

import pytest
import torch

from vlreason.models.loading import ModelConfig, load_model
from vlreason.models.tiny import family_available, tiny_model_path
from vlreason.train.memory import ParamCounts
from vlreason.train.parallel import shard_units


@pytest.mark.parametrize("name", ["qwen2_5_vl", "internvl"])
def test_shard_units_are_every_decoder_layer_and_vision_block(name):
    ok, why = family_available(name)
    if not ok:
        pytest.skip(why)
    model, family = load_model(ModelConfig(name_or_path=str(tiny_model_path(family=name))))
    units = shard_units(family, model)
    text = model.config.get_text_config()
    vision = model.config.vision_config
    depth = getattr(vision, "depth", None) or vision.num_hidden_layers
    assert len(units) == text.num_hidden_layers + depth
    assert len({id(u) for u in units}) == len(units)
    tower = family.vision_tower(model)
    tower_params = {id(p) for p in tower.parameters()}
    in_tower = [u for u in units if {id(p) for p in u.parameters()} <= tower_params]
    assert len(in_tower) == depth
    sizes = ParamCounts.from_model(model)
    assert sizes.vision == sum(p.numel() for p in tower.parameters()) > 0
    assert isinstance(units[0], torch.nn.Module)

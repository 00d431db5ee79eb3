"""Load a policy (and processor) from a local directory or a hub id, one code path.

dtype ``auto`` is bf16 on CUDA and fp32 on CPU; the attention implementation is sdpa
unless flash-attention is installed and asked for. LoRA goes through peft and, by
default, targets only the language model's linear layers (the vision tower is
excluded); the vision tower and its projector can be frozen separately.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from vlreason.config import doc
from vlreason.models.families import Family, family_for_config

log = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    enabled: bool = doc("Train LoRA adapters instead of the full model.", False)
    r: int = doc("LoRA rank.", 16)
    alpha: int = doc("LoRA alpha (scale = alpha / r).", 32)
    dropout: float = doc("LoRA dropout.", 0.0)
    target_modules: list[str] = doc(
        "Linear layer names to adapt (matched inside the language model only unless "
        "include_vision is true).",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    include_vision: bool = doc("Also put adapters on the vision tower's layers.", False)


@dataclass
class ModelConfig:
    name_or_path: str = doc(
        "Local checkpoint directory or hub id. Empty: the recipe's embedded default "
        "(a tiny offline model).", ""
    )
    dtype: str = doc("auto | float32 | bfloat16 | float16. auto: bf16 on CUDA, fp32 on CPU.", "auto")
    attn_implementation: str = doc("sdpa | eager | flash_attention_2 (needs flash-attn).", "sdpa")
    freeze_vision: bool = doc("Freeze the vision tower (patch embed and blocks).", False)
    freeze_projector: bool = doc("Freeze the vision-to-language projector (merger).", False)
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings."})

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype: unknown dtype '{self.dtype}'")


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    if name == "auto":
        on_cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    return getattr(torch, name)


def resolve_attn(name: str) -> str:
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        log.warning("flash-attn is not installed; using sdpa attention instead")
        return "sdpa"
    return name


def default_model_path() -> str:
    from vlreason.models.tiny import tiny_model_path

    return str(tiny_model_path())


def load_processor(name_or_path: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(cfg: ModelConfig, device: torch.device | str | None = None, trainable: bool = True):
    """(model, family) for ``cfg``; LoRA and freezing applied when ``trainable``."""
    from transformers import AutoModelForImageTextToText

    path = cfg.name_or_path or default_model_path()
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=resolve_dtype(cfg.dtype, device), attn_implementation=resolve_attn(cfg.attn_implementation)
    )
    family = family_for_config(model.config)
    if device is not None:
        model.to(device)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
        return model, family
    if cfg.freeze_vision:
        vision_tower_params(family, model, include_projector=False).requires_grad_(False)
    if cfg.freeze_projector:
        projector(family, model).requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model, family


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), under either transformers name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def projector(family: Family, model) -> torch.nn.Module:
    return family.core(model).visual.merger


class _ModuleGroup(torch.nn.Module):
    """A view over several modules so ``requires_grad_`` can be applied to all at once."""

    def __init__(self, modules: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)


def vision_tower_params(family: Family, model, include_projector: bool) -> torch.nn.Module:
    visual = family.core(model).visual
    if include_projector:
        return visual
    parts = [m for name, m in visual.named_children() if name != "merger"]
    return _ModuleGroup(parts)


def apply_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = set(cfg.target_modules)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.split(".")[-1] in names
        and (cfg.include_vision or ".visual." not in f".{name}.")
    ]
    if not targets:
        raise ValueError(f"model.lora.target_modules {sorted(names)} match no linear layer of the model")
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )
    return get_peft_model(model, peft_cfg)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}

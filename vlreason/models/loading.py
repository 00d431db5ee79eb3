"""Load a policy (and processor) from a local directory or a hub id, one code path.

``model.dtype`` names the *compute* dtype (``auto``: bf16 on CUDA, fp32 on CPU). A
trainable model is loaded in fp32 whatever it says: those are the master weights the
optimizer updates (an update of 1e-6 relative to a weight rounds away in bf16), and
the loop runs forward/backward in the compute dtype (autocast, or FSDP2's mixed
precision). Frozen copies (the reference model) are loaded in the compute dtype.
``final/`` is written in ``model.save_dtype`` (default: the starting checkpoint's own
dtype) by :func:`save_consolidated`, one tensor at a time, so a sharded model is never
held whole on one process. The attention implementation is sdpa unless
flash-attention is installed and asked for. LoRA goes through peft and, by
default, targets only the language model's linear layers (the vision tower is
excluded); the vision tower and its projector can be frozen separately.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

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
    dtype: str = doc("Compute dtype: auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU). "
                     "Trainable weights and optimizer state stay fp32; forward/backward run in this dtype "
                     "(autocast, or FSDP2 mixed precision; on CPU too); frozen copies are stored in it.", "auto")
    save_dtype: str = doc("dtype of final/: '' (the starting checkpoint's dtype, from its config) | float32 | "
                          "bfloat16 | float16. Checkpoints always keep the fp32 master weights.", "")
    attn_implementation: str = doc("sdpa | eager | flash_attention_2 (needs flash-attn).", "sdpa")
    freeze_vision: bool = doc("Freeze the vision tower (patch embed and blocks).", False)
    freeze_projector: bool = doc("Freeze the vision-to-language projector (merger).", False)
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings."})

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype: unknown dtype '{self.dtype}'")
        if self.save_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.save_dtype: unknown dtype '{self.save_dtype}'")


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    if name == "auto":
        on_cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    return getattr(torch, name)


def checkpoint_dtype(name_or_path: str) -> torch.dtype:
    """The dtype a checkpoint's config.json records (fp32 when it records none or is remote)."""
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        name = data.get("dtype") or data.get("torch_dtype") or (data.get("text_config") or {}).get("dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    return torch.float32


def save_dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.save_dtype) if cfg.save_dtype else checkpoint_dtype(cfg.name_or_path or default_model_path())


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
    """(model, family) for ``cfg``; LoRA and freezing applied when ``trainable``.

    A trainable model is fp32 (master weights); a frozen one is in the compute dtype."""
    from transformers import AutoModelForImageTextToText

    path = cfg.name_or_path or default_model_path()
    dtype = torch.float32 if trainable else resolve_dtype(cfg.dtype, device)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=resolve_attn(cfg.attn_implementation)
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
        model = apply_lora(model, cfg.lora, family)
    return model, family


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), under either transformers name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def projector(family: Family, model) -> torch.nn.Module:
    """The vision-to-language projector (Qwen's merger, InternVL's multi_modal_projector)."""
    return family.projector(model)


class _ModuleGroup(torch.nn.Module):
    """A view over several modules so ``requires_grad_`` can be applied to all at once."""

    def __init__(self, modules: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)


def vision_tower_params(family: Family, model, include_projector: bool) -> torch.nn.Module:
    return _ModuleGroup(family.vision_modules(model, include_projector))


def apply_lora(model, cfg: LoraConfig, family: Family | None = None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = set(cfg.target_modules)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.split(".")[-1] in names
        and (cfg.include_vision or not (family or family_for_config(model.config)).is_vision_parameter(name))
    ]
    if not targets:
        raise ValueError(f"model.lora.target_modules {sorted(names)} match no linear layer of the model")
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )
    return get_peft_model(model, peft_cfg)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered when it is a DTensor shard: every process calls)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_consolidated(model, processor, path, dtype: torch.dtype, *, max_shard_bytes: int = 2 << 30) -> None:
    """Write a ``from_pretrained``-loadable checkpoint (or LoRA adapter) of ``model`` in
    ``dtype``. Every process calls it (FSDP2 shards are gathered one tensor at a time);
    process 0 writes, at most ``max_shard_bytes`` of gathered tensors held at once."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    path = Path(path)
    if is_main:
        path.mkdir(parents=True, exist_ok=True)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if hasattr(model, "peft_config"):  # the adapter only: small, gathered whole
        state = {k: cast(_full(v)).cpu() for k, v in model.state_dict().items() if "lora_" in k}
        if is_main:
            model.save_pretrained(path, state_dict=state, safe_serialization=True)
            processor.save_pretrained(path)
        return
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    shards: list[list[str]] = []  # the tensor names of each written file
    pending: dict[str, torch.Tensor] = {}
    size = total = 0
    failed: Exception | None = None  # process 0 could not write a part (e.g. a full disk)
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensor = cast(_full(value).detach()).cpu().contiguous()  # a gather every process joins
        if not is_main or failed is not None:  # after a failure, process 0 still joins every gather
            continue
        if pending and size + tensor.nbytes > max_shard_bytes:
            try:
                shards.append(_write_part(model, pending, path / f"part-{len(shards)}.safetensors", save_file))
            except Exception as err:
                failed = err
            pending, size = {}, 0
            if failed is not None:
                continue
        pending[name] = tensor.clone()  # own storage: views of fused or tied tensors are refused
        size += tensor.nbytes
        total += tensor.nbytes
    if failed is not None:  # every process is past the gathers: they meet in write_final's agreement
        raise failed
    if is_main:
        shards.append(_write_part(model, pending, path / f"part-{len(shards)}.safetensors", save_file))
        _finish_checkpoint(model, processor, path, dtype, shards, total)


def _write_part(model, state: dict[str, torch.Tensor], file: Path, save_file) -> list[str]:
    """One file of tensors, under the names ``save_pretrained`` would write (transformers
    reverts its load-time renamings, e.g. ``model.language_model.layers`` -> ``model.layers``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # an older transformers: names are saved as they are
        pass
    save_file(state, str(file), metadata={"format": "pt"})
    return list(state)


def _finish_checkpoint(model, processor, path: Path, dtype: torch.dtype, shards: list[list[str]], total: int) -> None:
    """Name the file(s) as ``from_pretrained`` expects, then config, generation config, processor."""
    if len(shards) == 1:
        (path / "part-0.safetensors").replace(path / "model.safetensors")
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (path / f"part-{i}.safetensors").replace(path / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.dtype = dtype
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    processor.save_pretrained(path)

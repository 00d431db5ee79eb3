"""A policy: model + family adapter + processor + the run's single pixel budget.

Every role that sees an image (rollout, log-prob recompute, reference, teacher, views)
goes through one ``Policy`` so they all use the same budget and prompt format. The
reference is either a frozen copy or, with LoRA, the same model with its adapter
disabled (no second copy in memory).

Precision: the trainable model holds fp32 master weights; ``compute_dtype`` (from
``model.dtype``) is what the loop's forward/backward run in; ``save_dtype`` is the dtype
of ``final/``. ``reference_run`` is how a sharded reference is called (the loop sets it
under FSDP2; by default the reference runs directly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlreason.config import doc
from vlreason.models.families import Family
from vlreason.models.loading import (
    ModelConfig,
    default_model_path,
    load_model,
    load_processor,
    resolve_dtype,
    save_consolidated,
)
from vlreason.models.loading import (
    save_dtype as final_dtype,
)
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.engine import RolloutEngine, TransformersEngine
from vlreason.rollout.forward import TokenOutputs, token_outputs
from vlreason.rollout.generate import SamplingConfig
from vlreason.rollout.prompts import PromptConfig, build_prompt_batch
from vlreason.views.budget import PixelBudget


@dataclass
class RolloutConfig(SamplingConfig):
    min_pixels: int = doc("Pixel budget minimum, shared by every role that sees an image.", 56 * 56)
    max_pixels: int = doc("Pixel budget maximum, shared by every role that sees an image.", 112 * 112)
    logprob_chunk_size: int = doc(
        "Tokens per chunk when computing log-probs through the LM head: the largest transient "
        "is chunk x vocabulary fp32 (256 x 151,936 x 4 B = 156 MB).", 256)
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"help": "Prompt format."})


@dataclass
class Policy:
    model: torch.nn.Module
    family: Family
    processor: Any
    budget: PixelBudget
    rollout: RolloutConfig
    reference: torch.nn.Module | None = None  # a frozen copy; None with LoRA (adapter off)
    has_reference: bool = False  # reference log-probs available (copy, or LoRA adapter off)
    compute_dtype: torch.dtype = torch.float32  # forward/backward dtype (model.dtype)
    save_dtype: torch.dtype = torch.float32  # dtype of final/
    reference_run: Callable[[Callable[[], Any]], Any] | None = None  # runs a reference forward (FSDP2)
    engine: RolloutEngine | None = None  # what samples; default: the model itself (TransformersEngine)

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = TransformersEngine(self.model, self.family, self.processor)

    @classmethod
    def load(cls, model_cfg: ModelConfig, rollout: RolloutConfig, *, device=None, with_reference: bool = False) -> Policy:
        model, family = load_model(model_cfg, device=device)
        processor = load_processor(model_cfg.name_or_path or default_model_path())
        budget = PixelBudget(min_pixels=rollout.min_pixels, max_pixels=rollout.max_pixels, factor=family.factor)
        reference = None
        if with_reference and not model_cfg.lora.enabled:
            reference, _ = load_model(model_cfg, device=device, trainable=False)
        return cls(model, family, processor, budget, rollout, reference, with_reference,
                   compute_dtype=resolve_dtype(model_cfg.dtype, device), save_dtype=final_dtype(model_cfg))

    def prompts(self, rows: list[dict[str, Any]], images=None) -> PromptBatch:
        return build_prompt_batch(rows, self.processor, self.budget, self.rollout.prompt, images=images)

    def sample(self, prompts: PromptBatch, *, seed: int | list[int], num_generations: int | None = None,
               max_new_tokens: int | None = None, sampling: SamplingConfig | None = None) -> RolloutBatch:
        """G completions per prompt; ``sampling`` overrides the run's sampling settings.
        ``seed``: one seed per prompt (its samples then depend on nothing else), or one
        int from which each prompt's seed is derived by its position in ``prompts``."""
        return self.engine.sample(prompts, sampling or self.rollout, seed=seed,
                                  num_generations=num_generations, max_new_tokens=max_new_tokens)

    def token_outputs(self, batch: RolloutBatch, **kwargs) -> TokenOutputs:
        return token_outputs(self.model, self.family, batch, chunk_size=self.rollout.logprob_chunk_size, **kwargs)

    @property
    def sampling_temperature(self) -> float:
        """The temperature completions are sampled at (1 for greedy), for scoring them."""
        return self.rollout.temperature if self.rollout.temperature > 0 else 1.0

    @torch.no_grad()
    def reference_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
        if not self.has_reference:
            raise RuntimeError("this policy was loaded without a reference model (KL coefficient 0)")
        if self.reference is not None:
            model, ctx = self.reference, contextlib.nullcontext()
        else:  # LoRA: the base model is the reference
            model, ctx = self.model, self.model.disable_adapter()
        def run():
            return token_outputs(model, self.family, batch, chunk_size=self.rollout.logprob_chunk_size,
                                 temperature=temperature)

        with ctx:
            out = self.reference_run(run) if self.reference is not None and self.reference_run else run()
        return out.logprobs_NT.detach()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, path) -> None:
        """``final/`` in ``save_dtype``; every process calls it (sharded weights are gathered
        tensor by tensor), process 0 writes."""
        save_consolidated(self.model, self.processor, path, self.save_dtype)


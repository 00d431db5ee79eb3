"""vlreason's side of ``benchmarks/vs_trl.py`` (run in its own child process): ``Policy`` +
``GRPOPhases`` driven by ``Trainer.train_step``, the code ``vlreason train grpo`` runs per step."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from bench_common import (
    PhasesRecipe,
    RssSampler,
    Settings,
    SideProbes,
    StepProfiler,
    color_rows,
    flop_split,
    max_rss_bytes,
    side_result,
)

import vlreason.data.schema  # noqa: F401  (datasets: the recipe loads its data with it)
from vlreason.data.stream import RowStream
from vlreason.models.loading import ModelConfig
from vlreason.rollout.policy import Policy, RolloutConfig
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
from vlreason.train.metrics import StepTimer


def build_phases(settings: Settings) -> tuple[Policy, GRPOPhases]:
    """The policy (and a reference copy when beta > 0) and the GRPO phases over the demo rows."""
    torch.manual_seed(settings.seed)
    rollout = RolloutConfig(num_generations=settings.num_generations, max_new_tokens=settings.max_new_tokens,
                            min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    if settings.logprob_chunk_size:
        rollout.logprob_chunk_size = settings.logprob_chunk_size
    policy = Policy.load(ModelConfig(name_or_path=settings.model_path), rollout,
                         with_reference=settings.beta > 0)
    stream = RowStream(color_rows(settings), seed=settings.seed)
    algorithm = GRPOConfig(micro_batch_prompts=settings.micro_batch_prompts, kl_coef=settings.beta,
                           kl_estimator="k3", aggregation="token-mean", advantage="grpo",
                           clip_low=0.2, clip_high=0.2, reward=settings.reward)
    return policy, GRPOPhases(algorithm, policy, stream, settings.seed, prompts_per_step=settings.prompts_per_step)


def build_trainer(settings: Settings, policy: Policy, phases: GRPOPhases) -> Trainer:
    loop = LoopConfig(output_dir=tempfile.mkdtemp(prefix="vs_trl_vlreason_"), seed=settings.seed,
                      max_steps=settings.warmup + settings.steps + 1, trackers=[], progress=False,
                      optim=OptimConfig(lr=settings.lr, weight_decay=0.0, schedule="constant", max_grad_norm=1.0))
    return Trainer(loop, PhasesRecipe(phases, policy.model))


def run_vlreason(settings: Settings) -> dict[str, Any]:
    rss_imports = RssSampler().current()
    policy, phases = build_phases(settings)
    trainer = build_trainer(settings, policy, phases)
    refs = [policy.reference] if policy.reference is not None else []
    probes = SideProbes([policy.model], refs, policy.processor.image_processor)
    timer = StepTimer(synchronize=False)
    policy.model.train()
    prompt_len = PromptLength(policy.model)

    rss_before = probes.sampler.start()
    records = []
    for _ in range(settings.warmup + settings.steps):
        probes.clear()
        timer.reset()
        start = time.perf_counter()
        metrics = trainer.train_step(timer)
        seconds = time.perf_counter() - start
        phase = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("time/") and k != "time/step"}
        records.append(probes.record(seconds, phase,
                                     {"completion_len": metrics.get("completion_len"), "loss": metrics.get("loss")}))
    peak_steps = probes.sampler.stop()
    max_rss = max_rss_bytes()
    prompt_len.handle.remove()
    gen = records[-1]["vision"]["generation"]
    split = flop_split(policy.model, prompt_len.tokens, settings.max_new_tokens,
                       gen["patch_rows"] // max(gen["images"], 1))
    profile = None
    if settings.profile:
        with StepProfiler() as prof:
            timer.reset()
            trainer.train_step(timer)
        profile = prof.result()
    out = side_result(records, rss_imports, rss_before, peak_steps, max_rss, profile)
    out["flop_split"] = split
    return out


class PromptLength:
    """The sequence length of the language model's first call: the first rollout prefill, i.e. a
    prompt's tokens (image tokens included; prompts of one batch are padded to the longest)."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.tokens:
            x = kwargs.get("inputs_embeds")
            x = x if x is not None else (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0])
            self.tokens = int(x.shape[1])

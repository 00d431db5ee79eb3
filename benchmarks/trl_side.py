"""TRL's side of ``benchmarks/vs_trl.py`` (run in its own child process): ``GRPOTrainer.train()``
on the same checkpoint, rows, pixel budget, reward and step shape as vlreason's side.

TRL is an optional extra (``pip install -e ".[bench]"``): it is imported inside the functions,
so this module imports without it; ``vs_trl.py`` checks for it before starting a child.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_common import (
    ImageProcessorCounter,
    RssSampler,
    Settings,
    StepProfiler,
    VisionCounter,
    color_rows,
    max_rss_bytes,
    step_record,
)
from datasets import Dataset
from transformers import TrainerCallback

from vlreason.rewards import get_reward
from vlreason.rollout.prompts import decode_row_images
from vlreason.views.budget import PixelBudget


def trl_dataset(settings: Settings) -> Dataset:
    """The same images at the same pixel budget as vlreason (resized once here; the
    processor's own smart resize then leaves a budget-sized image as it is)."""
    budget = PixelBudget(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels, factor=28)
    rows = color_rows(settings)
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": row["question"]}] for row in rows],
        "image": [budget.resize(decode_row_images(row)[0]) for row in rows],
        "answer": list(rows["answer"]),
    })


def trl_reward(settings: Settings):
    """vlreason's reward function in TRL's reward-function signature."""
    reward_fn = get_reward(settings.reward)
    max_tokens = settings.max_new_tokens

    def vlreason_reward(prompts, completions, completion_ids, answer, **kwargs):
        out = []
        for completion, ids, truth in zip(completions, completion_ids, answer):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            truncated = len(ids) >= max_tokens  # TRL's ids stop at the first EOS
            out.append(float(reward_fn(text, truth, truncated=truncated, choices=None,
                                       row={"answer": truth})))
        return out

    return vlreason_reward


def trl_args(settings: Settings):
    """TRL's ``GRPOConfig``: micro-batches of ``micro_prompts * G`` completions, accumulated
    over ``prompts / micro_prompts``, so one optimizer step generates ``prompts * G`` once."""
    from trl import GRPOConfig

    G = settings.num_generations
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_trl_"),
        per_device_train_batch_size=settings.micro_batch_prompts * G,
        gradient_accumulation_steps=settings.prompts_per_step // settings.micro_batch_prompts,
        num_generations=G,
        max_completion_length=settings.max_new_tokens,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=settings.beta,
        epsilon=0.2,
        loss_type="dapo",  # token-mean over the generation batch, like vlreason's token-mean
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; vlreason's is off: same work on both sides
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        max_steps=settings.warmup + settings.steps + (1 if settings.profile else 0),
        logging_strategy="no",  # keeps TRL's per-step metric lists (logging clears them)
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
        log_completions=False,
    )


@dataclass
class Probes:
    """What a step is measured with; the counters and the sampler are set once the trainer exists."""

    phase_times: dict[str, float] = field(default_factory=dict)
    vision: VisionCounter | None = None
    images: ImageProcessorCounter | None = None
    sampler: RssSampler | None = None
    trainer: Any = None


class StepRecorder(TrainerCallback):
    """Per optimizer step: wall time, vision / image-processor counts, phase times and the mean
    completion length; after the last measured step, the RSS peaks and (with ``profile``) the
    start of one extra, profiled step."""

    def __init__(self, settings: Settings, probes: Probes):
        self.settings = settings
        self.probes = probes
        self.last = None
        self.times: list[float] = []
        self.vision: list[dict] = []
        self.processor: list[dict] = []
        self.phases: list[dict] = []
        self.profiler = None
        self.profile = None
        self.rss_peak_steps = 0
        self.max_rss = 0
        self.lengths: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()
        self.probes.vision.reset()
        self.probes.images.pop()
        self.probes.phase_times.clear()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        done = len(self.times)
        if self.profiler is not None:  # the extra, profiled step
            self.profiler.__exit__(None, None, None)
            self.profile = self.profiler.result()
            self.profiler = None
            self.last = now
            return
        probes = self.probes
        self.times.append(now - self.last)
        self.vision.append(probes.vision.pop())
        self.processor.append(probes.images.pop())
        self.phases.append(dict(probes.phase_times))
        probes.phase_times.clear()
        # read now: TRL's log() at the end of train() clears its metric lists
        lengths = probes.trainer._metrics["train"].get("completions/mean_length") or [float("nan")]
        self.lengths.append(lengths[-1])
        if done + 1 == self.settings.warmup + self.settings.steps:
            self.stop_sampler()
            if self.settings.profile:
                self.profiler = StepProfiler().__enter__()
        self.last = time.perf_counter()

    def stop_sampler(self) -> None:
        self.rss_peak_steps = self.probes.sampler.stop()
        self.max_rss = max_rss_bytes()

    def records(self) -> list[dict]:
        return [step_record(seconds, self.phases[i], self.vision[i], self.processor[i],
                            {"completion_len": self.lengths[i]})
                for i, seconds in enumerate(self.times)]


def time_phases(trainer, phase_times: dict[str, float]) -> None:
    """Phase timers around TRL's own methods (rollout: tokenise + generate + decode;
    reference: no-grad log-prob passes; everything else is the rest of the step)."""

    def timed(name_of, method):
        def wrapper(*a, **kw):
            name = name_of()
            start = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                if name:
                    phase_times[name] = phase_times.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    trainer._generate = timed(lambda: "rollout", trainer._generate)
    trainer._calculate_rewards = timed(lambda: "reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        lambda: None if torch.is_grad_enabled() else "reference", trainer._get_per_token_logps_and_entropies)


def run_trl(settings: Settings) -> dict[str, Any]:
    from trl import GRPOTrainer

    rss_imports = RssSampler().current()
    torch.manual_seed(settings.seed)
    dataset = trl_dataset(settings)
    probes = Probes()
    steps = StepRecorder(settings, probes)
    trainer = GRPOTrainer(model=settings.model_path, reward_funcs=[trl_reward(settings)], args=trl_args(settings),
                          train_dataset=dataset, callbacks=[steps])
    probes.trainer = trainer
    time_phases(trainer, probes.phase_times)

    refs = [trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else []
    probes.vision = VisionCounter([trainer.model], refs)
    probes.images = ImageProcessorCounter(trainer.processing_class.image_processor)
    probes.sampler = RssSampler()
    rss_before = probes.sampler.start()
    trainer.train()
    if not steps.rss_peak_steps:
        steps.stop_sampler()

    out = {"records": steps.records(), "rss_after_imports": rss_imports, "rss_before_steps": rss_before,
           "rss_peak_steps": steps.rss_peak_steps, "max_rss": steps.max_rss}
    if steps.profile is not None:
        out["profile"] = steps.profile
    return out

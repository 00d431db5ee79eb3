"""TRL's side of ``benchmarks/vs_trl.py`` (run in its own child process): ``GRPOTrainer.train()``
on the same checkpoint, rows, pixel budget, reward and step shape as vlreason's side.

Two modes (``Settings.trl_mode``):

* ``unpatched``: TRL exactly as installed. On CPU its fused log-prob head
  (``trl.trainer.utils.add_fused_lm_head``) scores *every* position, prompt included,
  because its compact path is gated on Triton (``_use_triton``: CUDA / XPU only), and it
  computes the per-token entropy of the policy pass for its ``entropy`` metric.
* ``fair`` (the headline): :func:`apply_fair_patch`, two documented changes that make TRL
  on CPU do what it does on a GPU minus what vlreason does not compute: (1) the compact
  path (only positions with a label, i.e. completion tokens, are projected through the
  output layer), which is TRL's own GPU code path; (2) no entropy (vlreason's GRPO loss
  computes none, and with ``entropy_coef=0`` and ``top_entropy_quantile=1`` TRL uses it
  for a logged metric only, which then reads 0).

TRL is an optional extra (``pip install -e ".[bench]"``): it is imported inside the functions,
so this module imports without it; ``vs_trl.py`` checks for it before starting a child.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import bench_common as common
import torch
from datasets import Dataset
from transformers import TrainerCallback

from vlreason.rewards import get_reward
from vlreason.rollout.prompts import decode_row_images
from vlreason.views.budget import PixelBudget


def trl_dataset(settings: common.Settings) -> Dataset:
    """The same images at the same pixel budget as vlreason (resized once here; the
    processor's own smart resize then leaves a budget-sized image as it is)."""
    budget = PixelBudget(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels, factor=28)
    rows = common.color_rows(settings)
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": row["question"]}] for row in rows],
        "image": [budget.resize(decode_row_images(row)[0]) for row in rows],
        "answer": list(rows["answer"]),
    })


def trl_reward(settings: common.Settings):
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


def trl_args(settings: common.Settings):
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
    side: common.SideProbes | None = None
    trainer: Any = None


class StepRecorder(TrainerCallback):
    """Per optimizer step: wall time, vision / image-processor counts, phase times and the mean
    completion length; after the last measured step, the RSS peaks and (with ``profile``) the
    start of one extra, profiled step."""

    def __init__(self, settings: common.Settings, probes: Probes):
        self.settings = settings
        self.probes = probes
        self.last = None
        self.records: list[dict] = []
        self.profiler = None
        self.profile = None
        self.rss_peak_steps = 0
        self.max_rss = 0

    def on_train_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()
        self.probes.side.clear()
        self.probes.phase_times.clear()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        done = len(self.records)
        if self.profiler is not None:  # the extra, profiled step
            self.profiler.__exit__(None, None, None)
            self.profile = self.profiler.result()
            self.profiler = None
            self.last = now
            return
        probes = self.probes
        # read now: TRL's log() at the end of train() clears its metric lists
        lengths = probes.trainer._metrics["train"].get("completions/mean_length") or [float("nan")]
        self.records.append(probes.side.record(now - self.last, dict(probes.phase_times),
                                               {"completion_len": lengths[-1]}))
        probes.phase_times.clear()
        if done + 1 == self.settings.warmup + self.settings.steps:
            self.stop_sampler()
            if self.settings.profile:
                self.profiler = common.StepProfiler().__enter__()
        self.last = time.perf_counter()

    def stop_sampler(self) -> None:
        self.rss_peak_steps = self.probes.side.sampler.stop()
        self.max_rss = common.max_rss_bytes()


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


FAIR_PATCH = (
    "trl.trainer.utils._use_triton -> True: the fused head projects only completion positions "
    "(TRL's GPU path; the tiles still run in torch on CPU)",
    "policy head re-added with outputs=('log_probs',) and compute_entropy=False: no entropy "
    "(vlreason computes none; TRL's 'entropy' metric then reads 0)",
)


def apply_fair_patch(trainer, trl_utils=None) -> list[str]:
    """Make ``trainer`` (a built ``GRPOTrainer``) compute on CPU what TRL computes on a GPU,
    without the entropy that vlreason never computes; returns the changes made (:data:`FAIR_PATCH`).

    Refuses when the entropy feeds the loss (``entropy_coef`` or ``top_entropy_quantile``):
    then dropping it would change what is trained, not only what is logged.
    """
    if trl_utils is None:
        import trl.trainer.utils as trl_utils
    if getattr(trainer, "_entropy_bonus_enabled", False) or getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        raise ValueError("the entropy feeds TRL's loss here (entropy_coef / top_entropy_quantile): not patched")

    # (1) compact scoring: the fused head's only CPU / GPU difference in what it computes
    trl_utils._use_triton = lambda device: True

    # (2) no entropy: the policy model's fused head without the entropy output ...
    model = trainer.model
    model.__dict__.pop("forward", None)  # the instance forward add_fused_lm_head set; the class's again
    trl_utils.add_fused_lm_head(model, temperature=trainer.temperature,
                                cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32, outputs=("log_probs",))
    # ... and the loss's call no longer asks for it (zeros stand in for the metric)
    inner = trainer._get_per_token_logps_and_entropies

    def logps_without_entropy(*args, compute_entropy=False, **kwargs):
        logps, entropies, aux = inner(*args, compute_entropy=False, **kwargs)
        return logps, (torch.zeros_like(logps) if compute_entropy else entropies), aux

    trainer._get_per_token_logps_and_entropies = logps_without_entropy
    return list(FAIR_PATCH)


def run_trl(settings: common.Settings) -> dict[str, Any]:
    from trl import GRPOTrainer

    rss_imports = common.RssSampler().current()
    torch.manual_seed(settings.seed)
    dataset = trl_dataset(settings)
    probes = Probes()
    steps = StepRecorder(settings, probes)
    trainer = GRPOTrainer(model=settings.model_path, reward_funcs=[trl_reward(settings)], args=trl_args(settings),
                          train_dataset=dataset, callbacks=[steps])
    probes.trainer = trainer
    patch = apply_fair_patch(trainer) if settings.trl_mode == "fair" else []
    time_phases(trainer, probes.phase_times)

    refs = [trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else []
    probes.side = common.SideProbes([trainer.model], refs, trainer.processing_class.image_processor)
    rss_before = probes.side.sampler.start()
    trainer.train()
    if not steps.rss_peak_steps:
        steps.stop_sampler()
    out = common.side_result(steps.records, rss_imports, rss_before, steps.rss_peak_steps, steps.max_rss,
                             steps.profile)
    out["trl_mode"] = settings.trl_mode
    out["patch"] = patch
    return out

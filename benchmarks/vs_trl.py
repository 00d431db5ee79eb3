"""vlreason's GRPO step vs TRL's GRPOTrainer step, side by side, on the same tiny VLM.

    pip install -e ".[bench]"        # TRL is an optional extra, never a runtime dependency
    python benchmarks/vs_trl.py [--steps N] [--rounds 2] [--sizes tiny vocab] [--betas 0.04 0]

Both sides get the same checkpoint (a tiny offline Qwen2.5-VL: ``tiny`` is the default
tiny model, vocabulary 1,024; ``vocab`` is the same model with the real 151,936-token
vocabulary), the same rows (the bundled demo data's ``synthetic/color`` rows, images
resized once to the same pixel budget), the same G, completion length, prompts per
step, micro-batch, learning rate, optimizer (AdamW, constant schedule, clip 1.0), KL
coefficient (beta > 0 loads a reference model on both sides), loss (clipped surrogate,
token-mean / "dapo", k3 KL), fp32 on CPU, no gradient checkpointing, and the same Python
reward (vlreason's ``format_accuracy``).

* vlreason: ``Policy`` + ``GRPOPhases`` (rollout, reward, advantages, reference) driven by
  ``Trainer.train_step`` (micro-batches, backward, clip, AdamW step): the code a recipe runs.
* TRL: ``GRPOTrainer.train()`` with ``per_device_train_batch_size = micro_prompts * G`` and
  ``gradient_accumulation_steps = prompts / micro_prompts``, so one optimizer step generates
  ``prompts * G`` completions once and backpropagates them in the same micro-batches.

Each side runs in its own subprocess (so peak RSS is per side), one after the other
(``--rounds N``: N times each, ABBA order, the least disturbed round's times kept).
Per side: median step time over ``--steps`` steps after ``--warmup`` warm-up steps, the
phase split (rollout / reward / reference / rest), peak RSS (``ru_maxrss`` of the child,
and the peak above the RSS before the first step from a psutil sampler), completion
length, and what the vision tower encoded per step: a forward hook on every model's
``model.visual`` counts calls, images (rows of ``grid_thw``) and patch rows, split by
pass (generation: policy without grad; reference: the reference model; policy: with grad).
Images handed to the image processor per step are counted too.

Goals (printed as met / missed, and by how much): step time <= 0.5x TRL's; peak memory
<= 0.6x TRL's with the big vocabulary; one encoding per distinct image per pass. When a
goal is missed (or with ``--profile always``) the JSON gets each side's profile of one
extra step (cProfile by cumulative and own time, torch.profiler by operator self time).

Timings on a shared 2-core machine are noisy: compare the ratios, not absolute seconds
(DESIGN.md, performance rules). Results: ``benchmarks/results_vs_trl.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results_vs_trl.json"
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},  # TinySpec() defaults: vocab 1,024, hidden 64, 2 layers, vision depth 2
    "vocab": {"vocab_size": 151_936},  # the real Qwen vocabulary
}
DEFAULT_STEPS = {"tiny": 8, "vocab": 3}  # tiny steps take a fraction of a second: more of them
GOAL_STEP_TIME = 0.5  # vlreason step time <= 0.5x TRL's
GOAL_PEAK_RSS = 0.6  # vlreason peak memory <= 0.6x TRL's with the big vocabulary


@dataclass
class Settings:
    """Everything both sides share (the child gets it as JSON)."""

    size: str = "tiny"
    model_path: str = ""
    beta: float = 0.04
    num_generations: int = 8
    prompts_per_step: int = 2
    micro_batch_prompts: int = 1
    max_new_tokens: int = 32
    lr: float = 1e-5
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    source: str = "synthetic/color"
    reward: str = "format_accuracy"
    profile: bool = False
    threads: int = 1  # torch threads per side (0: torch's default)
    logprob_chunk_size: int = 0  # vlreason's rollout.logprob_chunk_size (0: its default)


# ---------------------------------------------------------------------------- measuring


class RssSampler:
    """Samples the process RSS in a background thread; ``peak`` since ``start``."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> int:
        return self.proc.memory_info().rss

    def start(self) -> int:
        self.peak = base = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return base

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())
        return self.peak


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class VisionCounter:
    """Vision-tower calls / images / patch rows, split by pass.

    A call on a reference model's tower is the ``reference`` pass; on the policy with
    grad enabled, the ``policy`` (update) pass; on the policy without grad, ``generation``.
    """

    PASSES = ("generation", "reference", "policy")

    def __init__(self, policy_models: list, reference_models: list):
        self.handles = []
        for role, models in (("policy", policy_models), ("reference", reference_models)):
            for model in models:
                visual = vision_tower(model)
                self.handles.append(visual.register_forward_hook(self._hook(role), with_kwargs=True))
        self.reset()

    def _hook(self, role: str):
        import torch

        def hook(module, args, kwargs, output):
            pixels = args[0] if args else kwargs.get("hidden_states")
            grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
            name = "reference" if role == "reference" else ("policy" if torch.is_grad_enabled() else "generation")
            entry = self.counts[name]
            entry["calls"] += 1
            entry["images"] += int(grid.shape[0]) if grid is not None else 0
            entry["patch_rows"] += int(pixels.shape[0]) if pixels is not None else 0

        return hook

    def reset(self) -> None:
        self.counts = {p: {"calls": 0, "images": 0, "patch_rows": 0} for p in self.PASSES}

    def pop(self) -> dict[str, dict[str, int]]:
        out = self.counts
        self.reset()
        return out


def vision_tower(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP / accelerate wrappers
    return base.model.visual


class ImageProcessorCounter:
    """Counts the images handed to an image processor (``__call__`` goes to ``preprocess``)."""

    def __init__(self, image_processor):
        self.images = 0
        self.calls = 0
        original = image_processor.preprocess

        def preprocess(images, *args, **kwargs):
            self.calls += 1
            self.images += count_images(images)
            return original(images, *args, **kwargs)

        image_processor.preprocess = preprocess

    def pop(self) -> dict[str, int]:
        out = {"calls": self.calls, "images": self.images}
        self.calls = self.images = 0
        return out


def count_images(obj) -> int:
    if obj is None:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(count_images(x) for x in obj)
    return 1


class StepProfiler:
    """cProfile + torch.profiler (with memory) over one step; top entries as plain dicts.

    Time: cProfile's functions by cumulative and own time, torch ops by self CPU time.
    Memory: the peak of live CPU-allocator bytes during the step (running sum of the
    profiler's ``[memory]`` events), the ops open at that moment (outermost first), and
    the ops (with input shapes) that allocated the most (bytes summed over their calls).
    """

    def __init__(self, top: int = 15):
        self.top = top

    def __enter__(self):
        import cProfile

        from torch.profiler import ProfilerActivity, profile

        self.cprof = cProfile.Profile()
        self.tprof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)
        self.tprof.__enter__()
        self.cprof.enable()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cprof.disable()
        self.seconds = time.perf_counter() - self.start
        self.tprof.__exit__(*exc)
        return False

    def result(self) -> dict[str, Any]:
        import pstats

        stats = pstats.Stats(self.cprof)
        rows = []
        for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():
            rows.append({"function": f"{short_path(file)}:{line}({func})", "calls": nc,
                         "own_s": round(tt, 4), "cumulative_s": round(ct, 4)})
        by_cum = sorted(rows, key=lambda r: -r["cumulative_s"])
        by_own = sorted(rows, key=lambda r: -r["own_s"])
        ops = sorted(self.tprof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        torch_ops = [{"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4),
                      "cpu_total_s": round(e.cpu_time_total / 1e6, 4)} for e in ops[: self.top]]
        allocs = sorted(self.tprof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_memory_usage)
        alloc_ops = [{"op": e.key, "input_shapes": str(e.input_shapes)[:160], "calls": e.count,
                      "alloc_mib": round(e.self_cpu_memory_usage / 2**20, 1)}
                     for e in allocs[: self.top] if e.self_cpu_memory_usage > 0]
        return {
            "profiled_step_s": round(self.seconds, 3),
            "cprofile_cumulative": [r for r in by_cum if not r["function"].startswith("~")][: self.top * 2],
            "cprofile_own": by_own[: self.top],
            "torch_ops_self_cpu": torch_ops,
            **self.memory_peak(),
            "torch_ops_allocating": alloc_ops,
        }

    def memory_peak(self) -> dict[str, Any]:
        import torch

        events = list(self.tprof.profiler.kineto_results.events())
        mem = sorted((e for e in events if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
        live = peak = 0
        peak_event = None
        for e in mem:
            live += e.nbytes()
            if live > peak:
                peak, peak_event = live, e
        open_ops = []
        if peak_event is not None:
            t, thread = peak_event.start_ns(), peak_event.start_thread_id()
            inside = [e for e in events if e.name() != "[memory]" and e.start_thread_id() == thread
                      and e.start_ns() <= t <= e.end_ns()]
            open_ops = [e.name() for e in sorted(inside, key=lambda e: (e.start_ns(), -e.end_ns()))]
        return {"alloc_peak_mib": round(peak / 2**20, 1), "ops_open_at_alloc_peak": open_ops[-8:]}


def short_path(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def step_record(seconds: float, phases: dict[str, float], vision: dict, processor: dict, extra: dict) -> dict:
    rest = seconds - sum(phases.get(k, 0.0) for k in ("rollout", "reward", "reference"))
    return {"step_s": seconds, "phases_s": {**phases, "rest": rest}, "vision": vision,
            "image_processor": processor, **extra}


def summarise(records: list[dict], warmup: int) -> dict[str, Any]:
    measured = records[warmup:] or records
    phases = sorted({k for r in measured for k in r["phases_s"]})
    last = measured[-1]
    return {
        "step_s_median": statistics.median(r["step_s"] for r in measured),
        "step_s_all": [round(r["step_s"], 4) for r in records],
        "phases_s_median": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in measured) for k in phases},
        "vision_per_step": last["vision"],
        "images_encoded_per_step": sum(v["images"] for v in last["vision"].values()),
        "vision_calls_per_step": sum(v["calls"] for v in last["vision"].values()),
        "image_processor_per_step": last["image_processor"],
        "completion_len_mean": statistics.mean(r.get("completion_len", float("nan")) for r in measured),
    }


# ---------------------------------------------------------------------------- the data


def color_rows(settings: Settings):
    """The demo train split's rows of ``settings.source`` (a ``datasets.Dataset``)."""
    from vlreason.data.schema import load_canonical
    from vlreason.paths import demo_data

    data = load_canonical(demo_data("train"))
    keep = [i for i, source in enumerate(data["source"]) if source == settings.source]
    return data.select(keep)


# ---------------------------------------------------------------------------- vlreason


def run_vlreason(settings: Settings) -> dict[str, Any]:
    import torch

    import vlreason.data.schema  # noqa: F401  (datasets: the recipe loads its data with it)
    from vlreason.data.stream import RowStream
    from vlreason.models.loading import ModelConfig
    from vlreason.models.policy import Policy, RolloutConfig
    from vlreason.train.grpo import GRPOConfig, GRPOPhases
    from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
    from vlreason.train.metrics import StepTimer

    rss_imports = RssSampler().current()
    torch.manual_seed(settings.seed)
    rollout = RolloutConfig(num_generations=settings.num_generations, max_new_tokens=settings.max_new_tokens,
                            min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    if settings.logprob_chunk_size:
        rollout.logprob_chunk_size = settings.logprob_chunk_size
    policy = Policy.load(ModelConfig(name_or_path=settings.model_path), rollout,
                         with_reference=settings.beta > 0)
    stream = RowStream(color_rows(settings), seed=settings.seed)
    algorithm = GRPOConfig(prompts_per_step=settings.prompts_per_step,
                           micro_batch_prompts=settings.micro_batch_prompts, kl_coef=settings.beta,
                           kl_estimator="k3", aggregation="token-mean", advantage="grpo",
                           clip_low=0.2, clip_high=0.2, reward=settings.reward)
    phases = GRPOPhases(algorithm, policy, stream, settings.seed)

    class Recipe:  # the loop interface, as recipes/grpo.py wires it
        model = policy.model

        def prepare(self, step, timer):
            return phases.prepare(step, timer)

        def step(self, micro_batch):
            return phases.loss(micro_batch)

        def after_update(self, step):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    total = settings.warmup + settings.steps
    loop = LoopConfig(output_dir=tempfile.mkdtemp(prefix="vs_trl_vlreason_"), seed=settings.seed,
                      max_steps=total + 1, trackers=[], progress=False,
                      optim=OptimConfig(lr=settings.lr, weight_decay=0.0, schedule="constant", max_grad_norm=1.0))
    trainer = Trainer(loop, Recipe())
    vision = VisionCounter([policy.model], [policy.reference] if policy.reference is not None else [])
    images = ImageProcessorCounter(policy.processor.image_processor)
    timer = StepTimer(synchronize=False)
    policy.model.train()

    sampler = RssSampler()
    rss_before = sampler.start()
    records = []
    for _ in range(total):
        vision.reset()
        images.pop()
        timer.reset()
        start = time.perf_counter()
        metrics = trainer.train_step(timer)
        seconds = time.perf_counter() - start
        phase = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("time/") and k != "time/step"}
        records.append(step_record(seconds, phase, vision.pop(), images.pop(),
                                   {"completion_len": metrics.get("completion_len"), "loss": metrics.get("loss")}))
    peak_steps = sampler.stop()
    out = {"records": records, "rss_after_imports": rss_imports, "rss_before_steps": rss_before,
           "rss_peak_steps": peak_steps, "max_rss": max_rss_bytes()}
    if settings.profile:
        with StepProfiler() as prof:
            timer.reset()
            trainer.train_step(timer)
        out["profile"] = prof.result()
    return out


# ---------------------------------------------------------------------------- TRL


def run_trl(settings: Settings) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlreason.rewards import get_reward
    from vlreason.rollout.prompts import decode_row_images
    from vlreason.views.budget import PixelBudget

    rss_imports = RssSampler().current()
    torch.manual_seed(settings.seed)
    budget = PixelBudget(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels, factor=28)
    rows = color_rows(settings)
    # The same images at the same pixel budget as vlreason (resized once here; the
    # processor's own smart resize then leaves a budget-sized image as it is).
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": row["question"]}] for row in rows],
        "image": [budget.resize(decode_row_images(row)[0]) for row in rows],
        "answer": list(rows["answer"]),
    })
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

    total = settings.warmup + settings.steps + (1 if settings.profile else 0)
    G = settings.num_generations
    args = GRPOConfig(
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
        max_steps=total,
        logging_strategy="no",  # keeps TRL's per-step metric lists (logging clears them)
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
        log_completions=False,
    )

    class Steps(TrainerCallback):
        def __init__(self):
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
            self.trainer = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()
            vision.reset()
            images.pop()
            phase_times.clear()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            done = len(self.times)
            if self.profiler is not None:  # the extra, profiled step
                self.profiler.__exit__(None, None, None)
                self.profile = self.profiler.result()
                self.profiler = None
                self.last = now
                return
            self.times.append(now - self.last)
            self.vision.append(vision.pop())
            self.processor.append(images.pop())
            self.phases.append(dict(phase_times))
            phase_times.clear()
            # read now: TRL's log() at the end of train() clears its metric lists
            lengths = self.trainer._metrics["train"].get("completions/mean_length") or [float("nan")]
            self.lengths.append(lengths[-1])
            if done + 1 == settings.warmup + settings.steps:
                self.rss_peak_steps = sampler.stop()
                self.max_rss = max_rss_bytes()
                if settings.profile:
                    self.profiler = StepProfiler().__enter__()
            self.last = time.perf_counter()

    steps = Steps()
    trainer = GRPOTrainer(model=settings.model_path, reward_funcs=[vlreason_reward], args=args,
                          train_dataset=dataset, callbacks=[steps])
    steps.trainer = trainer

    # Phase timers around TRL's own methods (rollout: tokenise + generate + decode;
    # reference: no-grad log-prob passes; everything else is the rest of the step).
    phase_times: dict[str, float] = {}

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

    refs = [trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else []
    vision = VisionCounter([trainer.model], refs)
    images = ImageProcessorCounter(trainer.processing_class.image_processor)
    sampler = RssSampler()
    rss_before = sampler.start()
    trainer.train()
    if not steps.rss_peak_steps:
        steps.rss_peak_steps = sampler.stop()
        steps.max_rss = max_rss_bytes()

    records = []
    for i, seconds in enumerate(steps.times):
        extra = {"completion_len": steps.lengths[i]}
        records.append(step_record(seconds, steps.phases[i], steps.vision[i], steps.processor[i], extra))
    out = {"records": records, "rss_after_imports": rss_imports, "rss_before_steps": rss_before,
           "rss_peak_steps": steps.rss_peak_steps, "max_rss": steps.max_rss}
    if steps.profile is not None:
        out["profile"] = steps.profile
    return out


# ---------------------------------------------------------------------------- child / parent


def child_main(side: str, settings_json: str, result_path: str) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    settings = Settings(**json.loads(settings_json))
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as scratch:
        tempfile.tempdir = scratch  # this child's output dirs (nothing is saved) go, and are removed, here
        raw = run_vlreason(settings) if side == "vlreason" else run_trl(settings)
        tempfile.tempdir = None
    summary = summarise(raw["records"], settings.warmup)
    summary.update(
        side=side,
        max_rss_mb=raw["max_rss"] / 2**20,
        rss_after_imports_mb=raw["rss_after_imports"] / 2**20,
        rss_before_steps_mb=raw["rss_before_steps"] / 2**20,
        step_rss_mb=(raw["rss_peak_steps"] - raw["rss_before_steps"]) / 2**20,
        child_wall_s=time.perf_counter() - started,
        records=raw["records"],
    )
    if "profile" in raw:
        summary["profile"] = raw["profile"]
    Path(result_path).write_text(json.dumps(summary, indent=1, default=float))


def run_child(side: str, settings: Settings, timeout_s: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONWARNINGS": "ignore", "ACCELERATE_DISABLE_RICH": "1"}
        cmd = [sys.executable, __file__, "--child", side, "--settings", json.dumps(asdict(settings)),
               "--result", str(result)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"{side} child failed (rc {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def merge_rounds(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's summary over its rounds.

    Times: the round with the lowest median step time (its median step and phases). On a
    shared machine another process's load only ever slows a round down, so the least
    disturbed round is the best estimate; every round's median stays in ``rounds``.
    Memory: the largest of the rounds.
    """
    if len(children) == 1:
        return children[0]
    best = min(children, key=lambda child: child["step_s_median"])
    out = {k: v for k, v in best.items() if k not in ("records", "profile")}
    for key in ("max_rss_mb", "step_rss_mb", "rss_before_steps_mb", "rss_after_imports_mb"):
        out[key] = max(child[key] for child in children)
    out["step_s_median_by_round"] = [child["step_s_median"] for child in children]
    out["rounds"] = [{k: v for k, v in child.items() if k not in ("records", "profile")} for child in children]
    out["records"] = [child["records"] for child in children]
    profiles = [child["profile"] for child in children if "profile" in child]
    if profiles:
        out["profile"] = profiles[0]
    return out


def split_rounds(side: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-round child results stored in a merged entry (for --summarise)."""
    if "rounds" not in side:
        return [side]
    children = [{**summary, "records": records} for summary, records in zip(side["rounds"], side["records"])]
    if "profile" in side:
        children[0]["profile"] = side["profile"]
    return children


def build_result(settings: Settings, ours_runs: list[dict], trl_runs: list[dict], profile: str) -> dict[str, Any]:
    ours, theirs = merge_rounds(ours_runs), merge_rounds(trl_runs)
    comparison = compare(settings, ours, theirs)
    missed = any(g["met"] is False and not g.get("secondary") for g in comparison["goals"])
    if not (profile == "always" or (profile == "auto" and missed)):
        ours.pop("profile", None)
        theirs.pop("profile", None)
    return {"settings": asdict(settings), "vlreason": ours, "trl": theirs, "comparison": comparison}


def goal_line(name: str, ratio: float | None, target: float) -> dict[str, Any]:
    if ratio is None:
        return {"goal": name, "target": target, "ratio": None, "met": None, "note": "not measured"}
    met = ratio <= target
    note = (f"met: {ratio:.2f}x <= {target}x" if met
            else f"missed by {ratio / target:.2f}x ({ratio:.2f}x vs the {target}x target)")
    return {"goal": name, "target": target, "ratio": round(ratio, 3), "met": met, "note": note}


def compare(settings: Settings, ours: dict, trl: dict) -> dict[str, Any]:
    def ratio(key):
        a, b = ours.get(key), trl.get(key)
        return a / b if a and b else None

    distinct = settings.prompts_per_step  # one image per prompt
    passes = ["generation", "policy"] + (["reference"] if settings.beta > 0 else [])
    per_pass = {p: ours["vision_per_step"][p]["images"] for p in passes}
    encode_ok = all(v == distinct for v in per_pass.values())
    goals = [goal_line("step time <= 0.5x TRL", ratio("step_s_median"), GOAL_STEP_TIME)]
    if settings.size == "vocab":
        goals.append(goal_line("peak RSS <= 0.6x TRL (big vocabulary)", ratio("max_rss_mb"), GOAL_PEAK_RSS))
        goals.append({**goal_line("step memory (peak RSS above pre-step RSS) <= 0.6x TRL, big vocabulary",
                                  ratio("step_rss_mb"), GOAL_PEAK_RSS), "secondary": True})
    goals.append({"goal": "one encoding per distinct image per pass", "target": distinct, "met": encode_ok,
                  "ratio": None,
                  "note": (f"{'met' if encode_ok else 'missed'}: images encoded per pass {per_pass}, "
                           f"{distinct} distinct images per step; TRL: "
                           f"{ {p: trl['vision_per_step'][p]['images'] for p in passes} }")})
    return {
        "ratios": {
            "step_time": ratio("step_s_median"),
            "peak_rss": ratio("max_rss_mb"),
            "step_rss": ratio("step_rss_mb"),
            "images_encoded": ratio("images_encoded_per_step"),
        },
        "goals": goals,
    }


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'config':<22}{'metric':<28}{'vlreason':>12}{'TRL':>12}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        s, ours, trl, cmp_ = r["settings"], r["vlreason"], r["trl"], r["comparison"]["ratios"]
        name = f"{s['size']} beta={s['beta']:g}"
        rows = [
            ("step time, median (s)", ours["step_s_median"], trl["step_s_median"], cmp_["step_time"], ".2f"),
            ("  rollout (s)", ours["phases_s_median"].get("rollout"), trl["phases_s_median"].get("rollout"), None, ".2f"),
            ("  reference (s)", ours["phases_s_median"].get("reference"), trl["phases_s_median"].get("reference"), None, ".2f"),
            ("  rest: update, reward (s)", ours["phases_s_median"].get("rest", 0) + ours["phases_s_median"].get("reward", 0),
             trl["phases_s_median"].get("rest", 0) + trl["phases_s_median"].get("reward", 0), None, ".2f"),
            ("peak RSS (MiB)", ours["max_rss_mb"], trl["max_rss_mb"], cmp_["peak_rss"], ".0f"),
            ("  RSS after imports (MiB)", ours["rss_after_imports_mb"], trl["rss_after_imports_mb"], None, ".0f"),
            ("  RSS before steps (MiB)", ours["rss_before_steps_mb"], trl["rss_before_steps_mb"], None, ".0f"),
            ("  step memory (MiB)", ours["step_rss_mb"], trl["step_rss_mb"], cmp_["step_rss"], ".0f"),
            ("images encoded / step", ours["images_encoded_per_step"], trl["images_encoded_per_step"],
             cmp_["images_encoded"], ".0f"),
        ]
        for p in ("generation", "reference", "policy"):
            rows.append((f"  {p} pass", ours["vision_per_step"][p]["images"], trl["vision_per_step"][p]["images"], None, ".0f"))
        rows += [
            ("vision-tower calls / step", ours["vision_calls_per_step"], trl["vision_calls_per_step"], None, ".0f"),
            ("images preprocessed / step", ours["image_processor_per_step"]["images"],
             trl["image_processor_per_step"]["images"], None, ".0f"),
            ("completion length (mean)", ours["completion_len_mean"], trl["completion_len_mean"], None, ".1f"),
        ]
        for i, (metric, a, b, q, spec) in enumerate(rows):
            print(f"{name if i == 0 else '':<22}{metric:<28}{fmt(a, spec):>12}{fmt(b, spec):>12}{fmt(q):>9}")
        for g in r["comparison"]["goals"]:
            mark = "MET   " if g["met"] else ("MISSED" if g["met"] is False else "n/a   ")
            print(f"{'':<22}goal {mark} {g['goal']}: {g['note']}")
        print()


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = "not installed"
    return out


def source_tree() -> dict[str, Any]:
    """The commit measured and the files changed on top of it (read-only git calls)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=30).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted": [line[3:] for line in git("status", "--porcelain").splitlines()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0,
                        help="measured optimizer steps per side and round (0: 8 for tiny, 3 for vocab)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each side this many times (ABBA order) and keep its least disturbed round")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per side (not measured)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--betas", nargs="+", type=float, default=[0.04], help="KL coefficients (0: no reference)")
    parser.add_argument("--num-generations", "-G", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--micro-prompts", type=int, default=1, help="prompts per micro-batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (0: torch's default). 1 by default: on a shared 2-core "
                             "machine two OpenMP threads per process wait on each other and the timings "
                             "turn into noise")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="vlreason's rollout.logprob_chunk_size (0: its default)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="profile one extra step per side; auto keeps it in the JSON when a goal is missed")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--summarise", metavar="JSON",
                        help="recompute summaries, ratios and goals of a results file (no runs), write --out")
    parser.add_argument("--child", choices=["vlreason", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.settings, args.result)
        return 0
    if args.summarise:
        return summarise_file(args.summarise, args.out, args.profile)
    try:
        import trl  # noqa: F401
    except ImportError:
        print('TRL is not installed: pip install -e ".[bench]"  (or pip install "trl>=1.16,<2")', file=sys.stderr)
        return 2
    if args.prompts % args.micro_prompts:
        parser.error("--prompts must be a multiple of --micro-prompts")

    from vlreason.models.tiny import tiny_model_path

    results = []
    started = time.perf_counter()
    for size in args.sizes:
        path = str(tiny_model_path(**SIZES[size]))  # built once here, not raced by the children
        for beta in args.betas:
            settings = Settings(size=size, model_path=path, beta=beta, num_generations=args.num_generations,
                                prompts_per_step=args.prompts, micro_batch_prompts=args.micro_prompts,
                                max_new_tokens=args.max_new_tokens, lr=args.lr, warmup=args.warmup,
                                steps=args.steps or DEFAULT_STEPS[size], profile=args.profile != "never", threads=args.threads,
                                logprob_chunk_size=args.chunk_size)
            runs: dict[str, list[dict]] = {"vlreason": [], "trl": []}
            for r in range(args.rounds):  # ABBA order: drift in the machine's load hits both sides
                order = ("vlreason", "trl") if r % 2 == 0 else ("trl", "vlreason")
                for side in order:
                    print(f"[{size} beta={beta:g}] round {r + 1}/{args.rounds}: {side} ...", flush=True)
                    child = replace(settings, profile=settings.profile and r == 0)
                    runs[side].append(run_child(side, child, args.timeout))
            results.append(build_result(settings, runs["vlreason"], runs["trl"], args.profile))

    report = {
        "benchmark": "vlreason GRPO step vs TRL GRPOTrainer step (benchmarks/vs_trl.py)",
        "command": "python benchmarks/vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": versions(),
        "source_tree": source_tree(),
        "goals": {"step_time_ratio_max": GOAL_STEP_TIME, "peak_rss_ratio_max_big_vocab": GOAL_PEAK_RSS,
                  "encodings_per_distinct_image_per_pass": 1},
        "wall_s": time.perf_counter() - started,
        "results": results,
    }
    write_and_print(report, args.out)
    return 0


def write_and_print(report: dict[str, Any], out: str) -> None:
    results = report["results"]
    Path(out).write_text(json.dumps(report, indent=1, default=float))
    print()
    print_table(results)
    for r in results:
        for side in ("vlreason", "trl"):
            prof = r[side].get("profile")
            if prof:
                s = r["settings"]
                print(f"profile of one {side} step ({s['size']} beta={s['beta']:g}, {prof['profiled_step_s']:.2f} s "
                      "under the profilers), top cumulative:")
                for row in prof["cprofile_cumulative"][:12]:
                    print(f"    {row['cumulative_s']:8.3f}s  {row['function']}")
                print("  top torch ops by self CPU time:")
                for row in prof["torch_ops_self_cpu"][:8]:
                    print(f"    {row['self_cpu_s']:8.3f}s  {row['op']} x{row['calls']}")
                print(f"  allocator peak {prof['alloc_peak_mib']:.0f} MiB, ops open then: "
                      f"{' > '.join(prof['ops_open_at_alloc_peak'])}")
                print("  top allocating ops (MiB allocated, summed over calls):")
                for row in prof["torch_ops_allocating"][:6]:
                    print(f"    {row['alloc_mib']:8.1f}  {row['op']} {row['input_shapes']} x{row['calls']}")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


def summarise_file(path: str, out: str, profile: str) -> int:
    """Recompute the merged summaries, ratios and goals of a results file (no new runs)."""
    report = json.loads(Path(path).read_text())
    report["results"] = [
        build_result(Settings(**r["settings"]), split_rounds(r["vlreason"]), split_rounds(r["trl"]), profile)
        for r in report["results"]
    ]
    write_and_print(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

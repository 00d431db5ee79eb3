"""What both sides of ``benchmarks/vs_trl.py`` share: the settings, the demo rows, and the
measuring (RSS sampler, vision-tower and image-processor counters, one-step profiler, per-step
records and their summary); and the training loop's recipe interface over ``GRPOPhases`` that
``vs_trl.py``'s vlreason side and ``gpu_bench.py`` drive ``Trainer.train_step`` with.

Imported by the benchmark scripts as a sibling module (``python benchmarks/X.py`` puts
``benchmarks/`` first on ``sys.path``); the standard library only at import time.
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any


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
    trl_mode: str = "fair"  # TRL's side: "fair" (trl_side.apply_fair_patch) or "unpatched" (as installed)


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


class SideProbes:
    """What one side's steps are measured with: its vision-tower and image-processor counters
    and an RSS sampler (``sampler.start()`` before the first step)."""

    def __init__(self, policy_models: list, reference_models: list, image_processor):
        self.vision = VisionCounter(policy_models, reference_models)
        self.images = ImageProcessorCounter(image_processor)
        self.sampler = RssSampler()

    def clear(self) -> None:
        """Forget what was counted so far (before a step)."""
        self.vision.reset()
        self.images.pop()

    def record(self, seconds: float, phases: dict[str, float], extra: dict) -> dict:
        """The step just timed, with what it encoded and preprocessed (the counters restart)."""
        return step_record(seconds, phases, self.vision.pop(), self.images.pop(), extra)


def side_result(records: list[dict], rss_after_imports: int, rss_before_steps: int, rss_peak_steps: int,
                max_rss: int, profile: dict | None) -> dict[str, Any]:
    """What a side's child hands back (``vs_trl.child_main`` summarises it)."""
    out = {"records": records, "rss_after_imports": rss_after_imports, "rss_before_steps": rss_before_steps,
           "rss_peak_steps": rss_peak_steps, "max_rss": max_rss}
    if profile is not None:
        out["profile"] = profile
    return out


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


# ---------------------------------------------------------------------------- the model sizes

# TinySpec overrides per size (``vlreason.models.tiny``; its defaults are ``tiny``'s:
# vocabulary 1,024, hidden 64, 2 layers, vision hidden 32 x depth 2).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "vocab": {"vocab_size": 151_936},  # tiny with the real Qwen vocabulary: the output layer is nearly all
    # the representative one: the real vocabulary, but decoder layers that outweigh the output layer in the
    # update pass (see flop_split; MLP 4,864 as in Qwen2.5-0.5B, GQA 8 / 2 heads) and a 4-block vision tower
    "mid": {"vocab_size": 151_936, "text_hidden": 512, "text_layers": 8, "text_heads": 8, "text_kv_heads": 2,
            "text_mlp": 4864, "vision_hidden": 128, "vision_depth": 4, "vision_heads": 4, "vision_mlp": 512},
}
DEFAULT_STEPS = {"tiny": 8, "vocab": 3, "mid": 1}  # measured steps per side (after the warm-up)


def size_spec(size: str):
    """The ``TinySpec`` of a benchmark size (the checkpoint is built by ``tiny_model_path(spec)``)."""
    from vlreason.models.tiny import TinySpec

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; have: {', '.join(SIZES)}")
    return TinySpec(**SIZES[size])


def flop_split(model, prompt_tokens: int, completion_tokens: int, patches_per_image: int) -> dict[str, Any]:
    """Where one completion row's update FLOPs go (``flops.update_flops``: decoder layers and
    attention over prompt + completion, the output layer over the completion only, the vision
    tower over the image's patches), and one decode token's (layers vs output layer)."""
    from flops import shapes_from_model, update_flops

    text, vision = shapes_from_model(model)
    parts = update_flops(text, vision, [prompt_tokens], [completion_tokens],
                         [patches_per_image] if patches_per_image else [])
    layers = parts["text_layers"] + parts["text_attention"]
    decode_layers, decode_head = 2.0 * text.layer_params, 2.0 * text.hidden * text.vocab
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "patches_per_image": patches_per_image,
        "update_flops_per_row": parts,
        "update_share": {"text_layers_and_attention": layers / parts["total"],
                         "output_layer": parts["output_layer"] / parts["total"],
                         "vision": (parts["total"] - layers - parts["output_layer"]) / parts["total"]},
        "decode_token_flops": {"text_layers": decode_layers, "output_layer": decode_head,
                               "output_layer_share": decode_head / (decode_layers + decode_head)},
    }


# ---------------------------------------------------------------------------- the data


def color_rows(settings: Settings):
    """The demo train split's rows of ``settings.source`` (a ``datasets.Dataset``)."""
    from vlreason.data.schema import load_canonical
    from vlreason.paths import demo_data

    data = load_canonical(demo_data("train"))
    keep = [i for i, source in enumerate(data["source"]) if source == settings.source]
    return data.select(keep)


# ---------------------------------------------------------------------------- the loop


def __getattr__(name: str):
    """``PhasesRecipe`` is defined on first use (``from bench_common import PhasesRecipe``):
    it subclasses vlreason's ``Recipe``, which imports torch, and everything else here stays
    standard-library only at import time (``vs_trl.py``'s parent process never needs it)."""
    if name == "PhasesRecipe":
        globals()[name] = cls = _phases_recipe_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _phases_recipe_class() -> type:
    from vlreason.recipe_base import Recipe

    class PhasesRecipe(Recipe):
        """The loop's recipe interface over ``GRPOPhases``, as recipes/grpo.py wires it, minus
        the data position (nothing is checkpointed: ``Recipe``'s defaults) and minus
        ``policy`` (the loop then plans for float32 compute, as the benchmarks always have)."""

        def __init__(self, phases, model):
            self.phases = phases
            self.model = model

        def prepare(self, step, timer):
            return self.phases.prepare(step, timer)

        def step(self, micro_batch):
            return self.phases.loss(micro_batch)

    return PhasesRecipe

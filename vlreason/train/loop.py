"""The one training loop every recipe runs (nanochat-style: read it top to bottom).

A recipe hands the loop an object with four methods:

* ``prepare(step, timer) -> (micro_batches, metrics)``: everything without gradients
  for this optimizer step (rollout, rewards, reference, teacher), timed by phase;
* ``step(micro_batch) -> (loss, metrics)``: the loss of one micro-batch, already
  scaled so that the micro-batch losses of a step add up to the step's loss;
* ``state_dict()`` / ``load_state_dict(state)``: data position and recipe state (stage,
  counters), stored in every checkpoint;
* ``after_update(step) -> dict | None``: anything after the optimizer step (e.g. an EMA
  teacher, a stage-end evaluation); metrics it returns join the step's metrics line;
* optionally ``before_training() -> dict | None``: run once before the first step of a
  fresh run (not on resume), e.g. a held-out evaluation; its metrics are logged as step 0;
* optionally ``save_extra(dir)`` / ``load_extra(dir)``: tensors of the recipe's own (an
  EMA teacher) written into and read from the checkpoint directory itself, so they are
  atomic and pruned with it.

The loop owns the optimizer and schedule, the engine the model runs on
(``parallel.strategy``: one process, DDP or FSDP2, see ``train/parallel.py``), mixed
precision (fp32 master weights, forward/backward in ``model.dtype``), gradient
clipping, NaN-step skipping, metrics, checkpoints (every ``save_steps``, on
SIGINT/SIGTERM, at the end) and exact resume.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from vlreason.config import doc, to_dict
from vlreason.outputs import OutputPathError
from vlreason.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, write_final
from vlreason.train.disk import MetricsWriteError, RunWriteError, check_run_dir
from vlreason.train.distributed import all_agree, reduce_metrics, world
from vlreason.train.memory import format_plan, log_memory_plan
from vlreason.train.metrics import (
    METRICS_FILE,
    MetricsLogger,
    StepTimer,
    format_postfix,
    progress_bar,
)
from vlreason.train.parallel import (
    ParallelConfig,
    aligned_micro_batches,
    barrier,
    build_engine,
    grad_norm_and_clip,
    resolve_strategy,
)
from vlreason.train.schedule import build_optimizer, build_scheduler
from vlreason.train.signals import GracefulStop
from vlreason.train.weights import copy_tensors_

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = doc("Peak learning rate (AdamW).", 1e-5)
    weight_decay: float = doc("AdamW weight decay (not on biases and norms).", 0.0)
    betas: list[float] = doc("AdamW betas.", [0.9, 0.999])
    warmup_steps: int = doc("Linear warm-up steps.", 0)
    schedule: str = doc("cosine | constant (after warm-up).", "constant")
    min_lr_ratio: float = doc("Cosine floor as a fraction of lr.", 0.0)
    max_grad_norm: float = doc("Gradient clipping norm (0 disables).", 1.0)

    def validate(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got '{self.schedule}'")
        if self.lr <= 0:
            raise ValueError("optim.lr must be positive")


@dataclass
class LoopConfig:
    output_dir: str = doc("Run directory (config, metrics, checkpoints, final model).", "runs/run")
    seed: int = doc("Seed of data order, sampling and initialisation.", 0)
    max_steps: int = doc("Optimizer steps to run.", 10)
    save_steps: int = doc("Checkpoint every N steps (0: only on stop and at the end).", 0)
    keep_last: int = doc("Checkpoints to keep (0 keeps all).", 2)
    resume: str = doc("'' (fresh), 'auto' (latest checkpoint in output_dir) or a checkpoint dir.", "")
    overwrite: bool = doc("Delete an existing output_dir before a fresh run (otherwise a fresh run "
                          "into a directory with checkpoints is refused).", False)
    max_nan_steps: int = doc("Stop after this many skipped non-finite steps.", 5)
    trackers: list[str] = doc("Metric sinks: jsonl, tensorboard, wandb.", ["jsonl", "tensorboard"])
    progress: bool = doc("Show a progress bar.", True)
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and schedule."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig,
                                     metadata={"help": "How the model runs over processes (none, DDP, FSDP2)."})


class RecipeHooks(Protocol):
    """What the loop calls on a recipe (``vlreason.recipe_base.Recipe`` is the base that
    implements it with defaults; a recipe need not subclass it)."""

    model: torch.nn.Module

    def prepare(self, step: int, timer: StepTimer) -> tuple[list[Any], dict[str, Any]]: ...

    def step(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def after_update(self, step: int) -> dict[str, Any] | None: ...


class TrainingStopped(RuntimeError):
    """Training stopped early (too many non-finite steps); a checkpoint was written."""


def mean_metrics(metric_list: list[dict[str, Any]]) -> dict[str, float]:
    """Average the scalar metrics of the micro-batches of a step."""
    out: dict[str, list[float]] = {}
    for metrics in metric_list:
        for key, value in metrics.items():
            value = float(value.detach()) if isinstance(value, torch.Tensor) else value
            if isinstance(value, (int, float)):
                out.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in out.items()}


class Trainer:
    def __init__(self, cfg: LoopConfig, recipe: RecipeHooks, *, full_config: Any = None, save_final=None,
                 lr_lambda: Callable[[int], float] | None = None):
        """``lr_lambda(step)`` replaces the warm-up + cosine/constant schedule of
        ``cfg.optim`` (a multiplier of ``cfg.optim.lr`` as a function of the global step),
        for recipes whose phases need their own rates. ``save_final(dir)`` writes
        ``final/``; it runs on every process (sharded weights are gathered) and process 0
        writes (``Policy.save_pretrained`` does both)."""
        self.cfg = cfg
        self.recipe = recipe
        self.full_config = full_config
        self.save_final = save_final
        self.run_dir = Path(cfg.output_dir)
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        if not any(p.requires_grad for p in recipe.model.parameters()):
            raise ValueError("the model has no trainable parameters (check freezing / LoRA settings)")
        self.setup_engine()
        self.params = [p for p in recipe.model.parameters() if p.requires_grad]
        named = [(n, p) for n, p in recipe.model.named_parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = build_optimizer(named, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        if lr_lambda is not None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        else:
            self.scheduler = build_scheduler(
                self.optimizer, warmup_steps=o.warmup_steps, total_steps=cfg.max_steps,
                kind=o.schedule, min_lr_ratio=o.min_lr_ratio,
            )
        self.step = 0
        self.nan_steps = 0

    def setup_engine(self) -> None:
        """Plan the memory, then wrap the model (and a frozen reference copy) on the
        engine ``parallel.strategy`` names; before the optimizer exists (FSDP2 turns the
        parameters into shards)."""
        policy = getattr(self.recipe, "policy", None)
        self.compute_dtype = policy.compute_dtype if policy is not None else torch.float32
        par = self.cfg.parallel
        self.strategy = resolve_strategy(par.strategy, self.world_size)
        if self.is_main:  # the same on every process
            plan = log_memory_plan(
                self.recipe.model, strategy=self.strategy, world_size=self.world_size,
                compute_dtype=self.compute_dtype, reference=getattr(policy, "reference", None),
                cpu_offload=par.cpu_offload, reshard_after_forward=par.reshard_after_forward,
                device=next(self.recipe.model.parameters()).device)
            print(format_plan(plan), flush=True)
        family = getattr(policy, "family", None)
        self.engine = build_engine(par, self.recipe.model, family, compute_dtype=self.compute_dtype)
        if self.strategy == "fsdp2" and getattr(policy, "reference", None) is not None:
            policy.reference_run = build_engine(par, policy.reference, family, compute_dtype=self.compute_dtype).forward
        if self.is_main and self.strategy != "none":
            print(f"parallel: {self.strategy} on {self.world_size} processes", flush=True)

    # ---- checkpoints -------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.recipe.model.named_parameters() if p.requires_grad}

    def save(self) -> Path:
        """A sharded checkpoint (every process writes its shard; see train/checkpoint.py)."""
        return save_checkpoint(
            self.run_dir, self.step,
            model=self.recipe.model, optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state={"nan_steps": self.nan_steps, "recipe": self.recipe.state_dict()},
            config=to_dict(self.full_config) if self.full_config is not None else None,
            keep_last=self.cfg.keep_last or None,
            extra=getattr(self.recipe, "save_extra", None),
        )

    def maybe_resume(self) -> None:
        path = resolve_resume(self.run_dir, self.cfg.resume or None)
        if path is None:
            return
        model_state, state = load_checkpoint(path, model=self.recipe.model, optimizer=self.optimizer,
                                             scheduler=self.scheduler)
        if model_state:  # a plain (pre-DCP) checkpoint: copy the tensors in
            self.load_plain(path, model_state)
        self.step = int(state["step"])
        self.nan_steps = int(state.get("nan_steps", 0))
        self.recipe.load_state_dict(state.get("recipe", {}))
        if hasattr(self.recipe, "load_extra"):
            self.recipe.load_extra(path)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def load_plain(self, path: Path, model_state: dict[str, torch.Tensor]) -> None:
        copy_tensors_(self.recipe.model.named_parameters(), model_state, source=f"checkpoint {path}",
                      required=self.trainable_state())

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> Path:
        self.check_disk()  # creates run_dir; a one-line error when it cannot hold a checkpoint
        self.maybe_resume()
        metrics_log = MetricsLogger(
            self.run_dir, trackers=self.cfg.trackers, is_main_process=self.is_main,
            config=to_dict(self.full_config) if self.full_config is not None else None,
            resume_step=self.step,
        )
        bar = progress_bar(self.cfg.max_steps, initial=self.step,
                           disable=not (self.cfg.progress and self.is_main and sys.stderr.isatty()))
        timer = StepTimer(synchronize=torch.cuda.is_available())
        model = self.recipe.model
        model.train()
        if self.step == 0 and hasattr(self.recipe, "before_training"):
            before = self.rollout_pass(self.recipe.before_training)
            if before:
                self.log_metrics(metrics_log, 0, before)
        stopped_by_signal = False
        first_step = self.step
        try:
            with GracefulStop() as stop, self.checkpoint_on_error():
                while self.step < self.cfg.max_steps:
                    timer.reset()
                    metrics = self.train_step(timer)
                    if self.step == first_step + 1 and self.strategy != "none":  # optimizer state exists now
                        print(self.engine.shard_report(self.optimizer), flush=True)
                    self.log_metrics(metrics_log, self.step, metrics)
                    bar.update(1)
                    bar.set_postfix_str(format_postfix(metrics))
                    if self.is_main and bar.disable and self.should_print():
                        print(f"step {self.step}/{self.cfg.max_steps} {format_postfix(metrics)}", flush=True)
                    if self.nan_steps >= self.cfg.max_nan_steps:
                        self.save()
                        raise TrainingStopped(
                            f"{self.nan_steps} steps had a non-finite loss or gradient (max_nan_steps="
                            f"{self.cfg.max_nan_steps}); stopped after saving a checkpoint at step {self.step}"
                        )
                    if stop.should_stop:
                        stopped_by_signal = True
                        break
                    if self.cfg.save_steps and self.step % self.cfg.save_steps == 0:
                        self.save()
        finally:
            bar.close()
            metrics_log.close()
        path = self.save()
        if stopped_by_signal:
            if self.is_main:
                print(f"stopped by signal at step {self.step}; resume with resume=auto "
                      f"(checkpoint: {path})", flush=True)
            return path
        final = self.run_dir / "final"
        if self.save_final is not None:  # on every process: sharded weights are gathered
            final = write_final(self.run_dir, self.save_final, checkpoint=path)  # atomic; disk full: FinalWriteError
        barrier()
        return final

    def log_metrics(self, metrics_log: MetricsLogger, step: int, metrics: dict[str, Any]) -> None:
        """Process 0 writes the step's line; with several processes all of them learn
        whether it was written, so a full disk stops every process at once (the others
        would otherwise wait in their next collective until the launcher ends them)."""
        error = None
        try:
            metrics_log.log(step, metrics)
        except RunWriteError as err:
            error = err
        if self.world_size > 1 and not all_agree(error is None):
            raise error or MetricsWriteError(
                f"process 0 could not append step {step} to {self.run_dir / METRICS_FILE}; see its error")
        if error is not None:
            raise error

    def check_disk(self) -> None:
        """Before the first step: the run directory and its checkpoints/ folder are
        writable and have room for one checkpoint (train/disk.py). Every process checks
        (each may write to a disk of its own) and all stop together."""
        error = None
        try:
            check_run_dir(self.run_dir, self.recipe.model, self.optimizer)
        except OutputPathError as err:
            error = err
        if not all_agree(error is None):
            raise error or OutputPathError(f"another process cannot write a checkpoint into {self.run_dir}")

    @contextlib.contextmanager
    def checkpoint_on_error(self):
        """An unexpected error mid-run still leaves a checkpoint of the last finished step.

        Single-process only: with several processes the others may not reach the save's
        barrier, so there the periodic and signal checkpoints are what remains."""
        try:
            yield
        except (TrainingStopped, RunWriteError):  # disk full: no save is tried (train/disk.py)
            raise
        except Exception:
            if self.step > 0 and self.world_size == 1:
                path = self.save()
                log.error("training failed at step %d; last finished step saved to %s", self.step + 1, path)
            raise

    def autocast(self) -> contextlib.AbstractContextManager:
        """Compute in ``model.dtype`` over fp32 master weights: autocast (CPU or CUDA) for
        one process and DDP; FSDP2 casts through its MixedPrecisionPolicy instead."""
        if self.compute_dtype == torch.float32 or self.strategy == "fsdp2":
            return contextlib.nullcontext()
        device = next(self.recipe.model.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def rollout_pass(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` as the rollout runs: in the compute dtype, parameters gathered once
        (FSDP2). For a recipe's no-gradient passes outside ``prepare`` (evaluations)."""
        with self.autocast():
            return self.engine.gathered(fn)

    def train_step(self, timer: StepTimer) -> dict[str, Any]:
        # rollout, rewards, reference: parameters gathered once (FSDP2)
        micro_batches, metrics = self.rollout_pass(lambda: self.recipe.prepare(self.step, timer))
        rollout_engine = getattr(getattr(self.recipe, "policy", None), "engine", None)
        if rollout_engine is not None:
            rollout_engine.sleep()  # its memory is the update's until the next sample
        step_metrics = []
        finite = True
        with timer("update"):
            pairs = aligned_micro_batches(micro_batches)  # the same count on every process
            for i, (micro, weight) in enumerate(pairs):
                with self.autocast():  # the engine reduces gradients on the last one
                    loss, m = self.engine.forward(functools.partial(self.recipe.step, micro), sync=i == len(pairs) - 1)
                finite = finite and bool(torch.isfinite(loss.detach()))
                (loss * weight).backward()  # a non-finite loss still backpropagates: collectives stay aligned
                if weight:
                    step_metrics.append({"loss": loss.detach(), **m})
            grad_norm = grad_norm_and_clip(self.params, self.cfg.optim.max_grad_norm)
            finite = all_agree(finite and math.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
                if rollout_engine is not None:
                    rollout_engine.sync_weights()  # the next rollout samples the updated policy
            else:
                self.nan_steps += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d so far)",
                            self.step + 1, self.nan_steps)
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()  # the schedule follows the global step, skipped steps included
        extra = (self.recipe.after_update(self.step) if finite else None) or {}
        self.step += 1
        out = {**metrics, **mean_metrics(step_metrics), **extra}
        out["loss"] = sum(float(m["loss"]) for m in step_metrics) if step_metrics else float("nan")
        out = reduce_metrics(out, "mean")  # each process saw its share of the batch
        out.update(grad_norm=grad_norm, lr=lr, skipped_steps=self.nan_steps)
        out.update(timer.pop())
        return out

    def should_print(self) -> bool:
        """Without a progress bar (no TTY), print a plain line on a few steps."""
        return self.step in (1, self.cfg.max_steps) or self.step % 10 == 0

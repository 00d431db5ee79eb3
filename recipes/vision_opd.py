"""Vision-OPD (arXiv 2605.18740): crop-teacher on-policy self-distillation.

    vlreason train vision_opd [--config FILE] [key=value ...]
    python recipes/vision_opd.py [--config FILE] [key=value ...]

Two copies of one model. The student (the trained policy) sees the full image and
samples G completions per prompt; the teacher (a separate copy, no gradients, EMA of
the student after every optimizer step) sees an evidence-centred crop of the row's
``boxes[0]`` (the row's ``teacher_images[0]`` written by data_pipelines/opd_crops.py,
else vlreason.views.crop_to_box at run time: ``teacher.margin``, enlarged
``teacher.upscale`` x; under the teacher's own pixel budget), with the same text. On every completion
token the student's top-k log-probs (with gradient) and the teacher's log-probs at the
SAME ids, each plus a tail bucket, are compared by the generalised JSD (alpha 0.5);
tokens are weighted by the detached ``min(exp(logp - logp_old), 2)`` and the loss is the
token mean over the whole step (the global-count normalisation of GRPOPhases). No
reward, advantage or reference KL. The maths is ``vlreason.algorithms.vision_opd_loss``
(the loss) and ``vlreason.algorithms.opd`` (the step's diagnostics, the EMA teacher step).

One rollout (every ``algorithm.updates_per_rollout`` steps; K = 1 by default):

1. draw ``prompts_per_step`` x ``algorithm.mini_batches`` rows, build the
   student prompts (full image, optionally with the box drawn in red) and the teacher
   prompts (the row's ``teacher_images[0]`` when present, else the crop of ``boxes[0]``;
   under the teacher's own pixel budget: vlreason.views.teacher), sample G completions
   at the rollout temperature (1.0), cut into M mini-batches of micro-batches.

One step (optimizer update u of the rollout, on mini-batch u mod M), per micro-batch:

2. one student forward with gradient: its top-k ids at every completion token and its
   log-probs at those ids (``token_outputs(topk=..., at_topk=True)``);
3. the teacher (no gradients, ``time/teacher``): its log-probs at the same ids on the
   teacher prompts (the completions are re-scored under the other prompts by swapping
   the batch's ``prompts``: same rows, same order, so ``group_ids_N`` still points at
   the right prompt);
4. the loss and, from the same per-token divergence, the step's ``jsd`` / ``agreement``
   sums (``vlreason.algorithms.opd.opd_loss_and_sums``: the divergence is computed once);
5. after the optimizer step: theta_T <- (1 - teacher.ema) theta_T + teacher.ema theta_S
   over the trainable tensors (the frozen ones are equal in both copies), accumulated
   in an fp32 shadow; the teacher's forward copy (in the compute dtype, e.g. bf16) is
   refreshed from it (``vlreason.algorithms.opd.ema_teacher_step_``).

Logged every step: ``loss``, ``jsd`` (token mean over the step, at the weights before
the update), ``agreement`` (fraction of tokens where the teacher's argmax among the
student's top-k is the student's top-1), ``weight_mean``, ``student_tail_mass``,
``teacher_tail_mass``, ``completion_len``, ``completion_len_max``, ``truncated_frac``,
``student_image_tokens``, ``teacher_image_tokens``, ``data/skipped_rows``,
``data/no_box_rows``, ``teacher/distance`` (L2 distance teacher - student over the
trainable tensors, after the EMA), ``time/rollout``, ``time/teacher`` (inside
``time/update``), ``time/update``; with K > 1 also ``rollout/update``,
``rollout/mini_batch``, ``rollout/reused``.

Choices made here (see docs/vision_opd.md):

* **Importance weight.** ``logp_old`` is fixed at the rollout's weights, taken once
  before the first update (mini-batch 0's from update 0's own forward, the others' by
  one no-gradient pass), by the same code as GRPO's (vlreason.train.reuse). With K = 1
  the weight is exactly 1; from the second update on it is
  min(exp(logp - logp_old), ratio_cap). The rollout is not stored in checkpoints: a
  resume inside a rollout's K updates samples a new one (logged); save_steps a multiple
  of K keeps resume exact.
* **Top-k ids** come from the student forward of the update itself (the current
  student, at every update) and the teacher is scored at them at its current (EMA)
  weights; ``algorithm.topk`` is clamped to the vocabulary size.
* **Rows without a box.** ``teacher.no_box=skip`` (default) drops such a row from the
  step and counts it in ``data/no_box_rows`` and ``data/skipped_rows`` (with a
  warning, never silently); ``teacher.no_box=full`` lets the teacher see the full
  image instead (no privileged view: such rows then pull only towards the EMA teacher).
  Rows whose box or prompt cannot be used are skipped the same way.
* **EMA precision.** The teacher's forward runs in the compute dtype (its parameters
  are cast to ``model.dtype``: bf16 on CUDA by default; no master copy, it has no
  optimizer), but its EMA is accumulated in an fp32 shadow of the trainable tensors:
  an increment of 0.05 x a learning-rate-sized move is below bf16's rounding step and
  an EMA kept in bf16 would not move (tests/algorithms/test_ema.py). Where the teacher
  is fp32 its parameters are their own shadow (no extra memory); otherwise the shadow
  costs 4 bytes per trainable parameter (docs/scaling.md).
* **Checkpoints and the teacher.** The EMA teacher is state: through the loop's
  ``save_extra`` / ``load_extra`` hooks its fp32 shadow is written as
  ``checkpoints/step-N/teacher.safetensors`` inside the checkpoint (atomic and pruned
  with it) and reloaded on resume, so resume is exact, teacher included. ``final/``
  holds the student only.
* **Embedded default.** The warm tiny checkpoint (assets/warm-tiny, the tiny model
  after SFT on the demo data) on the 24 ``synthetic/fine_detail`` rows of the bundled
  demo data (an 8-px coloured mark in a 224-px cluttered image, shrunk to about 4 px at
  the 112x112 budget; the teacher's 2x crop shows it at about 16 px). ``data.sources``
  selects rows by ``source`` (empty: every row of ``data.train``; with the demo data:
  the fine-detail rows).
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlreason.algorithms import (
    AGGREGATIONS,
    DIVERGENCES,
    aggregate_sum_and_count,
    copy_to_,
    fp32_shadow,
)
from vlreason.algorithms.opd import ema_teacher_step_, opd_loss_and_sums, token_means
from vlreason.config import doc
from vlreason.data.images import decode_image
from vlreason.data.stream import RowStream
from vlreason.models.loading import resolve_dtype
from vlreason.recipe_base import DataConfig, Recipe, RunConfig, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.forward import token_outputs
from vlreason.rollout.policy import RolloutConfig
from vlreason.rollout.prompts import build_prompt_batch, decode_row_images
from vlreason.train.distributed import global_sum, hash_seed, world
from vlreason.train.loop import OptimConfig, Trainer
from vlreason.train.metrics import StepTimer
from vlreason.train.reuse import ReuseConfig, Rollout, RolloutReuse, capture_old_logprobs
from vlreason.train.rows import RowGate, SkippedRows, none_usable
from vlreason.train.weights import load_tensors_into_
from vlreason.views.teacher import opd_views, teacher_budget

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.safetensors"  # inside checkpoints/step-N/: the EMA teacher of that step
DEMO_SOURCES = ["synthetic/fine_detail"]


@dataclass
class OPDDataConfig(DataConfig):
    sources: list[str] = doc(
        "Train only on rows whose `source` is listed; empty: every row of data.train "
        "(with the bundled demo data: its synthetic/fine_detail rows).", [])


@dataclass
class TeacherConfig:
    ema: float = doc("EMA rate: after every optimizer step theta_T <- (1 - ema) theta_T + ema theta_S "
                     "(paper 0.05); 0 keeps the teacher frozen at the starting weights.", 0.05)
    view: str = doc("crop: the evidence-centred crop of boxes[0] (the paper) | full: the student's own "
                    "image (ablation; at step 1, teacher == student, the loss is then 0).", "crop")
    margin: float = doc("Context around the box on each side, as a fraction of its width/height.", 0.1)
    upscale: float = doc("The crop is enlarged by this factor (paper: 2) before the pixel budget.", 2.0)
    min_size: int = doc("Smallest crop side in original pixels (tiny boxes grow to this).", 28)
    no_box: str = doc("Rows without boxes (and without teacher_images): skip (counted in "
                      "data/no_box_rows) | full (the teacher sees the full image).", "skip")
    min_pixels: int = doc("The teacher view's own pixel budget minimum; 0: rollout.min_pixels.", 0)
    max_pixels: int = doc("The teacher view's own pixel budget maximum; 0: rollout.max_pixels x upscale^2, "
                          "so that the student's budget does not undo the crop's enlargement.", 0)

    def validate(self) -> None:
        if not 0.0 <= self.ema <= 1.0:
            raise ValueError(f"teacher.ema must lie in [0, 1], got {self.ema}")
        if self.view not in ("crop", "full"):
            raise ValueError(f"teacher.view must be crop or full, got '{self.view}'")
        if self.no_box not in ("skip", "full"):
            raise ValueError(f"teacher.no_box must be skip or full, got '{self.no_box}'")
        if self.margin < 0 or self.upscale <= 0 or self.min_size < 1:
            raise ValueError("teacher.margin must be >= 0, teacher.upscale > 0, teacher.min_size >= 1")
        if self.min_pixels < 0 or self.max_pixels < 0:
            raise ValueError("teacher.min_pixels and teacher.max_pixels must be >= 0 (0: derived from rollout)")


@dataclass
class OPDConfig(ReuseConfig):
    micro_batch_prompts: int = doc("Prompts (x G completions) per forward/backward micro-batch.", 2)
    topk: int = doc("Student top-k token ids compared per position (paper 100); clamped to the vocabulary.", 100)
    divergence: str = doc("jsd (paper) | forward_kl | reverse_kl, on the (k+1)-way top-k + tail distributions.", "jsd")
    alpha: float = doc("Generalised JSD weight: M = (1-alpha) pS + alpha pT (paper 0.5).", 0.5)
    ratio_cap: float = doc("Token weight min(exp(logp - logp_old), ratio_cap), detached (paper 2).", 2.0)
    min_tail_prob: float = doc("Floor of the tail bucket's probability (keeps its log finite).", 1e-6)
    aggregation: str = doc("token-mean (paper) | seq-mean-token-mean | seq-mean-token-sum-norm.", "token-mean")
    draw_box: bool = doc("Draw boxes[0] on the student's full image (the official data does).", False)
    box_color: str = doc("Colour of the drawn box.", "red")

    def validate(self) -> None:
        if self.micro_batch_prompts < 1:
            raise ValueError("algorithm.micro_batch_prompts must be >= 1")
        if self.topk < 1:
            raise ValueError("algorithm.topk must be >= 1")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"algorithm.divergence must be one of {list(DIVERGENCES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"algorithm.alpha must lie in [0, 1], got {self.alpha}")
        if self.ratio_cap <= 0:
            raise ValueError("algorithm.ratio_cap must be positive")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"algorithm.aggregation must be one of {list(AGGREGATIONS)}")
        self.validate_reuse()


@dataclass
class VisionOPDRecipeConfig(RunConfig):
    # shared keys (help in RunConfig), restated with this recipe's defaults
    output_dir: str = "runs/vision_opd"
    max_steps: int = 12
    save_steps: int = 0
    data: OPDDataConfig = field(default_factory=OPDDataConfig, metadata={"help": "Datasets (rows with boxes)."})
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=4, max_new_tokens=48, temperature=1.0),
        metadata={"help": "Sampling and the student's images (the teacher's budget: teacher.*_pixels)."},
    )
    prompts_per_step: int = doc("Prompts per optimizer step, over all processes (paper 96).", 4)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    # Vision-OPD's own
    algorithm: OPDConfig = field(default_factory=OPDConfig, metadata={"help": "Distillation loss and batch."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The crop teacher."})


@register_recipe("vision_opd")
class VisionOPDRecipe(SkippedRows, Recipe):
    config_class = VisionOPDRecipeConfig

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.start_policy()
        # The teacher: a separate copy of the starting weights (LoRA adapter included), no gradients.
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.teacher_shadow = self.make_teacher_shadow()
        vocab = self.policy.family.lm_head(self.model).weight.shape[0]
        self.topk = min(cfg.algorithm.topk, vocab)
        self.stream = RowStream(self.load_train(), seed=cfg.seed)
        self.run_dir = Path(cfg.output_dir)
        self.rows = RowGate(self.stream, self.policy.processor.tokenizer, check=self.has_view)
        self.no_box_rows = 0
        t = cfg.teacher
        self.teacher_budget = teacher_budget(self.policy.budget, t.upscale, t.min_pixels, t.max_pixels)
        self.reuse = RolloutReuse(cfg.algorithm.updates_per_rollout, cfg.algorithm.mini_batches)
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.timer = StepTimer()
        self.capture_old = False
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    def make_teacher_shadow(self) -> dict[str, torch.Tensor]:
        """Cast the teacher's parameters to the compute dtype (``model.dtype``; it has no
        optimizer, so no master copy) and return the fp32 shadow its EMA accumulates in,
        one tensor per trainable name (an fp32 parameter is its own shadow)."""
        device = next(self.teacher.parameters()).device
        dtype = resolve_dtype(self.cfg.model.dtype, device)
        with torch.no_grad():
            for p in self.teacher.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        student = dict(self.model.named_parameters())
        params = dict(self.teacher.named_parameters())
        shadow = {}
        for name in self.trainable:
            if params[name].dtype == torch.float32:
                shadow[name] = fp32_shadow([params[name]])[0]  # the parameter itself
            else:  # from the student's (possibly fp32 master) weights, not from the rounded copy
                start = full_tensor(student[name].detach())
                shadow[name] = start.to(params[name].device, torch.float32, copy=True)
        return shadow

    def load_train(self):
        cfg = self.cfg
        dataset = load_split(cfg.data.train, "train")
        sources = cfg.data.sources or ([] if cfg.data.train else DEMO_SOURCES)
        if sources:
            keep = [i for i, s in enumerate(dataset["source"]) if s in set(sources)]
            if not keep:
                raise ValueError(f"no training rows have a source in data.sources={sources}")
            dataset = dataset.select(keep, keep_in_memory=True)
        return dataset

    def cleanup(self) -> None:
        self.policy = self.model = self.teacher = self.trainer = None

    # ---- views -----------------------------------------------------------------------------
    def has_view(self, row: dict[str, Any]) -> None:
        """The row gate's check: with teacher.no_box=skip a row needs boxes or a teacher
        image (counted in ``data/no_box_rows`` too)."""
        if not (row.get("boxes") or row.get("teacher_images")) and self.cfg.teacher.no_box == "skip":
            self.no_box_rows += 1
            raise ValueError("no boxes for the teacher's crop (teacher.no_box=skip)")

    def views(self, row: dict[str, Any], images: list | None = None) -> tuple[list, list]:
        """(student images, teacher images) of one row (vlreason.views.teacher.opd_views),
        from its decoded ``images`` (default: decoded here); a ValueError for an unusable row."""
        t, a = self.cfg.teacher, self.cfg.algorithm
        teacher_images = [decode_image(data) for data in (row.get("teacher_images") or [])[:1]]
        return opd_views(images if images is not None else decode_row_images(row), row.get("boxes") or [], teacher_images, view=t.view,
                         margin=t.margin, upscale=t.upscale, min_size=t.min_size, draw=a.draw_box,
                         color=a.box_color, student_budget=self.policy.budget)

    def next_prompts(self, step: int, count: int | None = None) -> tuple[PromptBatch, PromptBatch]:
        """This process's share of the next ``count`` (default ``prompts_per_step``) rows as
        (student prompts, teacher prompts), same rows in the same order; the teacher's
        with its own pixel budget. Rows go through the row gate (``self.rows``); a row whose
        views cannot be built, or whose student or teacher prompt is over the limit, is
        skipped with a warning and counted too."""
        taken = self.rows.draw(step, count or self.cfg.prompts_per_step)
        kept, pairs = [], []
        for k, (row, images) in enumerate(zip(taken.rows, taken.images, strict=True)):
            try:
                pairs.append(self.views(row, images))
                kept.append(k)
            except ValueError as err:
                self.rows.skip(step, row, str(err))
        taken = taken.subset(kept)
        taken.images = pairs  # (student images, teacher images) per row from here on
        if taken.rows:
            lengths = torch.maximum(
                self.policy.prompts(taken.rows, images=[p[0] for p in pairs]).attention_mask_PT.sum(-1),
                self.teacher_prompts(taken.rows, [p[1] for p in pairs]).attention_mask_PT.sum(-1))
            taken = self.rows.within_limit(step, taken, lengths.tolist(), self.policy.rollout.prompt.max_prompt_tokens)
        if not taken.rows:
            raise none_usable(step)
        self.prompt_index = taken.index  # each prompt's place in the step's global list: its seed
        return (self.policy.prompts(taken.rows, images=[p[0] for p in taken.images]),
                self.teacher_prompts(taken.rows, [p[1] for p in taken.images]))

    def teacher_prompts(self, rows: list[dict[str, Any]], images: list[list]) -> PromptBatch:
        """The teacher's prompts: same text, its images under its own pixel budget."""
        return build_prompt_batch(rows, self.policy.processor, self.teacher_budget, self.policy.rollout.prompt,
                                  images=images)

    # ---- the loop's recipe interface -----------------------------------------------------
    def prepare(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch], dict[str, Any]]:
        """A fresh rollout, or the next mini-batch of the current one (``updates_per_rollout``
        K, ``mini_batches`` M, as in vlreason.train.grpo)."""
        self.timer = timer
        self.sums = {}  # per micro-batch (by id: padding repeats one): the loss pass's token sums
        turn = self.reuse.next(step, lambda: self.rollout(step, timer))
        self.normaliser = turn.normaliser
        self.capture_old = turn.capture_old  # update 0 runs at the rollout weights: its forward is logp_old
        metrics = {**turn.rollout.metrics, "data/skipped_rows": self.skipped_rows,
                   "data/no_box_rows": self.no_box_rows, "data/epoch": self.stream.epoch, **turn.metrics()}
        return turn.batch, metrics

    def rollout(self, step: int, timer: StepTimer) -> Rollout:
        """Sample M x prompts_per_step prompts, cut them into M prompt-aligned mini-batches
        of micro-batches; for K > 1 and M > 1 the logp_old of mini-batches 1.. at the
        rollout weights (mini-batch 0's comes from update 0's own forward)."""
        cfg, a = self.cfg, self.cfg.algorithm
        with timer("rollout"):
            student_prompts, teacher_prompts = self.next_prompts(step, cfg.prompts_per_step * a.mini_batches)
            seeds = [hash_seed(cfg.seed, step, i) for i in self.prompt_index]  # per prompt, not per process
            batch = self.policy.sample(student_prompts, seed=seeds)
        batch.extras["teacher_prompts"] = teacher_prompts  # shared by every micro-batch (select keeps it)
        minis = cut_minis(batch, student_prompts.num_prompts, a.mini_batches, a.micro_batch_prompts)
        normalisers = [global_sum(sum((self.token_count(mb) for mb in mini), torch.zeros(()))) for mini in minis]
        capture_old_logprobs(minis, self.old_logprobs, a, timer)
        lengths = batch.completion_lengths_N.float()
        metrics = {
            "completion_len": float(lengths.mean()),
            "completion_len_max": float(lengths.max()),
            "truncated_frac": float(batch.truncated_N.float().mean()),
            "teacher_image_tokens": self.image_tokens(teacher_prompts),
            "student_image_tokens": self.image_tokens(student_prompts),
        }
        return Rollout(minis, normalisers, metrics)

    def old_logprobs(self, micro: RolloutBatch) -> torch.Tensor:
        return self.policy.token_outputs(micro, temperature=self.policy.sampling_temperature).logprobs_NT

    def token_count(self, batch: RolloutBatch) -> torch.Tensor:
        mask = batch.completion_mask_NT.float()
        return aggregate_sum_and_count(mask, mask, self.cfg.algorithm.aggregation)[1]

    @staticmethod
    def image_tokens(prompts: PromptBatch) -> float:
        """Mean image tokens per prompt (the teacher's crop and the student's full image differ)."""
        if prompts.mm_token_type_ids_PT is None:
            return 0.0
        return float((prompts.mm_token_type_ids_PT == 1).sum()) / prompts.num_prompts

    def step(self, micro_batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """One student forward (top-k ids, and the log-probs at them with gradient), the
        teacher's log-probs at those ids (no gradient), the loss and, from the same
        divergence, the step's diagnostics (logged by after_update)."""
        a = self.cfg.algorithm
        temperature = self.policy.sampling_temperature
        out = self.policy.token_outputs(micro_batch, topk=self.topk, at_topk=True, temperature=temperature)
        with torch.no_grad(), self.timer("teacher"):
            t = token_outputs(self.teacher, self.policy.family,
                              replace(micro_batch, prompts=micro_batch.extras["teacher_prompts"]),
                              chunk_size=self.policy.rollout.logprob_chunk_size, at_ids_NTK=out.topk_ids_NTK,
                              temperature=temperature)
        device = out.logprobs_NT.device
        old = micro_batch.old_logprobs_NT
        loss, metrics, sums = opd_loss_and_sums(
            out.logprobs_at_NTK, t.logprobs_at_NTK.to(device), micro_batch.completion_mask_NT.to(device),
            logprobs_BT=out.logprobs_NT, old_logprobs_BT=None if old is None else old.to(device),
            kind=a.divergence, alpha=a.alpha, ratio_cap=a.ratio_cap, min_tail_prob=a.min_tail_prob,
            agg_mode=a.aggregation, max_tokens=self.policy.rollout.max_new_tokens,
            # the loop averages gradients over processes: scale so their mean is the global loss
            global_count=self.normaliser / world()[1],
        )
        if self.capture_old and old is None:
            micro_batch.old_logprobs_NT = out.logprobs_NT.detach().clone()
        self.sums[id(micro_batch)] = sums
        metrics.pop("divergence_mean", None)  # `jsd`: the exact token mean over the step, from the sums
        return loss, {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def after_update(self, step: int) -> dict[str, Any]:
        """The step's ``jsd`` and ``agreement`` (exact token means of the loss pass, before
        the update), then the EMA of the teacher towards the student (trainable tensors
        only; the others are equal in both copies): theta_T <- (1 - ema) theta_T + ema
        theta_S in the fp32 shadow, and the teacher's forward copy refreshed from it."""
        means = token_means(list(self.sums.values()))
        self.sums = {}
        student = dict(self.model.named_parameters())
        teacher = dict(self.teacher.named_parameters())
        distance = ema_teacher_step_(
            [teacher[n] for n in self.trainable], [self.teacher_shadow[n] for n in self.trainable],
            [full_tensor(student[n].detach()) for n in self.trainable], self.cfg.teacher.ema)
        return {"jsd": means.get("divergence", 0.0), "agreement": means.get("agreement", 0.0),
                "teacher/distance": distance}

    # ---- state: data position, counters, the EMA teacher -----------------------------------
    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The teacher's trainable tensors as its fp32 EMA shadow."""
        return {n: self.teacher_shadow[n].detach().cpu().clone().contiguous() for n in self.trainable}

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "skipped_rows": self.skipped_rows,
                "no_box_rows": self.no_box_rows, "teacher_ema": self.cfg.teacher.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.skipped_rows = state.get("skipped_rows", 0)
        self.no_box_rows = state.get("no_box_rows", 0)

    def save_extra(self, checkpoint_dir: Path) -> None:
        """The loop's hook: the EMA teacher goes inside the checkpoint being written."""
        save_file(self.teacher_state(), str(checkpoint_dir / TEACHER_FILE))

    def load_extra(self, checkpoint_dir: Path) -> None:
        path = checkpoint_dir / TEACHER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"the EMA teacher of this checkpoint is missing: {path} "
                                    "(was it written by another recipe?)")
        load_tensors_into_({n: self.teacher_shadow[n] for n in self.trainable}, path, required=self.trainable)
        params = dict(self.teacher.named_parameters())
        copy_to_([params[n] for n in self.trainable], [self.teacher_shadow[n] for n in self.trainable])


def cut_minis(batch: RolloutBatch, num_prompts: int, mini_batches: int, per_micro: int) -> list[list[RolloutBatch]]:
    """The completions of this process's ``num_prompts`` prompts cut into ``mini_batches``
    contiguous prompt ranges, each into micro-batches of ``per_micro`` prompts. A range
    with no prompt here gets one fully masked micro-batch (loss 0, same collectives)."""
    size = -(-num_prompts // mini_batches)
    groups = batch.group_ids_N.tolist()
    minis = []
    for m in range(mini_batches):
        prompts = list(range(m * size, min((m + 1) * size, num_prompts)))
        micro = [batch.select([i for i, g in enumerate(groups) if g in set(prompts[s:s + per_micro])])
                 for s in range(0, len(prompts), per_micro)]
        if not micro:
            empty = batch.select([0])
            empty.completion_mask_NT = torch.zeros_like(empty.completion_mask_NT)
            micro.append(empty)
        minis.append(micro)
    return minis


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded by FSDP2 (a DTensor: an all-gather, so
    every process calls this for the same tensors in the same order); a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


if __name__ == "__main__":
    sys.exit(run_recipe_cli(VisionOPDRecipe, sys.argv[1:], name="vision_opd"))

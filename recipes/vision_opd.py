"""Vision-OPD (arXiv 2605.18740): crop-teacher on-policy self-distillation.

    vlreason train vision_opd [--config FILE] [key=value ...]
    python recipes/vision_opd.py [--config FILE] [key=value ...]

Two copies of one model. The student (the trained policy) sees the full image and
samples G completions per prompt; the teacher (a separate copy, no gradients, EMA of
the student after every optimizer step) sees an evidence-centred crop of the row's
``boxes[0]`` (vlreason.views.crop_to_box: ``teacher.margin``, enlarged
``teacher.upscale`` x), built at run time, with the same text. On every completion
token the student's top-k log-probs (with gradient) and the teacher's log-probs at the
SAME ids, each plus a tail bucket, are compared by the generalised JSD (alpha 0.5);
tokens are weighted by the detached ``min(exp(logp - logp_old), 2)`` and the loss is the
token mean over the whole step (the global-count normalisation of GRPOPhases). No
reward, advantage or reference KL. The maths is ``vlreason.algorithms.vision_opd_loss``
(the loss) and ``vlreason.algorithms.opd`` (the step's diagnostics, the EMA teacher step).

One step:

1. rollout: draw ``prompts_per_step`` rows, build the student prompts (full
   image, optionally with the box drawn in red) and the teacher prompts (the crop),
   sample G completions at the rollout temperature (1.0);
2. teacher (no gradients), per micro-batch: the student's top-k ids and log-probs
   (``time/student_topk``), then the teacher's log-probs at those ids on the teacher
   prompts (``time/teacher``): the completions are re-scored under the other prompts by
   swapping the batch's ``prompts`` (same rows, same order, so ``group_ids_N`` still
   points at the right prompt);
3. update: the student's log-probs at the stored ids with gradient, the loss, backward;
4. after the optimizer step: theta_T <- (1 - teacher.ema) theta_T + teacher.ema theta_S
   over the trainable tensors (the frozen ones are equal in both copies), accumulated
   in an fp32 shadow; the teacher's forward copy (in the compute dtype, e.g. bf16) is
   refreshed from it (``vlreason.algorithms.opd.ema_teacher_step_``).

Logged every step: ``loss``, ``jsd`` (token mean over the step before the update),
``agreement`` (fraction of tokens where the teacher's argmax among the student's top-k
is the student's top-1), ``weight_mean``, ``student_tail_mass``, ``teacher_tail_mass``,
``completion_len``, ``completion_len_max``, ``truncated_frac``, ``data/skipped_rows``,
``data/no_box_rows``, ``teacher/distance`` (L2 distance teacher - student over the
trainable tensors, after the EMA), ``time/rollout``, ``time/student_topk``,
``time/teacher``, ``time/update``.

Choices made here (see docs/vision_opd.md):

* **Importance weight.** One optimizer update per rollout, so the policy that scores
  the loss is the one that sampled: ``logp_old`` is the student's no-gradient score
  from step 2 and the weight is 1 (up to float rounding; logged as ``weight_mean``). The
  formula is kept so that several updates per rollout would weight correctly.
* **Top-k ids** come from the no-gradient student pass in step 2 (the student has not
  changed between then and the loss); the loss gathers the student's log-probs at
  those ids with gradient (``token_outputs(at_ids_NTK=...)``). ``algorithm.topk`` is
  clamped to the vocabulary size.
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
from safetensors.torch import load_file, save_file

from vlreason.algorithms import (
    AGGREGATIONS,
    DIVERGENCES,
    aggregate_sum_and_count,
    copy_to_,
    fp32_shadow,
    vision_opd_loss,
)
from vlreason.algorithms.opd import ema_teacher_step_, opd_token_sums, token_means
from vlreason.config import doc
from vlreason.data.stream import RowStream, shard
from vlreason.models.loading import resolve_dtype
from vlreason.paths import warm_model
from vlreason.recipe_base import (
    DataConfig,
    Recipe,
    RunConfig,
    load_policy,
    load_split,
    run_recipe_cli,
)
from vlreason.registry import register_recipe
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.forward import token_outputs
from vlreason.rollout.policy import RolloutConfig
from vlreason.rollout.prompts import decode_row_images
from vlreason.train.distributed import global_sum, hash_seed, world
from vlreason.train.loop import OptimConfig, Trainer
from vlreason.train.metrics import StepTimer
from vlreason.views import crop_to_box, draw_box

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
    no_box: str = doc("Rows without boxes: skip (counted in data/no_box_rows) | full (the teacher "
                      "sees the full image).", "skip")

    def validate(self) -> None:
        if not 0.0 <= self.ema <= 1.0:
            raise ValueError(f"teacher.ema must lie in [0, 1], got {self.ema}")
        if self.view not in ("crop", "full"):
            raise ValueError(f"teacher.view must be crop or full, got '{self.view}'")
        if self.no_box not in ("skip", "full"):
            raise ValueError(f"teacher.no_box must be skip or full, got '{self.no_box}'")
        if self.margin < 0 or self.upscale <= 0 or self.min_size < 1:
            raise ValueError("teacher.margin must be >= 0, teacher.upscale > 0, teacher.min_size >= 1")


@dataclass
class OPDConfig:
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


@dataclass
class VisionOPDRecipeConfig(RunConfig):
    output_dir: str = "runs/vision_opd"  # shared keys: help in RunConfig
    max_steps: int = 12
    save_steps: int = 0
    data: OPDDataConfig = field(default_factory=OPDDataConfig, metadata={"help": "Datasets (rows with boxes)."})
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=4, max_new_tokens=48, temperature=1.0),
        metadata={"help": "Sampling and images (one pixel budget for student and teacher)."},
    )
    prompts_per_step: int = doc("Prompts per optimizer step, over all processes (paper 96).", 4)
    algorithm: OPDConfig = field(default_factory=OPDConfig, metadata={"help": "Distillation loss and batch."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The crop teacher."})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))


@register_recipe("vision_opd")
class VisionOPDRecipe(Recipe):
    config_class = VisionOPDRecipeConfig

    @staticmethod
    def default_model() -> Path:
        """The bundled warm tiny checkpoint: distillation needs a model that already answers."""
        return warm_model()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.policy = load_policy(cfg)
        self.model = self.policy.model
        # The teacher: a separate copy of the starting weights (LoRA adapter included), no gradients.
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.teacher_shadow = self.make_teacher_shadow()
        vocab = self.policy.family.lm_head(self.model).weight.shape[0]
        self.topk = min(cfg.algorithm.topk, vocab)
        self.stream = RowStream(self.load_train(), seed=cfg.seed)
        self.run_dir = Path(cfg.output_dir)
        self.skipped_rows = 0
        self.no_box_rows = 0
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
    def views(self, row: dict[str, Any]) -> tuple[list, list]:
        """(student images, teacher images) of one row; a ValueError for an unusable row."""
        images = decode_row_images(row)
        boxes = row.get("boxes") or []
        if not images:
            raise ValueError("the row has no image")
        if not boxes:
            return images, list(images)  # teacher.no_box=full (skip is handled by the caller)
        box = [float(v) for v in boxes[0]]
        student = list(images)
        if self.cfg.algorithm.draw_box:
            student[0] = draw_box(images[0], box, color=self.cfg.algorithm.box_color)
        t = self.cfg.teacher
        teacher = list(student)
        if t.view == "crop":
            teacher[0] = crop_to_box(images[0], box, margin=t.margin, upscale=t.upscale, min_size=t.min_size)
        return student, teacher

    def next_prompts(self, step: int) -> tuple[PromptBatch, PromptBatch]:
        """This process's share of the step's rows as (student prompts, teacher prompts),
        same rows in the same order; unusable rows are skipped with a warning and counted."""
        rank, size = world()
        step_rows = self.stream.next_rows(self.cfg.prompts_per_step)
        max_tokens = self.policy.rollout.prompt.max_prompt_tokens
        usable, student_images, teacher_images, self.prompt_index = [], [], [], []
        for i in shard(list(range(len(step_rows))), rank, size):
            row = step_rows[i]
            if not row.get("boxes") and self.cfg.teacher.no_box == "skip":
                self.no_box_rows += 1
                self.skipped_rows += 1
                log.warning("step %d: skipping row '%s': no boxes for the teacher's crop (teacher.no_box=skip)",
                            step + 1, row.get("id"))
                continue
            try:
                student, teacher = self.views(row)
                lengths = [int(self.policy.prompts([row], images=[imgs]).attention_mask_PT.sum())
                           for imgs in (student, teacher)]
            except ValueError as err:
                self.skipped_rows += 1
                log.warning("step %d: skipping row '%s': %s", step + 1, row.get("id"), err)
                continue
            if max(lengths) > max_tokens:
                self.skipped_rows += 1
                log.warning("step %d: skipping row '%s': prompt has %d tokens (image tokens included) > "
                            "rollout.prompt.max_prompt_tokens=%d", step + 1, row.get("id"), max(lengths), max_tokens)
                continue
            usable.append(row)
            self.prompt_index.append(i)  # the prompt's place in the step's global list: its seed
            student_images.append(student)
            teacher_images.append(teacher)
        if not usable:
            raise RuntimeError(f"step {step + 1}: none of this step's rows could be used (see warnings)")
        return (self.policy.prompts(usable, images=student_images),
                self.policy.prompts(usable, images=teacher_images))

    # ---- the loop's recipe interface -----------------------------------------------------
    def prepare(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch], dict[str, Any]]:
        cfg, a = self.cfg, self.cfg.algorithm
        G = self.policy.rollout.num_generations
        temperature = self.policy.sampling_temperature
        chunk = self.policy.rollout.logprob_chunk_size
        with timer("rollout"):
            student_prompts, teacher_prompts = self.next_prompts(step)
            seeds = [hash_seed(cfg.seed, step, i) for i in self.prompt_index]  # per prompt, not per process
            batch = self.policy.sample(student_prompts, seed=seeds)
        per_micro = a.micro_batch_prompts * G
        micro = [batch.select(list(range(i, min(i + per_micro, batch.num_completions))))
                 for i in range(0, batch.num_completions, per_micro)]
        sums = []  # per micro-batch: the diagnostics' token sums (jsd, agreement)
        for mb in micro:
            with torch.no_grad():
                with timer("student_topk"):
                    s = self.policy.token_outputs(mb, topk=self.topk, temperature=temperature)
                with timer("teacher"):
                    t = token_outputs(self.teacher, self.policy.family, replace(mb, prompts=teacher_prompts),
                                      chunk_size=chunk, at_ids_NTK=s.topk_ids_NTK, temperature=temperature)
                mb.old_logprobs_NT = s.logprobs_NT.detach()
                mb.extras["topk_ids_NTK"] = s.topk_ids_NTK
                mb.extras["teacher_logprobs_NTK"] = t.logprobs_at_NTK.detach()
            sums.append(opd_token_sums(s.topk_logprobs_NTK, t.logprobs_at_NTK, mb.completion_mask_NT,
                                       kind=a.divergence, alpha=a.alpha, min_tail_prob=a.min_tail_prob))
        means = token_means(sums)  # exact token means over this process's share of the step
        lengths = batch.completion_lengths_N.float()
        metrics = {
            "jsd": means["divergence"],
            "agreement": means["agreement"],
            "completion_len": float(lengths.mean()),
            "completion_len_max": float(lengths.max()),
            "truncated_frac": float(batch.truncated_N.float().mean()),
            "teacher_image_tokens": self.image_tokens(teacher_prompts),
            "student_image_tokens": self.image_tokens(student_prompts),
            "data/skipped_rows": self.skipped_rows,
            "data/no_box_rows": self.no_box_rows,
            "data/epoch": self.stream.epoch,
        }
        mask = batch.completion_mask_NT.float()
        self.normaliser = global_sum(aggregate_sum_and_count(mask, mask, a.aggregation)[1])
        return micro, metrics

    @staticmethod
    def image_tokens(prompts: PromptBatch) -> float:
        """Mean image tokens per prompt (the teacher's crop and the student's full image differ)."""
        if prompts.mm_token_type_ids_PT is None:
            return 0.0
        return float((prompts.mm_token_type_ids_PT == 1).sum()) / prompts.num_prompts

    def step(self, micro_batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        a = self.cfg.algorithm
        ids = micro_batch.extras["topk_ids_NTK"]
        out = self.policy.token_outputs(micro_batch, at_ids_NTK=ids, temperature=self.policy.sampling_temperature)
        device = out.logprobs_NT.device
        loss, metrics = vision_opd_loss(
            out.logprobs_at_NTK, micro_batch.extras["teacher_logprobs_NTK"].to(device),
            micro_batch.completion_mask_NT.to(device),
            logprobs_BT=out.logprobs_NT, old_logprobs_BT=micro_batch.old_logprobs_NT.to(device),
            kind=a.divergence, alpha=a.alpha, ratio_cap=a.ratio_cap, min_tail_prob=a.min_tail_prob,
            agg_mode=a.aggregation, max_tokens=self.policy.rollout.max_new_tokens,
            # the loop averages gradients over processes: scale so their mean is the global loss
            global_count=self.normaliser / world()[1],
        )
        # `jsd` (prepare, opd_token_sums) is the step's exact token mean; the loss's own
        # divergence_mean is a micro-batch mean of the same quantity, not logged twice
        metrics.pop("divergence_mean", None)
        return loss, {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def after_update(self, step: int) -> dict[str, Any]:
        """EMA of the teacher towards the student (trainable tensors only; the others are
        equal in both copies): theta_T <- (1 - ema) theta_T + ema theta_S in the fp32
        shadow, then the teacher's forward copy is refreshed from it."""
        student = dict(self.model.named_parameters())
        teacher = dict(self.teacher.named_parameters())
        distance = ema_teacher_step_(
            [teacher[n] for n in self.trainable], [self.teacher_shadow[n] for n in self.trainable],
            [full_tensor(student[n].detach()) for n in self.trainable], self.cfg.teacher.ema)
        return {"teacher/distance": distance}

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
        weights = load_file(str(path))
        missing = set(self.trainable) - set(weights)
        if missing:
            raise ValueError(f"{path} lacks teacher tensors, e.g. {sorted(missing)[:3]}")
        params = dict(self.teacher.named_parameters())
        with torch.no_grad():
            for name in self.trainable:
                shadow = self.teacher_shadow[name]
                shadow.copy_(weights[name].to(shadow.device, torch.float32))
            copy_to_([params[n] for n in self.trainable], [self.teacher_shadow[n] for n in self.trainable])


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded by FSDP2 (a DTensor: an all-gather, so
    every process calls this for the same tensors in the same order); a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


if __name__ == "__main__":
    sys.exit(run_recipe_cli(VisionOPDRecipe, sys.argv[1:], name="vision_opd"))

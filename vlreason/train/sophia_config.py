"""SOPHIA's configuration (arXiv 2507.16814; recipes/sophia.py): the ``sophia:`` and
``reasoner_hard:`` sections, shared by the recipe and the Vision-R1 cold-start builder
(data_pipelines/cold_start.py)."""

from __future__ import annotations

from dataclasses import dataclass

from vlreason.config import doc
from vlreason.reasoners import ReasonerConfig
from vlreason.rewards import accuracy_reward, hard_format_and_correct

REWARDS = {"accuracy": accuracy_reward, "hard": hard_format_and_correct}
SOLUTION_TEMPLATE = (
    "You cannot see the image, but here is a description of it:\n{caption}\n\n"
    "Question: {question}\n{choices}"
    "Answer as if you could see the image. Think first, then answer, in the format "
    "<think>...</think><answer>...</answer>."
)


@dataclass
class SophiaConfig:
    rows_per_round: int = doc("Rows collected per round. rounds > 0: required (>= 1). rounds = 0 "
                              "(chunked): > 0 sets max_steps = warmup_steps + ceil(rows_per_round / "
                              "prompts_per_step); 0 keeps max_steps.", 8)
    micro_batch_prompts: int = doc("Kept solutions per forward/backward micro-batch.", 4)
    num_captions: int = doc("Captions K per image (paper 8).", 2)
    num_solutions: int = doc("Reasoner solutions N per caption (paper 8).", 2)
    caption_prompt: str = doc("The captioning instruction (the question is NOT shown).",
                              "Describe the image in detail.")
    caption_max_new_tokens: int = doc("Caption length limit in tokens.", 32)
    caption_temperature: float = doc("Caption sampling temperature.", 1.0)
    solution_template: str = doc("Reasoner prompt; {caption}, {question} and {choices} (lettered "
                                 "options, one per line, or nothing) are filled in.", SOLUTION_TEMPLATE)
    solution_max_new_tokens: int = doc("Reasoner solution length limit in tokens (paper up to 32K).", 64)
    solution_temperature: float = doc("Reasoner sampling temperature.", 1.0)
    reward: str = doc("accuracy (the <answer> block matches the answer) | hard (strict "
                      "<think></think><answer></answer> format and correct).", "accuracy")
    threshold: float = doc("Keep solutions only of captions whose reward R(c) is strictly above this.", 0.75)
    warmup_steps: int = doc("Warm-up SFT steps before SOPHIA (the paper warms the VLM up on solutions "
                            "first): each trains on prompts_per_step rows of warmup_data with their `solution` "
                            "as target, the same NLL update as a kept solution; counted in max_steps (rounds / "
                            "rows_per_round add them). 0: no warm-up.", 2)
    warmup_data: str = doc("Warm-up rows (a canonical dataset; rows without `solution` are skipped); "
                           "empty: data.train.", "")
    rounds: int = doc("0: chunked (each step collects prompts_per_step rows and updates on them at once). "
                      "> 0: the paper's rounds: each round first collects rows_per_round rows with the "
                      "VLM frozen (no update until the round is collected), writes them as a dataset "
                      "(<output_dir>/rounds/round-NNN: kept/ canonical dataset with `solution`, "
                      "collected.jsonl, summary.json), then trains steps_per_round steps on its kept rows; "
                      "max_steps = warmup_steps + rounds x steps_per_round (set, whatever max_steps says). A round on "
                      "disk is reused, not collected again.", 1)
    steps_per_round: int = doc("rounds > 0: optimizer steps per round, each on prompts_per_step kept rows "
                               "(cycling over them in a seeded order).", 2)
    grpo_steps: int = doc("The paper's \"+GRPO\" row: GRPO steps (the `grpo:` section, vlreason.train.grpo) "
                          "on data.train after the SOPHIA steps, in the same run; added to max_steps with rounds "
                          "or rows_per_round, else counted in it. 0: none.", 0)
    route_by: str = doc("With reasoner_hard: difficulty (the row's difficulty_key value is in hard_values) | "
                        "pass_rate (the VLM itself answers the original question pass_rate_samples times at "
                        "rollout.temperature; rows whose accuracy is below hard_below go to reasoner_hard).",
                        "difficulty")
    pass_rate_samples: int = doc("route_by=pass_rate: VLM answers per row.", 4)
    hard_below: float = doc("route_by=pass_rate: a row is hard when the VLM's pass rate is below this.", 0.5)
    difficulty_key: str = doc("With reasoner_hard: the row field, or else the key of the row's JSON "
                              "`meta`, that holds its difficulty.", "difficulty")
    hard_values: list[str] = doc("With reasoner_hard: difficulty values routed to it (compared as "
                                 "lower-case strings); other rows go to `reasoner`.", ["hard"])
    max_target_tokens: int = doc("Longest kept solution, in VLM tokens with the end-of-turn token; a "
                                 "longer one is rejected, never cut (sophia/kept_too_long). Keep it above "
                                 "solution_max_new_tokens for long reasoners.", 512)

    def validate(self) -> None:
        if min(self.micro_batch_prompts, self.num_captions, self.num_solutions) < 1:
            raise ValueError("sophia.micro_batch_prompts, num_captions and num_solutions must be >= 1")
        if self.route_by not in ("difficulty", "pass_rate"):
            raise ValueError(f"sophia.route_by must be difficulty or pass_rate, got '{self.route_by}'")
        if self.pass_rate_samples < 1 or not 0.0 < self.hard_below <= 1.0:
            raise ValueError("sophia.pass_rate_samples must be >= 1 and sophia.hard_below in (0, 1]")
        if self.grpo_steps < 0:
            raise ValueError("sophia.grpo_steps must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError("sophia.warmup_steps must be >= 0")
        if self.rows_per_round < 0 or self.rounds < 0 or self.steps_per_round < 1:
            raise ValueError("sophia.rows_per_round and rounds must be >= 0, steps_per_round >= 1")
        if self.rounds > 0 and self.rows_per_round < 1:
            raise ValueError("sophia.rounds > 0 needs sophia.rows_per_round >= 1 (rows collected per round)")
        if self.reward not in REWARDS:
            raise ValueError(f"sophia.reward must be one of {list(REWARDS)}, got '{self.reward}'")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"sophia.threshold must lie in [0, 1), got {self.threshold}")
        if min(self.caption_max_new_tokens, self.solution_max_new_tokens, self.max_target_tokens) < 1:
            raise ValueError("sophia token limits must be >= 1")
        if "{caption}" not in self.solution_template or "{question}" not in self.solution_template:
            raise ValueError("sophia.solution_template must contain {caption} and {question}")


@dataclass
class HardReasonerConfig(ReasonerConfig):
    kind: str = doc("Empty: no routing, every row goes to `reasoner`. Otherwise the reasoner for rows "
                    "whose difficulty is in sophia.hard_values (paper: DeepSeek-R1 for hard, QwQ-32B for "
                    "easy); same keys as `reasoner`.", "")

    def validate(self) -> None:
        if self.kind:
            super().validate()


"""The batch object every role reads and extends (DESIGN.md, "Batch object").

Two levels, so that nothing per-image is ever repeated per completion:

* ``PromptBatch``: P prompts, each tokenised once with its images resized once to the
  shared pixel budget. ``pixel_values`` holds each prompt's images once.
* ``RolloutBatch``: N = P x G completions. ``group_ids_N[i]`` is the prompt of
  completion i; prompt tensors are looked up through it, never copied G times
  until a forward pass needs the token ids.

Roles fill the optional fields in order: rollout (completions), reward (rewards_N),
reference (ref_logprobs_NT), algorithm (advantages_N), teacher (extras).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class PromptBatch:
    input_ids_PT: torch.Tensor  # left-padded prompt tokens
    attention_mask_PT: torch.Tensor
    mm_token_type_ids_PT: torch.Tensor | None  # 0 text, 1 image, 2 video (None: text only)
    pixel_values: torch.Tensor | None  # all images of all prompts, patch-flattened, once each
    image_grid_thw: torch.Tensor | None  # [num_images, 3]
    images_per_prompt: list[int]
    rows: list[dict[str, Any]]  # the canonical rows (without image bytes): id, answer, choices...

    @property
    def num_prompts(self) -> int:
        return self.input_ids_PT.shape[0]

    def image_index(self, prompt_index: list[int]) -> list[int]:
        """Indices into the image list for the images of the given prompts, in order."""
        starts = [0]
        for count in self.images_per_prompt:
            starts.append(starts[-1] + count)
        return [i for p in prompt_index for i in range(starts[p], starts[p + 1])]

    def to(self, device: torch.device | str) -> PromptBatch:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return PromptBatch(**moved)


@dataclass
class RolloutBatch:
    prompts: PromptBatch
    group_ids_N: torch.Tensor  # long [N]: prompt index of each completion
    completion_ids_NT: torch.Tensor  # right-padded with pad id
    completion_mask_NT: torch.Tensor  # 1 on real completion tokens (EOS included)
    truncated_N: torch.Tensor  # bool: hit max_new_tokens without EOS
    texts: list[str] = field(default_factory=list)
    old_logprobs_NT: torch.Tensor | None = None
    ref_logprobs_NT: torch.Tensor | None = None
    rewards_N: torch.Tensor | None = None
    advantages_N: torch.Tensor | None = None
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_completions(self) -> int:
        return self.completion_ids_NT.shape[0]

    @property
    def completion_lengths_N(self) -> torch.Tensor:
        return self.completion_mask_NT.sum(-1)

    def select(self, index: list[int] | torch.Tensor) -> RolloutBatch:
        """A micro-batch of completions ``index``; prompt data stays shared (not copied)."""
        index = torch.as_tensor(index, dtype=torch.long)

        def take(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.num_completions:
                return value[index.to(value.device)]
            if isinstance(value, list) and len(value) == self.num_completions:
                return [value[i] for i in index.tolist()]
            if isinstance(value, dict):
                return {k: take(v) for k, v in value.items()}
            return value

        return replace(
            self,
            **{f.name: take(getattr(self, f.name)) for f in fields(self) if f.name != "prompts"},
        )

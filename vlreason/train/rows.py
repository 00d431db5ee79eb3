"""A step's rows: draw, shard, check, decode, and skip-and-count, in one place.

Every recipe takes its training rows through a :class:`RowGate`. A row that cannot be
used (an image that no longer decodes, a special token written in the question, a
recipe-specific defect such as a missing ``solution``, a prompt over the token limit)
is reported with its id and the reason, counted in ``skipped`` (which the recipes
checkpoint and log as ``data/skipped_rows``), and left out: never silently dropped,
never a crash, never a prompt cut through its image tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlreason.data.stream import RowStream, shard
from vlreason.rollout.prompts import decode_row_images, refuse_special_tokens
from vlreason.train.distributed import world

log = logging.getLogger(__name__)

RowCheck = Callable[[dict[str, Any]], None]  # raises ValueError (naming the row) when unusable


@dataclass
class StepRows:
    """This process's usable rows of one draw, with their decoded images."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    images: list[list] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # each kept row's position in the global draw
    drawn: int = 0  # rows this process looked at (kept + skipped)

    def subset(self, keep: list[int]) -> StepRows:
        return StepRows([self.rows[i] for i in keep], [self.images[i] for i in keep],
                        [self.index[i] for i in keep], self.drawn)

    @property
    def skipped(self) -> int:
        return self.drawn - len(self.rows)


class RowGate:
    """Draws rows from ``stream`` and lets through the usable ones (see the module doc).

    ``tokenizer``: its special tokens may not appear as text in a question or choice.
    ``check``: the recipe's own test of a row (e.g. SFT's "has a target")."""

    def __init__(self, stream: RowStream | None, tokenizer: Any = None, *, check: RowCheck | None = None):
        self.stream = stream
        self.tokenizer = tokenizer
        self.check = check
        self.skipped = 0

    def draw(self, step: int, count: int) -> StepRows:
        """This process's share of the next ``count`` rows (over all processes), usable ones only."""
        rank, size = world()
        drawn = self.stream.next_rows(count)
        mine = shard(list(range(len(drawn))), rank, size)
        return self.admit(step, [drawn[i] for i in mine], index=mine)

    def admit(self, step: int, rows: list[dict[str, Any]], index: list[int] | None = None) -> StepRows:
        """The usable ones of ``rows`` (already this process's), with their images;
        ``index``: the rows' global positions (default 0, 1, ...)."""
        out = StepRows(drawn=len(rows))
        for i, row in zip(index if index is not None else range(len(rows)), rows, strict=True):
            try:
                refuse_special_tokens(row, self.tokenizer)
                if self.check is not None:
                    self.check(row)
                images = decode_row_images(row)
            except ValueError as err:
                self.skip(step, row, str(err))
                continue
            out.rows.append(row)
            out.images.append(images)
            out.index.append(i)
        return out

    def within_limit(self, step: int, taken: StepRows, lengths: list[int], limit: int) -> StepRows:
        """Leave out (reported, counted) the rows whose prompt is over ``limit`` tokens."""
        keep = [i for i, n in enumerate(lengths) if n <= limit]
        for i in sorted(set(range(len(taken.rows))) - set(keep)):
            self.skip(step, taken.rows[i], f"prompt has {lengths[i]} tokens (image tokens included) > "
                      f"rollout.prompt.max_prompt_tokens={limit}; prompts are never cut through image tokens")
        return taken if len(keep) == len(taken.rows) else taken.subset(keep)

    def skip(self, step: int, row: dict[str, Any], reason: str) -> None:
        self.skipped += 1
        log.warning("step %d: skipping row '%s': %s", step + 1, row.get("id"), reason)


class SkippedRows:
    """``skipped_rows``: the row gate's count (``self.rows.skipped``) as a read/write
    attribute, for the phases and collectors that checkpoint and log it."""

    rows: RowGate

    @property
    def skipped_rows(self) -> int:
        return self.rows.skipped

    @skipped_rows.setter
    def skipped_rows(self, value: int) -> None:
        self.rows.skipped = value


def none_usable(step: int) -> RuntimeError:
    return RuntimeError(f"step {step + 1}: none of this step's rows could be used (see warnings)")

"""What ``vlreason preprocess`` passes between its stages and writes as ``report.json``.

A source reader (:mod:`data_pipelines.sources`) yields :class:`RawRow` objects, or a
:class:`Rejection` for a row it could not even read; the row checks
(:mod:`data_pipelines.validate`) turn each raw row into a canonical row or a
:class:`Rejection`; the orchestrator (:mod:`data_pipelines.preprocess`) collects the
rejections in a :class:`Report`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_NAME = "report.json"


class PreprocessError(RuntimeError):
    """A fatal problem: bad arguments, an unreadable source, or a bad row in strict mode."""


class PreprocessWriteError(PreprocessError):
    """The output could not be written (disk full, quota, read-only file system); the
    message names the output folder, which was left as it was."""


@dataclass(frozen=True)
class RawRow:
    """A row as read from the source, not yet validated; ``line`` locates it in the report."""

    line: int | None
    fields: dict[str, Any]


@dataclass(frozen=True)
class Rejection:
    """One rejected row: where it is, which image (if any) and why."""

    line: int | None
    id: str | None
    file: str | None
    reason: str
    detail: str = ""


@dataclass
class Report:
    """What a preprocessing run kept and rejected; written as ``report.json``."""

    source: str
    format: str
    source_name: str
    total: int = 0
    kept: int = 0
    rejected_rows: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejected_rows)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        """Counts per reason, most frequent first (ties by name)."""
        counts = Counter(r.reason for r in self.rejected_rows)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_name": self.source_name,
            "format": self.format,
            "total": self.total,
            "kept": self.kept,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason,
            "rejected_rows": [asdict(r) for r in self.rejected_rows],
        }

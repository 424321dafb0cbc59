"""Long work of the explore page (indexing an image set) runs in threads as :class:`Job` s the page polls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INDEX_BUDGET", "Job"]

INDEX_BUDGET = 256 * 2**20
"""Bytes of codes an index may hold: the ISTA codes of all layers at once (above it, one layer at a time), the
codes of one SAE over the image set (above it, the first images that fit)."""


@dataclass
class Job:
    """Long work running in a thread; the page polls :meth:`Explorer.job`."""

    id: str
    what: str
    done: int = 0
    total: int = 0
    state: str = "running"  # running | done | error
    message: str = ""
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "what": self.what, "done": self.done, "total": self.total, "state": self.state,
                "message": self.message, "seconds": round(self.seconds or time.perf_counter() - self.started, 3)}  # fmt: skip

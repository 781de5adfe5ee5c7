"""Admission control: a bound on the images in the service (admitted and not yet answered).

Past it a request is refused at once (503, Retry-After, JSON), so the ones admitted are answered
within the latency budget; the default bound is as many full batches as fit in 40 % of the
budget (docs/decisions.md, "Admission bound").
"""

from __future__ import annotations

import math


def bound_from_budget(budget_ms: float, full_batch_ms: float, max_batch_size: int) -> int:
    """Images that can wait and still be answered within `budget_ms`: whole batches of
    `max_batch_size` taking `full_batch_ms` each, in 40 % of the budget; at least one batch."""
    if budget_ms <= 0 or full_batch_ms <= 0 or max_batch_size < 1:
        raise ValueError(f"bad bound inputs: budget {budget_ms} ms, batch {full_batch_ms} ms, size {max_batch_size}")
    return max(1, math.floor(0.4 * budget_ms / full_batch_ms)) * max_batch_size


class Admission:
    """Counts images in the service; `try_enter(n)` admits them unless that passes `limit`.

    An idle service admits any request, so a batch request larger than the bound (up to
    NIN_MAX_BATCH_IMAGES) is served when it comes alone instead of never. Used from the event
    loop only (no lock needed). `limit` None admits everything (before the warm-up has measured
    a batch)."""

    def __init__(self, limit: int | None = None, full_batch_ms: float = 0.0, max_batch_size: int = 1) -> None:
        self.limit, self.full_batch_ms, self.max_batch_size = limit, full_batch_ms, max_batch_size
        self.in_system = 0

    def try_enter(self, n: int) -> bool:
        if self.limit is not None and self.in_system and self.in_system + n > self.limit:
            return False
        self.in_system += n
        return True

    def leave(self, n: int) -> None:
        self.in_system -= n

    def retry_after_s(self) -> int:
        """Whole seconds until the images now in the service are likely done (at least 1)."""
        batches = math.ceil(self.in_system / self.max_batch_size)
        return max(1, math.ceil(batches * self.full_batch_ms / 1000))

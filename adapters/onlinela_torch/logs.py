"""Rate-limited warnings: a repeated condition is logged once, then rarely, and always counted.

A diverging run can hit the same condition on every step for ever; logging
each occurrence buries everything else (issue: a 200-step NaN storm printed
1,400 lines).  :class:`WarningCounter` logs occurrence 1, then every
``every``-th occurrence (with the running count), and keeps the count of
every key, which the preconditioner reports in its ``stats()``.
"""

from __future__ import annotations

import logging
from collections import Counter

__all__ = ["WarningCounter"]


class WarningCounter:
    """Counts conditions by key and logs the 1st and then every ``every``-th occurrence of each.

    Parameters
    ----------
    logger : logging.Logger
        Where the messages go (at WARNING level).
    every : int >= 1
        Log period after the first occurrence (default 100).

    Examples
    --------
    >>> import logging
    >>> w = WarningCounter(logging.getLogger("demo"), every=10)
    >>> for step in range(25):
    ...     w.warn("nonfinite_grad", "step %d: non-finite gradient", step)   # logged at steps 0, 9, 19
    >>> w.counts["nonfinite_grad"]
    25
    """

    def __init__(self, logger: logging.Logger, every: int = 100) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"`every` must be an int >= 1, got {every!r}")
        self.logger = logger
        self.every = every
        self.counts: Counter[str] = Counter()

    def warn(self, key: str, msg: str, *args: object) -> bool:
        """Count ``key``; log ``msg % args`` on its 1st and every ``every``-th occurrence.  Returns whether it logged."""
        self.counts[key] += 1
        n = self.counts[key]
        if n == 1 or n % self.every == 0:
            suffix = "" if n == 1 else f" [occurrence {n} of {key!r}; logged 1 in {self.every}]"
            self.logger.warning(msg + suffix, *args)
            return True
        return False

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for ``stats()`` and checkpoints)."""
        return dict(self.counts)

    def load(self, counts: dict[str, int]) -> None:
        """Restore counts saved by :meth:`as_dict`."""
        self.counts = Counter({str(k): int(v) for k, v in counts.items()})

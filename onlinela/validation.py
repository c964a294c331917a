"""Public argument validators: the checks (and messages) :mod:`onlinela` applies to its own arguments.

For adapters and extensions that want the same contract and wording, e.g.
"`rank` must satisfy 0 < rank, got 0".  Each raises ``TypeError`` for a
value of the wrong type and ``ValueError`` for one out of range, naming the
argument.
"""

from __future__ import annotations

from ._validation import check_bool, check_int, check_real

__all__ = ["check_bool", "check_int", "check_real"]

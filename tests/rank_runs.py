"""Shared by the tests that spawn a gloo group: run a worker on every rank, read back what each rank saved.

A worker ``fn(out)`` runs on each rank of a spawned group
(:func:`onlinela_torch.distributed.spawn`) and saves its results as
``out/rank{r}.pt``.  A dead, raising or hung worker is returned as the
exception, so that the tests reading the results *fail* with its message
(:func:`results`) instead of erroring in a fixture.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from onlinela_torch.distributed import spawn

TIMEOUT = datetime.timedelta(seconds=60)


def run_ranks(fn: Callable[[str], None], out: pathlib.Path, world: int = 2,
              timeout: datetime.timedelta = TIMEOUT) -> list[Any] | BaseException:
    """``fn(str(out))`` on ``world`` ranks; the per-rank saved objects, or the exception the group ended with."""
    try:
        spawn(fn, world, (str(out),), timeout=timeout)
    except Exception as exc:  # a worker raised, died or timed out: the tests fail and say why
        return exc
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def results(res: list[Any] | BaseException) -> list[Any]:
    """The per-rank results of :func:`run_ranks`, read in a test body: a failed group is a test *failure*."""
    if isinstance(res, BaseException):
        pytest.fail(f"the {res.__class__.__name__} of the worker group: {res}", pytrace=False)
    return res

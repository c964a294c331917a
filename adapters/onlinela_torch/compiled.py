"""``torch.compile`` support: capture hooks that Dynamo runs eagerly, and names without ``_orig_mod``.

The capture hooks read step-dependent Python state (the schedule plan, the
step counter, a timer) and register tensor hooks; traced by Dynamo, each new
step value would be a guard failure and a recompilation until the recompile
limit.  :func:`eager_hook` makes Dynamo break the graph around a hook and run
it eagerly instead (the eager results, no per-step recompilation), without
importing ``torch._dynamo`` in eager programs.  ``torch.compile(model)`` wraps
the model in an ``OptimizedModule`` whose submodule names start with
``_orig_mod.``; :func:`clean_name` drops that segment so layer names, and so
checkpoints, are the same for a compiled and an eager model.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__: list[str] = []

def dynamo_loaded() -> bool:
    """Whether ``torch._dynamo`` is imported (something called ``torch.compile``); never imports it."""
    return "torch._dynamo" in sys.modules


def eager_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped by ``torch.compiler.disable`` once Dynamo is loaded, ``fn`` itself before.

    Under ``torch.compile`` a disabled hook is a graph break and runs eagerly:
    no guard on its step-dependent state, so no recompilation per step.
    Eager programs that never compile keep the plain function (importing
    Dynamo to wrap it costs seconds); re-register the hooks when Dynamo
    appears (:meth:`KFACPreconditioner.step` does).

    The disabled form is entered only while Dynamo traces
    (``torch.compiler.is_compiling()``): an eager call goes straight to
    ``fn``.  Creating any ``torch.optim`` optimizer imports Dynamo, and the
    disable wrapper's frame switch costs about 16 µs a call on a CPU, which was
    ~10 % of a K-FAC step on a small MLP (five hook calls a step).
    """
    if not dynamo_loaded():
        return fn
    disabled = torch.compiler.disable(fn)
    is_compiling = torch.compiler.is_compiling

    @functools.wraps(fn)
    def hook(*args: Any, **kwargs: Any) -> Any:
        if is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return hook


def clean_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments that ``torch.compile`` wrappers add (``"_orig_mod.0"`` -> ``"0"``)."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, or ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model

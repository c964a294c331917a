"""The owner table of the distributed preconditioner (:class:`onlinela_torch.assignment.FactorPlacement`), no process group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onlinela_torch import KFACPreconditioner
from onlinela_torch.assignment import AssignmentPolicy, FactorPlacement, GreedyAssignment, WorkItem, decomposition_cost

SKETCH = dict(oversample=4, n_iter=2)


def _layers(method: str = "rs-kfac") -> dict:
    """The layers of a 3-layer MLP after one statistics-and-decomposition step (every factor exists)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 50), nn.Tanh(), nn.Linear(50, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    precond = KFACPreconditioner(model, method=method, rank=6, factor_update_freq=1, inv_update_freq=1, **SKETCH)
    x = torch.randn(16, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    nn.functional.mse_loss(model(x), torch.zeros(16, 3, dtype=torch.float64)).backward()
    precond.step()
    precond.remove_hooks()
    return precond.layers


class _OutOfRange(AssignmentPolicy):
    def assign(self, items, loads):
        return [len(loads)] * len(items)


def test_replicate_places_each_factor_by_the_policy_on_its_cost():
    layers = _layers()
    placement = FactorPlacement(GreedyAssignment(), 0, 3, "replicate", **SKETCH)
    assert placement.owner("0", "A") == 0  # before placement: this rank
    placement.place_new(layers)
    items = [WorkItem(f"{n}/{w}", decomposition_cost(f, 0, **SKETCH)) for n, lay in layers.items() for w, f in lay.factors()]
    expected = GreedyAssignment().assign(items, [0.0] * 3)
    assert [placement.owner(*it.name.split("/")) for it in items] == expected
    assert len(set(expected)) == 3  # the 6 factors spread over every rank
    loads = [sum(it.cost for it, o in zip(items, expected) if o == p) for p in range(3)]
    assert placement.loads == loads
    before = dict(placement.owners)
    placement.place_new(layers)  # placed once: a second call moves nothing
    assert placement.owners == before and placement.loads == loads
    assert placement.nested() == {n: {w: before[(n, w)] for w in ("A", "G")} for n in layers}


def test_memory_mode_keeps_a_layers_factors_together_and_releases_the_others():
    layers = _layers()
    placement = FactorPlacement(GreedyAssignment(), 1, 2, "memory", **SKETCH)
    placement.place_new(layers)
    owners = {n: {placement.owner(n, "A"), placement.owner(n, "G")} for n in layers}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert set().union(*owners.values()) == {0, 1}
    for name, layer in layers.items():
        for _, f in layer.factors():
            held = f.ea is not None and f.eigen is not None
            assert held == (owners[name] == {1}), (name, f.kind)


def test_a_policy_placing_off_the_ranks_is_a_value_error():
    placement = FactorPlacement(_OutOfRange(), 0, 2, "replicate", **SKETCH)
    with pytest.raises(ValueError, match=r"_OutOfRange placed '0/A' on rank 2"):
        placement.place_new(_layers("kfac"))

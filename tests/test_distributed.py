"""Data-parallel K-FAC (onlinela_torch.distributed) on 2 gloo processes on CPU.

One spawned 2-rank group runs every scenario (a process group costs seconds
to start); the workers write their results to files that the tests compare
with single-process runs on the same global batch.  Every collective has a
60 s timeout, so a mismatch across ranks fails instead of hanging.

Tolerance: everything in float64; the 2-rank run differs from the 1-rank run
only in summation order (a Gram of two halves, mirrored upper triangles), so
parameters agree to ``atol = 1e-9`` after 6 steps (measured: ~5e-12 for
``kfac``, ~5e-15 for the others; in float32 the same runs differ by ~2e-4,
round-off amplified by the small damping and momentum).
"""

from __future__ import annotations

import datetime
import os
import pathlib

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch import nn  # noqa: E402

from onlinela_torch import KFACPreconditioner  # noqa: E402
from onlinela_torch.distributed import (  # noqa: E402
    AssignmentPolicy,
    DistributedKFACPreconditioner,
    GreedyAssignment,
    WorkItem,
    decomposition_cost,
    distribute,
    spawn,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]

METHODS = ("kfac", "rs-kfac", "b-kfac")
STEPS, BATCH, HALF = 6, 16, 3
LONG = 40  # steps of the rank-agreement run: 20 decomposition rounds (benchmarks/distributed_kfac.py --agreement runs 300)
OPTIONS = dict(
    factor_dtype=torch.float64, inv_dtype=torch.float64, rank=8, oversample=4, n_iter=2,
    factor_update_freq=1, inv_update_freq=2, damping=1e-2, kl_clip=None,
)
TIMEOUT = datetime.timedelta(seconds=60)


WIDTHS = (60, 80, 40, 4)  # r + s = 8 + 16 < d for the two hidden layers: Brand-eligible
SPLIT = (60, 50, 4)  # per-factor LPT on 2 ranks: A (61) of layer "0" on rank 0, its G (50) on rank 1


def _model(widths=WIDTHS) -> nn.Module:
    torch.manual_seed(0)
    layers: list = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    f64 = dict(generator=g, dtype=torch.float64)
    return torch.randn(STEPS, BATCH, 60, **f64), torch.randn(STEPS, BATCH, 4, **f64)


def _run(model, precond, opt, steps, shard=slice(None), forward=None):
    xs, ys = _batches()
    forward = forward or model
    for k in steps:
        opt.zero_grad()
        nn.functional.mse_loss(forward(xs[k][shard]), ys[k][shard]).backward()
        precond.step()
        opt.step()


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _single(method, steps=range(STEPS), state=None, widths=WIDTHS):
    """The 1-process reference on the full batch, optionally resumed from ``state``."""
    model = _model(widths)
    precond = KFACPreconditioner(model, method=method, **OPTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        precond.load_state_dict(state["preconditioner"])
    _run(model, precond, opt, steps)
    return model, precond, opt


def _probe() -> torch.Tensor:
    """A fixed gradient matrix for layer "2" (40 × 81) of the :data:`WIDTHS` model."""
    return torch.randn(40, 81, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _checkpoint(model, opt, precond) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "preconditioner": precond.state_dict()}


class _AllOnLast(AssignmentPolicy):
    def assign(self, items, loads):
        return [len(loads) - 1] * len(items)


def _expect_error(build) -> str:
    try:
        build()
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return ""


def _layouts(precond) -> dict:
    """Shape and strides of every stored decomposition tensor (snapshot and Brand state), per factor."""
    out = {}
    for name, layer in precond.layers.items():
        for which, f in layer.factors():
            held = {"eigen": None if f.eigen is None else f.eigen.approx, "brand": getattr(f, "brand", None)}
            out[f"{name}/{which}"] = {
                k: None if lr is None else [(tuple(t.shape), t.stride()) for t in (lr.eigvecs, lr.eigvals)]
                for k, lr in held.items()
            }
    return out


def _long_run(method: str, rank: int, world: int) -> dict:
    """LONG steps on fresh batches; the parameters after each decomposition round and the stored layouts."""
    model = _model()
    precond = DistributedKFACPreconditioner(model, method=method, **OPTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    trace = []
    for k in range(LONG):
        x = torch.randn(BATCH, 60, generator=g, dtype=torch.float64)
        y = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        precond.step()
        opt.step()
        trace.append(_params(model))
    return {"trace": torch.stack(trace), "layouts": _layouts(precond)}


def _worker(out: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    out_dir = pathlib.Path(out)
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    res: dict = {"long": {method: _long_run(method, rank, world) for method in METHODS}}
    for method in METHODS:  # without DDP: the preconditioner averages the gradients
        model = _model()
        precond = DistributedKFACPreconditioner(model, method=method, **OPTIONS)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _run(model, precond, opt, range(HALF), shard)
        if method == "b-kfac" and rank == 0:
            torch.save(_checkpoint(model, opt, precond), out_dir / "two_ranks_half.pt")
        _run(model, precond, opt, range(HALF, STEPS), shard)
        res[method] = {"params": _params(model), "stats": precond.stats()["distributed"]}
    # DDP, with the preconditioner of an existing object made distributed (the CLI's way)
    model = _model()
    precond = distribute(KFACPreconditioner(model, method="rs-kfac", **OPTIONS), average_gradients=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _run(model, precond, opt, range(STEPS), shard, forward=ddp)
    res["ddp"] = {"params": _params(model), "stats": precond.stats()["distributed"]}
    # resume a 1-process checkpoint on 2 ranks
    state = torch.load(out_dir / "one_rank_half.pt", weights_only=False)
    model = _model()
    model.load_state_dict(state["model"])
    ddp = nn.parallel.DistributedDataParallel(model)
    precond = DistributedKFACPreconditioner(ddp, method="b-kfac", **OPTIONS)  # unwraps .module
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(state["optimizer"])
    precond.load_state_dict(state["preconditioner"])
    _run(model, precond, opt, range(HALF, STEPS), shard, forward=ddp)
    res["resumed"] = {"params": _params(model)}
    # a custom assignment policy: every layer on the last rank
    model = _model()
    precond = DistributedKFACPreconditioner(model, method="kfac", assignment=_AllOnLast(), **OPTIONS)
    _run(model, precond, torch.optim.SGD(model.parameters(), lr=0.1), range(HALF), shard)
    res["all_on_last"] = precond.stats()["distributed"]
    # the factor is the unit of work: a layer's A and G on different ranks
    model = _model(SPLIT)
    precond = DistributedKFACPreconditioner(model, method="kfac", **OPTIONS)
    _run(model, precond, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), range(STEPS), shard)
    res["split"] = {"params": _params(model), "stats": precond.stats()["distributed"]}
    # mode="memory": owners keep their layers' factors and broadcast preconditioned gradients
    probe = {"2": _probe()}
    for method in METHODS:
        model = _model()
        precond = DistributedKFACPreconditioner(model, method=method, mode="memory", **OPTIONS)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _run(model, precond, opt, range(HALF), shard)
        half = _checkpoint(model, opt, precond)  # collective in mode="memory"; complete on rank 0
        if method == "b-kfac" and rank == 0:
            torch.save(half, out_dir / "memory_half.pt")
        _run(model, precond, opt, range(HALF, STEPS), shard)
        res[f"memory/{method}"] = {
            "params": _params(model),
            "stats": precond.stats()["distributed"],
            "precondition": precond.precondition(probe),  # collective
        }
    # KFACPreconditioner(...) is always a KFACPreconditioner (warned under a group); distribute() makes it
    # distributed (a rank schedule's lambda has a different address on each rank: not a mismatch)
    plain = KFACPreconditioner(_model(), **{**OPTIONS, "rank": lambda step: 8})
    res["plain"] = (type(plain).__name__, plain.stats()["warnings"].get("not_distributed", 0))
    auto = distribute(KFACPreconditioner(_model(), **{**OPTIONS, "rank": lambda step: 8}))
    res["auto"] = (type(auto).__name__, auto.average_gradients)
    # mismatched configurations fail on every rank, without a hang
    res["bad_method"] = _expect_error(
        lambda: DistributedKFACPreconditioner(_model(), method="kfac" if rank == 0 else "rs-kfac", **OPTIONS)
    )
    res["bad_mode"] = _expect_error(lambda: DistributedKFACPreconditioner(_model(), mode="fast", **OPTIONS))
    res["mixed_modes"] = _expect_error(
        lambda: DistributedKFACPreconditioner(_model(), mode="memory" if rank else "replicate", **OPTIONS)
    )
    res["bad_layers"] = _expect_error(
        lambda: DistributedKFACPreconditioner(_model(), skip_layers=["4"] if rank else [], **OPTIONS)
    )

    def skipped_layer():
        model = _model()
        precond = DistributedKFACPreconditioner(model, **OPTIONS)
        if rank == 1:
            model[4].eval()  # no statistics captured for layer "4" on rank 1
        _run(model, precond, torch.optim.SGD(model.parameters(), lr=0.1), range(1), shard)

    res["bad_capture"] = _expect_error(skipped_layer)
    torch.save(res, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the 2-rank worker once; its results for each rank, plus the 1-rank half-way checkpoint."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dist")
    model, precond, opt = _single("b-kfac", range(HALF))
    torch.save(_checkpoint(model, opt, precond), out / "one_rank_half.pt")
    try:
        spawn(_worker, 2, (str(out),), timeout=TIMEOUT)
    except Exception as exc:  # a worker raised, died or timed out: every test below fails and says why
        return out, exc
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _ok(two_ranks) -> tuple[pathlib.Path, list]:
    """The per-rank results of :func:`two_ranks`, read in the test body: a dead worker is a *failure*, not an error."""
    out, res = two_ranks
    if isinstance(res, BaseException):
        pytest.fail(f"the 2-rank worker group failed: {type(res).__name__}: {res}", pytrace=False)
    return out, res


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_match_one_rank_on_the_same_global_batch(two_ranks, method):
    _, res = _ok(two_ranks)
    ref = _params(_single(method)[0])
    torch.testing.assert_close(res[0][method]["params"], ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(res[0][method]["params"], res[1][method]["params"], rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_ranks_stay_bitwise_equal_and_store_the_same_layouts(two_ranks, method):
    """Identical by construction: the owner stores what it broadcasts (row-major), so products round alike."""
    _, res = _ok(two_ranks)
    r0, r1 = res[0]["long"][method], res[1]["long"][method]
    assert r0["layouts"] == r1["layouts"]
    stored = [spec for f in r0["layouts"].values() for lr in f.values() if lr is not None for spec in lr]
    assert stored and all(stride == torch.empty(shape).stride() for shape, stride in stored)  # row-major everywhere
    differ = (r0["trace"] != r1["trace"]).any(dim=1)
    assert not bool(differ.any()), f"ranks differ from step {int(differ.nonzero()[0])} of {LONG}"


def test_ddp_wrapped_model_matches_one_rank(two_ranks):
    _, res = _ok(two_ranks)
    ref = _params(_single("rs-kfac")[0])
    torch.testing.assert_close(res[0]["ddp"]["params"], ref, rtol=0, atol=1e-9)
    assert res[0]["ddp"]["stats"]["bytes_total"]["gradients"] == 0  # DDP averaged them


@pytest.mark.parametrize("method", METHODS)
def test_decompositions_are_split_across_ranks(two_ranks, method):
    _, res = _ok(two_ranks)
    s0, s1 = res[0][method]["stats"], res[1][method]["stats"]
    assert s0["owners"] == s1["owners"] and _owner_ranks(s0) == {0, 1}
    assert s0["decompositions"] > 0 and s1["decompositions"] > 0
    assert s0["received"] == s1["decompositions"] and s1["received"] == s0["decompositions"]
    # the 1-rank run computes exactly the union: one snapshot per factor per update
    ref = _single(method)[1]
    total = sum(1 for layer in ref.layers.values() for _ in layer.factors())
    per_factor = STEPS if method == "b-kfac" else sum(ref._plan(k).decompose for k in range(STEPS))  # its schedule
    if method != "b-kfac":
        assert s0["decompositions"] + s1["decompositions"] == total * per_factor
    else:
        assert s0["decompositions"] + s1["decompositions"] <= total * per_factor
    assert s0["bytes_total"]["statistics"] > 0 and s0["bytes_total"]["decompositions"] > 0
    if method == "b-kfac":
        assert s0["bytes_total"]["brand_rows"] > 0


def _owner_ranks(stats: dict) -> set[int]:
    return {rank for per_layer in stats["owners"].values() for rank in per_layer.values()}


def test_a_layers_factors_can_be_decomposed_on_different_ranks(two_ranks):
    _, res = _ok(two_ranks)
    s0, s1 = res[0]["split"]["stats"], res[1]["split"]["stats"]
    assert s0["owners"] == s1["owners"] and s0["owners"]["0"] == {"A": 0, "G": 1}  # 61³ > 51³ > 50³ > 5³
    assert s0["decompositions"] > 0 and s1["decompositions"] > 0 and s0["received"] == s1["decompositions"]
    ref = _params(_single("kfac", widths=SPLIT)[0])
    torch.testing.assert_close(res[0]["split"]["params"], ref, rtol=0, atol=1e-9)
    assert torch.equal(res[0]["split"]["params"], res[1]["split"]["params"])


@pytest.mark.parametrize("method", METHODS)
def test_memory_mode_matches_one_rank_and_holds_each_layer_on_one_rank(two_ranks, method):
    _, res = _ok(two_ranks)
    m0, m1 = res[0][f"memory/{method}"], res[1][f"memory/{method}"]
    single, precond, _ = _single(method)
    torch.testing.assert_close(m0["params"], _params(single), rtol=0, atol=1e-9)
    assert torch.equal(m0["params"], m1["params"])
    s0, s1 = m0["stats"], m1["stats"]
    assert s0["mode"] == "memory" and s0["owners"] == s1["owners"]
    assert all(per["A"] == per["G"] for per in s0["owners"].values()) and _owner_ranks(s0) == {0, 1}
    full = res[0][method]["stats"]["factor_bytes"]  # mode="replicate": every rank holds every factor
    assert 0 < s0["factor_bytes"] < full and 0 < s1["factor_bytes"] < full
    assert s0["bytes_total"]["decompositions"] == 0 and s0["bytes_total"]["preconditioned"] > 0
    assert s0["received"] == 0 and s0["decompositions"] > 0 and s1["decompositions"] > 0
    # precondition() is collective: the owner's result on every rank
    expected = precond.precondition({"2": _probe()})["2"]
    torch.testing.assert_close(m0["precondition"]["2"], expected, rtol=0, atol=1e-9)
    assert torch.equal(m0["precondition"]["2"], m1["precondition"]["2"])


def test_memory_mode_checkpoint_is_complete_on_rank_0(two_ranks):
    out, res = _ok(two_ranks)
    state = torch.load(out / "memory_half.pt", weights_only=False)
    layers = state["preconditioner"]["layers"].values()
    assert all(sd[w]["eigen"] is not None and sd[w].get("brand", ()) is not None for sd in layers for w in "AG")  # both ranks' factors
    resumed = _params(_single("b-kfac", range(HALF, STEPS), state)[0])
    torch.testing.assert_close(resumed, res[0]["memory/b-kfac"]["params"], rtol=0, atol=1e-9)


def test_kfac_preconditioner_is_distributed_automatically_under_a_process_group(two_ranks):
    _, res = _ok(two_ranks)
    assert res[0]["auto"] == res[1]["auto"] == ("DistributedKFACPreconditioner", True)
    assert res[0]["plain"] == res[1]["plain"] == ("KFACPreconditioner", 1)


def test_pluggable_assignment_policy(two_ranks):
    _, res = _ok(two_ranks)
    s0, s1 = res[0]["all_on_last"], res[1]["all_on_last"]
    assert _owner_ranks(s0) == {1}
    assert s0["decompositions"] == 0 and s1["decompositions"] > 0 and s0["received"] == s1["decompositions"]


def test_resume_on_a_different_world_size(two_ranks):
    out, res = _ok(two_ranks)
    # 1 process -> 2 ranks: continues like the uninterrupted 1-process run
    ref = _params(_single("b-kfac")[0])
    torch.testing.assert_close(res[0]["resumed"]["params"], ref, rtol=0, atol=1e-9)
    # 2 ranks -> 1 process: rank 0's checkpoint continues like the uninterrupted 2-rank run
    state = torch.load(out / "two_ranks_half.pt", weights_only=False)
    resumed = _params(_single("b-kfac", range(HALF, STEPS), state)[0])
    torch.testing.assert_close(resumed, res[0]["b-kfac"]["params"], rtol=0, atol=1e-9)


def test_mismatched_configuration_is_a_clear_error_on_every_rank(two_ranks):
    _, res = _ok(two_ranks)
    for r in range(2):
        assert "configured differently" in res[r]["bad_method"] and "method" in res[r]["bad_method"]
        assert "configured differently" in res[r]["bad_layers"] and "layers" in res[r]["bad_layers"]
        assert "`mode`" in res[r]["bad_mode"] and "'fast'" in res[r]["bad_mode"]
        assert "configured differently" in res[r]["mixed_modes"] and "mode: rank 0='replicate'" in res[r]["mixed_modes"]
        assert "ranks disagree" in res[r]["bad_capture"] and "'4'" not in res[r]["bad_capture"]
        assert "4: kinds/dims" in res[r]["bad_capture"]


# ------------------------------------------------------------------ no process group needed
def test_greedy_assignment_is_longest_processing_time_first():
    items = [WorkItem(str(i), c) for i, c in enumerate([1.0, 8.0, 3.0, 5.0, 4.0])]
    owners = GreedyAssignment().assign(items, [0.0, 0.0])
    loads = [sum(it.cost for it, o in zip(items, owners) if o == p) for p in (0, 1)]
    assert owners[1] == 0 and owners[3] == 1 and sorted(loads) == [10.0, 11.0]
    assert GreedyAssignment().assign(items[:1], [5.0, 0.0]) == [1]  # existing loads count


def test_decomposition_cost_follows_the_factor_kind():
    model = _model()
    costs = {}
    for method in ("kfac", "rs-kfac", "b-kfac"):
        precond = KFACPreconditioner(model, method=method, **OPTIONS)
        _run(model, precond, torch.optim.SGD(model.parameters(), lr=0.0), range(1))
        f = precond.layers["0"].A  # d = 61
        costs[method] = decomposition_cost(f, BATCH, oversample=4, n_iter=2)
        precond.remove_hooks()
    assert costs["kfac"] == 61.0**3
    assert costs["rs-kfac"] == 61.0**2 * (8 + 4) * 3
    assert costs["b-kfac"] == 61.0 * (8 + BATCH) ** 2


@pytest.mark.parametrize("method", ["kfac", "rs-kfac", "b-kfac", "br-kfac", "b-kfac-c"])
def test_every_stored_decomposition_is_row_major(method):
    """What an owner keeps has the layout of what a receiver gets from a broadcast (LAPACK returns column-major)."""
    model = _model()
    precond = KFACPreconditioner(model, method=method, **{**OPTIONS, "inv_update_freq": 1})
    _run(model, precond, torch.optim.SGD(model.parameters(), lr=0.1), range(3))
    layouts = _layouts(precond)
    stored = [spec for f in layouts.values() for lr in f.values() if lr is not None for spec in lr]
    assert len(stored) >= 2 * len(layouts)  # a snapshot in every factor
    assert all(stride == torch.empty(shape).stride() for shape, stride in stored), layouts
    precond.remove_hooks()


def _die_on_the_last_rank() -> None:
    if dist.get_rank() == dist.get_world_size() - 1:
        os.abort()  # SIGABRT, as a gloo thread torn down at exit would raise


def _return_3() -> int:
    return 3


def test_a_dying_worker_is_an_exception_in_the_parent_not_a_hang():
    # the other rank waits in spawn's teardown barrier; the launcher ends it when its peer died
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        spawn(_die_on_the_last_rank, 2, timeout=TIMEOUT)
    with pytest.raises(torch.multiprocessing.ProcessExitedException) as exc:
        spawn(_return_3, 2, timeout=TIMEOUT)
    assert exc.value.exit_code == 3


def test_without_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedKFACPreconditioner(_model())
    precond = KFACPreconditioner(_model())
    assert distribute(precond) is precond and type(precond) is KFACPreconditioner


def test_cli_train_nproc_checkpoint_resumes_in_one_process(tmp_path, capsys):
    from onlinela_torch.cli import main

    args = ["-q", "train", "--task", "digits-mlp", "--max-train", "128", "--batch-size", "32", "--optimizer", "kfac",
            "--checkpoint", str(tmp_path / "c.pt")]
    assert main([*args, "--epochs", "1", "--nproc", "2", "--out", str(tmp_path / "a")]) == 0
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["epoch"] == 1 and state["stepper"]["optimizer"]["preconditioner"]["steps"] == 4
    assert main([*args, "--epochs", "2", "--resume", "--out", str(tmp_path / "b")]) == 0
    assert "epoch 2" in capsys.readouterr().out
    assert main([*args, "--epochs", "1", "--nproc", "3", "--out", str(tmp_path / "c")]) == 2  # 32 % 3 != 0

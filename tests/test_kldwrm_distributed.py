"""KLD-WRM under torch.distributed: 2 gloo ranks on CPU give the parameters of 1 process on the global batch.

One spawned 2-rank group (the spawn helper of onlinela_torch.distributed, as
tests/test_distributed.py) runs SO, Q and QE for ``STEPS`` steps on its halves
of fixed batches; the parent runs each variant in one process on the whole
batches.  The model is float32, as in real use.

Tolerance: the two runs differ only in summation order (a gradient averaged
from two half-batch means, Gram matrices summed from two halves, QE's
exact-KL gradient from two halves), i.e. a relative perturbation of order
``ε₃₂ ≈ 1.2e-7`` per step in the gradient and the factors.  The step of each
layer is grafted to length ``≈ lr`` (``graft="unit"``) and the direction is a
damped inverse with relative damping ``λ = 1e-2``, which amplifies a relative
perturbation of its input by at most ``1/λ``; over ``STEPS`` steps the
parameters may then drift by ``STEPS · lr · ε₃₂ / λ`` each, without counting
any contraction: ``atol = STEPS * LR * EPS32 / DAMPING`` (≈ 7e-6 here).  The
ranks themselves must agree bitwise (every rank computes the same step from
the same reduced data).
"""

from __future__ import annotations

import pathlib

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from onlinela_torch import KLDWRM, KLDWRMConfig  # noqa: E402
from rank_runs import results, run_ranks  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]

VARIANTS = ("so", "q", "qe")
STEPS, BATCH, LR, DAMPING = 6, 16, 0.1, 1e-2
EPS32 = torch.finfo(torch.float32).eps
ATOL = STEPS * LR * EPS32 / DAMPING
OPTIONS = dict(damping=DAMPING, factor_update_freq=1, inv_update_freq=2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5))


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 20, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def _train(variant: str, shard: slice, **kw) -> tuple[torch.Tensor, dict]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    kld = KLDWRM(model, opt, variant=variant, **OPTIONS, **kw)
    xs, ys = _batches()
    for k in range(STEPS):
        x, y = xs[k][shard], ys[k][shard]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert kld.step(closure=lambda x=x: model(x))
        opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return params, kld.stats()


def _worker(out: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    res: dict = {v: _train(v, shard, distributed=True) for v in VARIANTS}
    try:  # the ranks' KLD-WRM settings are compared before anything else is exchanged
        KLDWRM(_model(), torch.optim.SGD(_model().parameters(), lr=LR), variant="q", distributed=True,
               config=KLDWRMConfig(rho=0.5 if rank == 0 else 0.4))
        res["mismatch"] = ""
    except ValueError as exc:
        res["mismatch"] = str(exc)
    torch.save(res, pathlib.Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("kldwrm_dist"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_match_one_rank_on_the_same_global_batch(two_ranks, variant):
    res = results(two_ranks)
    torch.set_num_threads(1)
    ref, ref_stats = _train(variant, slice(None))
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert (ref - start).abs().max() > 100 * ATOL  # the run moved far more than the tolerance
    torch.testing.assert_close(res[0][variant][0], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(res[0][variant][0], res[1][variant][0], rtol=0, atol=0)
    for r in res:
        st = r[variant][1]
        assert st["skipped_steps"] == st["inner_fallbacks"] == st["augment_failures"] == 0
        assert st["preconditioner"]["step"] == ref_stats["preconditioner"]["step"] == STEPS


def test_mismatched_kldwrm_settings_are_a_clear_error_on_every_rank(two_ranks):
    res = results(two_ranks)
    for r in res:
        assert "configured differently" in r["mismatch"] and "kldwrm" in r["mismatch"]


def test_distributed_needs_a_process_group_and_replicate_mode():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(RuntimeError, match="init_process_group"):
        KLDWRM(model, opt, distributed=True)
    with pytest.raises(ValueError, match="mode"):
        KLDWRM(model, opt, distributed=True, mode="memory")
    with pytest.raises(TypeError, match="distributed"):
        KLDWRM(model, opt, distributed="yes")

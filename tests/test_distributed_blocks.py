"""Curvature blocks under torch.distributed: 2 gloo ranks give the parameters of 1 process on the global batch.

A small sequence model whose every parameter outside the output Linear is a
curvature block (Embedding, MultiheadAttention, LayerNorm, Conv1d) trains for
``STEPS`` steps under :class:`DistributedKFACPreconditioner` on two equal
halves of fixed batches; the parent trains it in one process on the whole
batches.  The blocks' pending statistics are averaged over the ranks
(``StatisticsSync.average_blocks``), which for equal shards is exactly the
global batch's increment, so the runs differ only in summation order.

Tolerance: float64 throughout.  Each step perturbs the gradient and the
statistics by a relative ``O(ε₆₄)``; the damped inverse (relative damping
``λ``) amplifies a relative perturbation of its input by at most ``1/λ``, and
the unit graft makes each step ``≈ lr`` long, so over ``STEPS`` steps a
parameter may drift by ``STEPS · lr · ε₆₄ / λ``; the softmax attention and
the normalisations add a condition factor we bound by ``10³`` (measured drift
≤ 3e-15 against ``ATOL`` ≈ 1.3e-11).  The ranks must agree bitwise.
"""

from __future__ import annotations

import pathlib

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from onlinela_torch import DistributedKFACPreconditioner, KFACPreconditioner  # noqa: E402
from rank_runs import results, run_ranks  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]

METHODS = ("kfac", "rs-kfac", "b-kfac")
STEPS, BATCH, T, VOCAB, LR, DAMPING = 6, 8, 5, 13, 0.1, 1e-2
ATOL = 1e3 * STEPS * LR * torch.finfo(torch.float64).eps / DAMPING
OPTIONS = dict(damping=DAMPING, factor_update_freq=1, inv_update_freq=2, rank=6, oversample=2, n_iter=2,
               factor_dtype=torch.float64, inv_dtype=torch.float64)
BLOCKS = {"emb", "attn", "norm", "conv"}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net().double()


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS, BATCH, T), generator=g), torch.randint(0, VOCAB, (STEPS, BATCH, T), generator=g)


def _train(method: str, shard: slice, cls: type = KFACPreconditioner, **kw) -> tuple[torch.Tensor, dict]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    pre = cls(model, method=method, optimizer=opt, **OPTIONS, **kw)
    xs, ys = _batches()
    for k in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(xs[k][shard]).reshape(-1, VOCAB), ys[k][shard].reshape(-1)).backward()
        assert pre.step()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), pre.stats()


def _worker(out: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    res: dict = {m: _train(m, shard, DistributedKFACPreconditioner) for m in METHODS}
    res["memory"] = _train("kfac", shard, DistributedKFACPreconditioner, mode="memory")
    plain = KFACPreconditioner(_model(), method="kfac")  # not synchronised: its blocks would differ per rank
    res["plain"] = plain.stats()
    torch.save(res, pathlib.Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("blocks_dist"))


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_match_one_rank_with_curvature_blocks(two_ranks, method):
    res = results(two_ranks)
    torch.set_num_threads(1)
    ref, ref_stats = _train(method, slice(None))
    assert set(ref_stats["blocks"]) == BLOCKS and ref_stats["uncovered"] == []
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert (ref - start).abs().max() > 1e6 * ATOL  # the run moved far more than the tolerance
    torch.testing.assert_close(res[0][method][0], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(res[0][method][0], res[1][method][0], rtol=0, atol=0)
    for r in res:
        st = r[method][1]
        assert set(st["blocks"]) == BLOCKS and st["uncovered"] == []  # every block kept, none reported uncovered
        assert "blocks_unequal_shards" not in st["warnings"]


def test_a_brand_method_keeps_block_factors_dense_under_distributed(two_ranks):
    st = results(two_ranks)[0]["b-kfac"][1]
    kinds = {f["kind"] for b in st["blocks"].values() for f in _factor_summaries(b)}
    assert "randomized" in kinds and kinds <= {"randomized", "diagonal"}  # no Brand rows to average


def _factor_summaries(block_stats: dict) -> list[dict]:
    """The factor summaries inside one block's ``stats()`` entry (Kronecker pairs, attention projections, ...)."""
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            if "kind" in obj and "dim" in obj:
                found.append(obj)
            for v in obj.values():
                walk(v)

    walk(block_stats.get("factors", {}))
    return found


def test_the_single_process_class_under_a_process_group_reports_its_blocks_uncovered(two_ranks):
    for r in results(two_ranks):
        st = r["plain"]
        assert st["blocks"] == {} and st["warnings"]["blocks_distributed"] == 1 and st["warnings"]["not_distributed"] == 1
        uncovered = {u["name"].split(".")[0] for u in st["uncovered"]}
        assert uncovered == BLOCKS and all("DistributedKFACPreconditioner" in u["why"] for u in st["uncovered"])


def test_memory_mode_replicates_the_blocks_and_matches_one_rank(two_ranks):
    res = results(two_ranks)
    torch.set_num_threads(1)
    ref, _ = _train("kfac", slice(None))
    torch.testing.assert_close(res[0]["memory"][0], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(res[0]["memory"][0], res[1]["memory"][0], rtol=0, atol=0)
    assert all(set(r["memory"][1]["blocks"]) == BLOCKS for r in res)

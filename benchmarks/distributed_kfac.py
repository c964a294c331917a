"""Data-parallel K-FAC: communication per step and per-rank decomposition time on 1, 2 and 4 CPU processes.

An MLP ``1024 -> 2048 -> 2048 -> 1024 -> 10`` (tanh; factors of dimension
1025, 2048, 2049, 2048, 2049, 1024, 1025, 10), method ``kfac`` (dense EA +
full ``eigh``), float32, global batch 256 split evenly over the ranks (gloo,
127.0.0.1).  ``--steps`` steps with ``T_updt = 1`` and ``T_inv = 2``, so
every step all-reduces statistics and every other step decomposes.

* P = 1 is the plain single-process :class:`onlinela_torch.KFACPreconditioner`;
  P = 2, 4 use :class:`onlinela_torch.DistributedKFACPreconditioner`
  (layers placed by longest-processing-time on ``d³`` costs).
* Every process runs with ``torch.set_num_threads(1)`` whatever P, so the
  per-rank work compares fairly; with 4 processes on a 2-core machine the
  processes share cores, so the phase times are CPU seconds
  (``timer=time.process_time``), not wall-clock.  Wall-clock seconds per step
  are reported too.
* Issue #7's bar: with 2 ranks the decomposition phase per rank (the slowest
  rank) takes <= 0.6x the 1-rank time.

Usage::

    .venv/bin/python benchmarks/distributed_kfac.py            # widths as above, 1/2/4 processes
    .venv/bin/python benchmarks/distributed_kfac.py --quick    # widths / 4, a smoke run

Writes ``benchmarks/results/distributed_kfac[_quick].json`` and ``.png``.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import platform
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from onlinela_torch import DistributedKFACPreconditioner, KFACPreconditioner
from onlinela_torch.distributed import spawn

logger = logging.getLogger("benchmarks.distributed_kfac")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GLOBAL_BATCH = 256


def _model(widths: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _worker(widths: list[int], steps: int, out: str) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(widths)
    options = dict(method="kfac", factor_update_freq=1, inv_update_freq=2, timer=time.process_time)
    if world == 1:
        precond = KFACPreconditioner(model, **options)
    else:
        precond = DistributedKFACPreconditioner(model, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    local = GLOBAL_BATCH // world
    walls = []
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, widths[0], generator=g)[rank * local : (rank + 1) * local]
        y = torch.randint(0, widths[-1], (GLOBAL_BATCH,), generator=g)[rank * local : (rank + 1) * local]
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()
        walls.append(time.perf_counter() - t0)
    stats = precond.stats()
    payload = {
        "rank": rank,
        "seconds": stats["seconds"],
        "wall_seconds_per_step": sum(walls[1:]) / max(1, len(walls) - 1),
        "distributed": stats.get("distributed"),
        "factor_dims": sorted(f.dim for layer in precond.layers.values() for _, f in layer.factors()),
    }
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(payload))


def _expected_bytes(dims: list[int], widths: list[int], world: int) -> dict[str, int]:
    """The documented formulas (float32): upper-triangle all-reduce, full-rank eigenpairs broadcast, gradients."""
    stats = sum(d * (d + 1) // 2 for d in dims) * 4
    decomp = sum(d * d + d for d in dims) * 4  # eigvecs + eigvals of every factor, each sent once
    grads = sum(a * b + b for a, b in zip(widths[:-1], widths[1:])) * 4
    return {"statistics_per_step": stats, "decompositions_per_round": decomp, "gradients_per_step": grads}


def run(widths: list[int], steps: int, worlds: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for world in worlds:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            spawn(_worker, world, (widths, steps, out), timeout=datetime.timedelta(minutes=10))
            ranks = [json.loads(pathlib.Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        decomp = [r["seconds"]["decomposition"] for r in ranks]
        entry: dict[str, Any] = {
            "decomposition_cpu_seconds_per_rank": decomp,
            "decomposition_cpu_seconds_max": max(decomp),
            "wall_seconds_per_step_max": max(r["wall_seconds_per_step"] for r in ranks),
            "run_wall_seconds": time.perf_counter() - t0,
            "factor_dims": ranks[0]["factor_dims"],
        }
        if world > 1:
            d = [r["distributed"] for r in ranks]
            entry["owners"] = d[0]["owners"]
            entry["decompositions_per_rank"] = [x["decompositions"] for x in d]
            entry["bytes_per_step_rank0"] = {k: v / steps for k, v in d[0]["bytes_total"].items()}
            entry["bytes_per_step_rank0_total"] = sum(d[0]["bytes_total"].values()) / steps
            entry["communication_seconds_per_rank"] = [x["communication_seconds"] for x in d]
            entry["expected_bytes"] = _expected_bytes(ranks[0]["factor_dims"], widths, world)
        results[str(world)] = entry
        logger.info("P=%d: decomposition CPU s per rank %s", world, [f"{s:.2f}" for s in decomp])
    base = results[str(worlds[0])]["decomposition_cpu_seconds_max"]
    for entry in results.values():
        entry["ratio_to_1_rank"] = entry["decomposition_cpu_seconds_max"] / base
    return results


def _plot(path: pathlib.Path, results: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    worlds = list(results)
    for i, w in enumerate(worlds):
        per_rank = results[w]["decomposition_cpu_seconds_per_rank"]
        ax1.scatter([i] * len(per_rank), per_rank, color="C0", zorder=3)
        ax1.bar(i, max(per_rank), color="C0", alpha=0.4)
        ax1.annotate(f"{results[w]['ratio_to_1_rank']:.2f}x", (i, max(per_rank)), ha="center", va="bottom")
    ax1.axhline(0.6 * results[worlds[0]]["decomposition_cpu_seconds_max"], color="C3", ls="--", label="bar: 0.6 x 1 rank")
    ax1.set_xticks(range(len(worlds)), [f"P={w}" for w in worlds])
    ax1.set_ylabel("decomposition CPU seconds per rank (dots), max (bar)")
    ax1.legend()
    bottom = [0.0] * len(worlds)
    cats = ("statistics", "decompositions", "gradients", "control", "brand_rows")
    for c, cat in enumerate(cats):
        vals = [results[w].get("bytes_per_step_rank0", {}).get(cat, 0.0) / 2**20 for w in worlds]
        ax2.bar(range(len(worlds)), vals, bottom=bottom, label=cat, color=f"C{c}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(range(len(worlds)), [f"P={w}" for w in worlds])
    ax2.set_ylabel("MiB per step at rank 0 (mean)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths / 4 and 4 steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (decompositions on even steps)")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated process counts (first is the baseline)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    widths = [1024, 2048, 2048, 1024, 10]
    if args.quick:
        widths = [w // 4 if w > 10 else w for w in widths]
    worlds = [int(w) for w in args.worlds.split(",")]
    results = run(widths, args.steps, worlds)
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": "distributed_kfac",
        "model": f"MLP {' -> '.join(map(str, widths))} (tanh), float32, method kfac",
        "global_batch": GLOBAL_BATCH,
        "steps": args.steps,
        "schedule": {"factor_update_freq": 1, "inv_update_freq": 2},
        "threads_per_process": 1,
        "timer": "time.process_time (CPU seconds of each process)",
        "backend": "gloo on 127.0.0.1",
        "bar": "P=2: max per-rank decomposition time <= 0.6 x P=1",
        "results": results,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    (RESULTS / f"distributed_kfac{suffix}.json").write_text(json.dumps(payload, indent=2))
    _plot(RESULTS / f"distributed_kfac{suffix}.png", results, payload["model"] + f", batch {GLOBAL_BATCH}")
    logger.info("wrote %s", RESULTS / f"distributed_kfac{suffix}.json")


if __name__ == "__main__":
    main()

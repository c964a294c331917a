"""Data-parallel K-FAC: per-rank decomposition time, factor memory and bytes per step on 1, 2 and 4 CPU processes.

An MLP ``1024 -> 2048 -> 2048 -> 1024 -> 10`` (tanh; factors of dimension
1025, 2048, 2049, 2048, 2049, 1024, 1025, 10), method ``kfac`` (dense EA +
full ``eigh``), float32, global batch 256 split evenly over the ranks (gloo,
127.0.0.1).  ``--steps`` steps with ``T_updt = 1`` and ``T_inv = 2``.

* P = 1 is the plain single-process :class:`onlinela_torch.KFACPreconditioner`;
  P = 2, 4 use :class:`onlinela_torch.DistributedKFACPreconditioner` in both
  modes: ``replicate`` (factors placed one by one, longest processing time
  first on ``d³`` costs; every rank keeps every factor) and ``memory`` (layers
  placed; only the owner keeps a layer's factors and broadcasts its
  preconditioned gradient).
* How time is measured.  Every process runs with ``torch.set_num_threads(1)``
  whatever P, so per-rank work compares fairly.  The machine has 2 cores, so
  4 processes share them: the phase times are each process's CPU seconds
  (``timer=time.process_time``), not wall-clock, and the figure of merit is
  the slowest rank's decomposition CPU seconds (the critical path when every
  rank has a core of its own).  A second, contention-free figure: every
  factor's ``eigh`` is timed once in the P = 1 process, and the makespan of
  an assignment is the largest sum of those times over a rank's factors
  (``modelled_*``); it is also given for the per-layer assignment of the
  previous version (the unit was the layer).
* Memory: ``factor_bytes`` is what each rank holds between steps (EAs,
  eigenvectors, eigenvalues).
* Bars (issue 14): P = 4 ``replicate`` decomposition <= 0.35x of P = 1; the
  ``memory`` mode cuts the per-rank factor memory by >= 2x at P = 4.

``--agreement N`` instead runs the test-sized model (60-80-40-4, float64)
for ``N`` steps on 2 ranks with ``kfac``, ``rs-kfac`` and ``b-kfac`` in both
modes and records, per step, whether the two ranks' parameters are bitwise
equal (issue 15: identical ranks over 300 steps), plus the exit status of
every spawned group.

Usage::

    .venv/bin/python benchmarks/distributed_kfac.py               # 1/2/4 processes, both modes
    .venv/bin/python benchmarks/distributed_kfac.py --quick       # widths / 4, a smoke run
    .venv/bin/python benchmarks/distributed_kfac.py --agreement 300

Writes ``benchmarks/results/distributed_kfac[_quick].json`` and ``.png``, or
``benchmarks/results/distributed_agreement.json``.  Timings are reported,
never asserted.
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

from onlinela_torch import DistributedKFACPreconditioner, GreedyAssignment, KFACPreconditioner
from onlinela_torch.distributed import WorkItem, spawn

logger = logging.getLogger("benchmarks.distributed_kfac")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GLOBAL_BATCH = 256
TIMEOUT = datetime.timedelta(minutes=10)


def _model(widths: list[int], dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _factor_bytes(precond: KFACPreconditioner) -> int:
    """Bytes of the EAs, snapshots and Brand states held (shared storages once)."""
    held: dict[int, int] = {}
    for layer in precond.layers.values():
        for _, f in layer.factors():
            tensors = [f.ea] if f.ea is not None else []
            for lr in (None if f.eigen is None else f.eigen.approx, getattr(f, "brand", None)):
                if lr is not None:
                    tensors += [lr.eigvecs, lr.eigvals]
            for t in tensors:
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(held.values())


def _eigh_seconds(precond: KFACPreconditioner) -> dict[str, float]:
    """CPU seconds of one decomposition of every factor's current EA (best of 2), as the preconditioner runs it."""
    out = {}
    for name, layer in precond.layers.items():
        for which, f in layer.factors():
            M = f.ea.to(f.inv_dtype)
            best = float("inf")
            for _ in range(2):
                t0 = time.process_time()
                f._decompose(M, precond.steps, 1e-3)
                best = min(best, time.process_time() - t0)
            out[f"{name}/{which}"] = best
    return out


def _worker(widths: list[int], steps: int, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(widths)
    options = dict(method="kfac", factor_update_freq=1, inv_update_freq=2, timer=time.process_time)
    if world == 1:
        precond = KFACPreconditioner(model, **options)
    else:
        precond = DistributedKFACPreconditioner(model, mode=mode, **options)
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
        "factor_bytes": _factor_bytes(precond),
        "factor_dims": {f"{n}/{w}": f.dim for n, layer in precond.layers.items() for w, f in layer.factors()},
        "eigh_seconds": _eigh_seconds(precond) if world == 1 else None,
    }
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(payload))


def _makespan(seconds: dict[str, float], owners: dict[str, int], world: int) -> float:
    loads = [0.0] * world
    for factor, s in seconds.items():
        loads[owners[factor]] += s
    return max(loads)


def _per_layer_owners(dims: dict[str, int], world: int) -> dict[str, int]:
    """The previous version's assignment: whole layers, LPT on the sum of their factors' ``d³``."""
    layers: dict[str, float] = {}
    for factor, d in dims.items():
        layers[factor.rsplit("/", 1)[0]] = layers.get(factor.rsplit("/", 1)[0], 0.0) + float(d) ** 3
    names = list(layers)
    owners = GreedyAssignment().assign([WorkItem(n, layers[n]) for n in names], [0.0] * world)
    by_layer = dict(zip(names, owners))
    return {factor: by_layer[factor.rsplit("/", 1)[0]] for factor in dims}


def _flat_owners(owners: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f"{layer}/{which}": rank for layer, per in owners.items() for which, rank in per.items()}


def _expected_bytes(dims: list[int], widths: list[int]) -> dict[str, int]:
    """The documented formulas (float32): upper-triangle reduce, full-rank eigenpairs, (preconditioned) gradients."""
    stats = sum(d * (d + 1) // 2 for d in dims) * 4
    decomp = sum(d * d + d for d in dims) * 4  # eigvecs + eigvals of every factor, each sent once
    grads = sum(a * b + b for a, b in zip(widths[:-1], widths[1:])) * 4
    return {"statistics_per_step": stats, "decompositions_per_round": decomp, "gradients_per_step": grads}


def _one(widths: list[int], steps: int, world: int, mode: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        spawn(_worker, world, (widths, steps, mode, out), timeout=TIMEOUT)
        return [json.loads(pathlib.Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def run(widths: list[int], steps: int, worlds: list[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    base = _one(widths, steps, 1, "replicate")[0]
    results: dict[str, Any] = {
        "1": {
            "decomposition_cpu_seconds_per_rank": [base["seconds"]["decomposition"]],
            "decomposition_cpu_seconds_max": base["seconds"]["decomposition"],
            "preconditioning_cpu_seconds_per_rank": [base["seconds"]["preconditioning"]],
            "wall_seconds_per_step_max": base["wall_seconds_per_step"],
            "factor_bytes_per_rank": [base["factor_bytes"]],
            "run_wall_seconds": time.perf_counter() - t0,
        }
    }
    eigh, dims = base["eigh_seconds"], base["factor_dims"]
    total_eigh = sum(eigh.values())
    for world in worlds:
        if world == 1:
            continue
        for mode in ("replicate", "memory"):
            t0 = time.perf_counter()
            ranks = _one(widths, steps, world, mode)
            d = [r["distributed"] for r in ranks]
            decomp = [r["seconds"]["decomposition"] for r in ranks]
            owners = _flat_owners(d[0]["owners"])
            entry = {
                "decomposition_cpu_seconds_per_rank": decomp,
                "decomposition_cpu_seconds_max": max(decomp),
                "ratio_to_1_rank": max(decomp) / results["1"]["decomposition_cpu_seconds_max"],
                "modelled_makespan_ratio": _makespan(eigh, owners, world) / total_eigh,
                "preconditioning_cpu_seconds_per_rank": [r["seconds"]["preconditioning"] for r in ranks],
                "wall_seconds_per_step_max": max(r["wall_seconds_per_step"] for r in ranks),
                "factor_bytes_per_rank": [r["factor_bytes"] for r in ranks],
                "factor_memory_reduction": base["factor_bytes"] / max(r["factor_bytes"] for r in ranks),
                "owners": owners,
                "decompositions_per_rank": [x["decompositions"] for x in d],
                "bytes_per_step_rank0": {k: v / steps for k, v in d[0]["bytes_total"].items()},
                "bytes_per_step_rank0_total": sum(d[0]["bytes_total"].values()) / steps,
                "communication_seconds_per_rank": [x["communication_seconds"] for x in d],
                "run_wall_seconds": time.perf_counter() - t0,
            }
            results[f"{world}/{mode}"] = entry
            logger.info(
                "P=%d %s: decomposition CPU s per rank %s (%.2fx), factor MiB per rank %s",
                world, mode, [f"{s:.2f}" for s in decomp], entry["ratio_to_1_rank"],
                [f"{b / 2**20:.0f}" for b in entry["factor_bytes_per_rank"]],
            )
        results[f"{world}/per-layer (previous version, modelled)"] = {
            "modelled_makespan_ratio": _makespan(eigh, _per_layer_owners(dims, world), world) / total_eigh
        }
    return {
        "results": results,
        "eigh_cpu_seconds_per_factor": eigh,
        "factor_dims": dims,
        "expected_bytes": _expected_bytes(sorted(dims.values()), widths),
    }


# ------------------------------------------------------------------ rank agreement (issue 15)
AGREE_WIDTHS = [60, 80, 40, 4]
AGREE_OPTIONS = dict(rank=8, oversample=4, n_iter=2, factor_update_freq=1, inv_update_freq=2, damping=1e-2, kl_clip=None)


def _agreement_worker(method: str, mode: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(AGREE_WIDTHS, torch.float64)
    precond = DistributedKFACPreconditioner(
        model, method=method, mode=mode, factor_dtype=torch.float64, inv_dtype=torch.float64, **AGREE_OPTIONS
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    differing, max_diff = [], 0.0
    for k in range(steps):
        x = torch.randn(16, 60, generator=g, dtype=torch.float64)[rank * 8 : (rank + 1) * 8]
        y = torch.randn(16, 4, generator=g, dtype=torch.float64)[rank * 8 : (rank + 1) * 8]
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        precond.step()
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        both = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(both, flat)
        diff = float((both[0] - both[1]).abs().max())
        max_diff = max(max_diff, diff)
        if diff != 0.0 or not torch.equal(both[0], both[1]):
            differing.append(k)
    if rank == 0:
        pathlib.Path(out, "agreement.json").write_text(json.dumps({"differing_steps": differing, "max_abs_diff": max_diff}))


def agreement(steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("replicate", "memory"):
        for method in ("kfac", "rs-kfac", "b-kfac"):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                try:
                    spawn(_agreement_worker, 2, (method, mode, steps, tmp), timeout=TIMEOUT)
                    res = json.loads(pathlib.Path(tmp, "agreement.json").read_text())
                    res["exit"] = "ok"
                except Exception as exc:  # recorded: a dead worker is a finding, not a crash of the benchmark
                    res = {"exit": f"{type(exc).__name__}: {exc}"}
                res["wall_seconds"] = time.perf_counter() - t0
            out[f"{mode}/{method}"] = res
            logger.info("%s/%s: %s", mode, method, res)
    return out


# ------------------------------------------------------------------ output
def _plot(path: pathlib.Path, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    runs = [k for k in results if "decomposition_cpu_seconds_per_rank" in results[k]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = results["1"]["decomposition_cpu_seconds_max"]
    for i, key in enumerate(runs):
        per_rank = results[key]["decomposition_cpu_seconds_per_rank"]
        ax1.scatter([i] * len(per_rank), per_rank, color="C0", zorder=3, label="each rank" if i == 0 else None)
        ax1.bar(i, max(per_rank), color="C0", alpha=0.35, label="slowest rank" if i == 0 else None)
        ax1.annotate(f"{max(per_rank) / base:.2f}x", (i, max(per_rank)), ha="center", va="bottom")
    ax1.axhline(0.35 * base, color="C3", ls="--", label="bar: 0.35 x P=1 (P=4)")
    ax1.set_xticks(range(len(runs)), [k.replace("/", "\n") for k in runs])
    ax1.set_ylabel("decomposition CPU seconds per rank")
    ax1.set_title("decomposition work per rank (1 thread each)")
    ax1.legend(fontsize=8)
    mem = [max(results[k]["factor_bytes_per_rank"]) / 2**20 for k in runs]
    ax2.bar(range(len(runs)), mem, color="C2")
    for i, m in enumerate(mem):
        ax2.annotate(f"{mem[0] / m:.1f}x less", (i, m), ha="center", va="bottom", fontsize=8)
    ax2.axhline(mem[0] / 2, color="C3", ls="--", label="bar: 2x less than P=1 (P=4 memory)")
    ax2.legend(fontsize=8)
    ax2.set_xticks(range(len(runs)), [k.replace("/", "\n") for k in runs])
    ax2.set_ylabel("factor memory of the largest rank (MiB)")
    ax2.set_title("factor memory per rank (EAs + eigenpairs)")
    fig.suptitle(payload["model"] + f", batch {GLOBAL_BATCH}, {payload['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "machine": platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths / 4 (a smoke run)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (T_inv = 2)")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated process counts (1 is the baseline)")
    parser.add_argument("--agreement", type=int, default=0, metavar="N", help="run the 2-rank agreement check for N steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    RESULTS.mkdir(exist_ok=True)
    if args.agreement:
        payload = {
            "benchmark": "distributed_agreement",
            "model": f"MLP {AGREE_WIDTHS} (tanh), float64, 2 gloo ranks of 8 rows each, SGD momentum 0.9",
            "steps": args.agreement,
            "options": AGREE_OPTIONS,
            "results": agreement(args.agreement),
            "environment": _environment(),
        }
        (RESULTS / "distributed_agreement.json").write_text(json.dumps(payload, indent=2))
        return
    widths = [1024, 2048, 2048, 1024, 10]
    if args.quick:
        widths = [w // 4 if w > 10 else w for w in widths]
    worlds = sorted({1, *(int(w) for w in args.worlds.split(","))})
    suffix = "_quick" if args.quick else ""
    payload = {
        "benchmark": "distributed_kfac",
        "model": f"MLP {' -> '.join(map(str, widths))} (tanh), float32, method kfac",
        "global_batch": GLOBAL_BATCH,
        "steps": args.steps,
        "schedule": {"factor_update_freq": 1, "inv_update_freq": 2},
        "threads_per_process": 1,
        "timer": "time.process_time (CPU seconds of each process; 4 processes share 2 cores)",
        "backend": "gloo on 127.0.0.1",
        "bars": {"P=4 replicate": "slowest rank's decomposition <= 0.35 x P=1",
                 "P=4 memory": "per-rank factor memory >= 2x smaller than P=1"},
        **run(widths, args.steps, worlds),
        "environment": _environment(),
    }
    (RESULTS / f"distributed_kfac{suffix}.json").write_text(json.dumps(payload, indent=2))
    _plot(RESULTS / f"distributed_kfac{suffix}.png", payload)
    logger.info("wrote %s", RESULTS / f"distributed_kfac{suffix}.json")


if __name__ == "__main__":
    main()

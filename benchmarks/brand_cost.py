"""Benchmark: calibrate and check the Brand-eligibility cost model (``onlinela_torch.brand_cost``).

A Brand method keeps a factor as Brand-updated eigenpairs only when that is
cheaper per step than the randomized fallback it would otherwise run (issue
13.3, issue 14.4).  The rule is a flop model with two penalties for the small
dense kernels (``eigh`` of the ``(r+s)``-square core, Householder QR of the
``d × k`` sketches), which run far below GEMM speed; this script measures

* ``brand``      -- ``onlinela.brand_update`` of a rank-``r`` state with ``s`` new columns;
* ``ea``         -- the dense EA update ``M ← ρM + (1-ρ)XXᵀ`` (one ``d × s`` Gram and an axpy);
* ``randomized`` -- ``onlinela.randomized_eigh(M, r, method="svd", oversample=10, n_iter=3)``,
  the Brand methods' default fallback (``BrandConfig.fallback``, the preconditioner's sketch);
* ``gemm``       -- a ``d × d @ d × 256`` float32 product, the rate the model's flops are divided by,

on torch float32 tensors with one thread (process CPU time, best of ``--repeats``),
fits the two penalties by least squares on the relative error, and reports how
often the model's choice agrees with the measured one over the grid and what a
wrong choice costs.  Writes ``benchmarks/results/brand_cost.json`` and ``.png``.
Never asserts timings.

Usage::

    .venv/bin/python benchmarks/brand_cost.py           # d = 256 ... 4096
    .venv/bin/python benchmarks/brand_cost.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
from typing import Any

import numpy as np
import torch

import onlinela
from onlinela import LowRankPSD, brand_update, randomized_eigh
from onlinela_torch import brand_cost
from timing import best_process_time

ROOT = pathlib.Path(__file__).resolve().parent
DECAY = 0.95
OVERSAMPLE, N_ITER = 10, 3


def _state(d: int, r: int, gen: torch.Generator) -> LowRankPSD:
    U, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    w = 0.97 ** torch.arange(r, dtype=torch.float32)
    return LowRankPSD(U.contiguous(), w)


def measure(d: int, r: int, s: int, repeats: int, gen: torch.Generator) -> dict[str, float]:
    """Seconds of one Brand update, one dense EA update and one randomized decomposition at ``(d, r, s)``."""
    state = _state(d, r, gen)
    X = torch.randn(d, s, generator=gen) / s**0.5
    M = (state.eigvecs * state.eigvals) @ state.eigvecs.T + X @ X.T
    rows = X.T.contiguous()
    ea = M.clone()

    def ea_update() -> None:
        g = rows.T @ rows
        ea.mul_(DECAY).add_(g, alpha=1 - DECAY)

    rng = np.random.default_rng(0)
    return {
        "brand": best_process_time(lambda: brand_update(state, X, decay=DECAY, rank=r, check_inputs=False), repeats),
        "ea": best_process_time(ea_update, repeats),
        "randomized": best_process_time(
            lambda: randomized_eigh(M, r, method="svd", oversample=OVERSAMPLE, n_iter=N_ITER, rng=rng, check_inputs=False),
            repeats,
        ),
    }


def gemm_rate(d: int, repeats: int, gen: torch.Generator) -> float:
    """float32 GEMM flops per second of ``(d, d) @ (d, 256)``."""
    A, B = torch.randn(d, d, generator=gen), torch.randn(d, 256, generator=gen)
    return 2.0 * d * d * 256 / best_process_time(lambda: A @ B, repeats)


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Penalties ``(eigh, qr, ea)`` minimising the squared relative error of the modelled seconds."""
    out = {}
    for op, terms in (("brand", brand_cost.brand_terms), ("randomized", brand_cost.randomized_terms)):
        F = np.array([terms(*row["shape"][:2], OVERSAMPLE, N_ITER) if op == "randomized" else terms(*row["shape"])
                      for row in rows]) / np.array([[row["gemm_rate"]] for row in rows])
        t = np.array([row[op] for row in rows])
        # t ≈ F[:, 0] + p F[:, 1]  ->  least squares on (t - F0)/t = p F1/t
        y, x = (t - F[:, 0]) / t, F[:, 1] / t
        out[op] = max(float(x @ y / (x @ x)), 1.0)
    F = np.array([brand_cost.ea_flops(row["shape"][0], row["shape"][2]) / row["gemm_rate"] for row in rows])
    t = np.array([row["ea"] for row in rows])
    out["ea"] = max(float(np.median(t / F)), 1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--t-updt", type=int, default=10, help="T_updt = T_B of the decision (default 10)")
    ap.add_argument("--t-inv", type=int, default=50, help="T_inv of the decision (default 50)")
    ap.add_argument("--out", default=str(ROOT / "results" / "brand_cost.json"))
    ap.add_argument("--refit", metavar="JSON", help="reuse the timings of a written JSON: fit and decide only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    dims = (128, 256) if args.quick else (256, 512, 1024, 2048, 4096)
    ranks = (16,) if args.quick else (32, 64, 128, 220)
    incs = (16, 64) if args.quick else (32, 128, 256, 512)
    repeats = 1 if args.quick else args.repeats
    rows = [] if args.refit is None else [
        {k: row[k] for k in ("shape", "gemm_rate", "brand", "ea", "randomized")}
        for row in json.loads(pathlib.Path(args.refit).read_text())["rows"]
    ]
    for d in dims if args.refit is None else ():
        rate = gemm_rate(d, repeats, gen)
        for r in ranks:
            for s in incs:
                if r + s >= d or r + OVERSAMPLE >= d:
                    continue
                row = {"shape": [d, r, s], "gemm_rate": rate, **measure(d, r, s, repeats, gen)}
                rows.append(row)
                pathlib.Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}))
                print(f"d={d:5d} r={r:3d} s={s:3d}  brand {row['brand'] * 1e3:8.2f} ms  ea {row['ea'] * 1e3:8.2f} ms  "
                      f"randomized {row['randomized'] * 1e3:8.2f} ms")
    fitted = fit(rows)
    model = brand_cost.BrandCostModel()
    agree, regret = 0, []
    for row in rows:
        d, r, s = row["shape"]
        brand_step = row["brand"] / args.t_updt
        fallback_step = row["ea"] / args.t_updt + row["randomized"] / args.t_inv
        measured = brand_step < fallback_step
        chosen = model.pays(d, r, s, t_brand=args.t_updt, t_updt=args.t_updt, t_inv=args.t_inv,
                            oversample=OVERSAMPLE, n_iter=N_ITER)
        row.update(brand_per_step=brand_step, fallback_per_step=fallback_step, measured_pays=measured,
                   model_pays=chosen, rank_rule_pays=r + s < d)
        agree += chosen == measured
        taken = brand_step if chosen else fallback_step
        regret.append(taken / min(brand_step, fallback_step))
    result = {
        "benchmark": "brand_cost",
        "settings": {"dims": dims, "ranks": ranks, "increments": incs, "decay": DECAY, "oversample": OVERSAMPLE,
                     "n_iter": N_ITER, "t_updt": args.t_updt, "t_inv": args.t_inv, "repeats": repeats,
                     "clock": "process CPU time, one torch thread"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "onlinela": onlinela.__version__},
        "fitted_penalties": fitted,
        "model_penalties": {"eigh": model.eigh_penalty, "qr": model.qr_penalty, "ea": model.ea_penalty},
        "agreement": agree / len(rows),
        "rank_rule_agreement": sum(r["rank_rule_pays"] == r["measured_pays"] for r in rows) / len(rows),
        "worst_regret": max(regret),
        "median_regret": float(np.median(regret)),
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(result, out.with_suffix(".png"))
    print(f"fitted penalties {fitted}; the model's choice agrees with the measured one on "
          f"{result['agreement']:.0%} of {len(rows)} shapes (r + s < d: {result['rank_rule_agreement']:.0%}); "
          f"worst regret {result['worst_regret']:.2f}x -> {out}")
    return 0


def _plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result["rows"]:
        ratio = row["brand_per_step"] / row["fallback_per_step"]
        ax.scatter(row["shape"][0], ratio, c="C0" if row["model_pays"] else "C3", s=12)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="d", ylabel="Brand / fallback seconds per step",
           title="Brand eligibility (blue: the model picks Brand)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

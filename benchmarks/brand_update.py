"""Benchmark: Brand's online update vs recomputing the eigendecomposition of the EA factor.

For each dimension d the state is an orthonormal U (d x r) with descending
eigenvalues and the data X is d x n (float32).  Timed, best of ``--repeats``:

* ``brand``      -- ``onlinela.brand_update(M, X, decay=0.95, rank=r)``: the O(d (r+n)^2 + (r+n)^3) update;
* ``floor``      -- the flop count of the update's algorithm (algorithms.md §4: two projection
  GEMMs, Householder QR of the d x n residual with Q formed, the core product, a
  (r+n)-square eigh counted as 9 (r+n)^3, the rotation [U Q] W_r) divided by this
  machine's float32 GEMM rate, measured on a 4096 x 4096 @ 4096 x 230 product next to every
  timing (the peak over the run is used, so the ratio is conservative);
* ``randomized`` -- ``onlinela.randomized_eigh(A, r, method=...)`` of the dense factor
  A = decay U diag(w) Uᵀ + (1 - decay) X Xᵀ (O(d^2 (r+l)(q+1)); A itself is built outside the timer,
  its EA update 2 d^2 n flops is reported as ``dense_ea_update``);
* ``dense``      -- ``numpy.linalg.eigh(A)`` (LAPACK syevd, O(d^3)); where the O(d^3) extrapolation from
  the largest measured size exceeds ``--dense-limit`` seconds (default 60) it is extrapolated, not run,
  and marked so in the JSON.

Writes ``benchmarks/results/brand_update.json`` and ``.png`` (matplotlib Agg).  Never asserts timings.

Usage::

    .venv/bin/python benchmarks/brand_update.py            # d in 1024 ... 16384, r = 220, n = 256
    .venv/bin/python benchmarks/brand_update.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import time
from typing import Any, Callable

import numpy as np

import onlinela
from onlinela import LowRankPSD, brand_update

logger = logging.getLogger("benchmarks.brand_update")
ROOT = pathlib.Path(__file__).resolve().parent
DECAY = 0.95


def _cpu_idle_fraction(interval: float = 0.2) -> float:
    """Fraction of all CPUs idle over ``interval`` seconds (Linux /proc/stat; 1.0 elsewhere)."""
    try:
        def read() -> tuple[int, int]:
            with open("/proc/stat") as fh:
                vals = [int(v) for v in fh.readline().split()[1:]]
            return vals[3] + vals[4], sum(vals)  # idle + iowait, total

        i0, t0 = read()
        time.sleep(interval)
        i1, t1 = read()
        return (i1 - i0) / max(t1 - t0, 1)
    except (OSError, ValueError, IndexError):
        return 1.0


QUIET = {"waits": 0, "gave_up": 0}


def _wait_quiet(max_wait: float) -> None:
    """On a shared machine, wait (up to ``max_wait`` s) until the CPUs are >= 80% idle before timing."""
    deadline = time.monotonic() + max_wait
    while _cpu_idle_fraction() < 0.8:
        QUIET["waits"] += 1
        if time.monotonic() > deadline:
            QUIET["gave_up"] += 1
            return


def _best(f: Callable[[], Any], repeats: int, quiet: float = 0.0) -> float:
    f()  # warm-up (allocations, BLAS threads)
    ts = []
    for _ in range(repeats):
        if quiet:
            _wait_quiet(quiet)
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def gemm_rate(repeats: int = 3, quiet: float = 0.0) -> float:
    """float32 GEMM flop rate (flop/s) on 4096 x 4096 @ 4096 x 230."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4096, 4096), dtype=np.float32)
    B = rng.standard_normal((4096, 230), dtype=np.float32)
    return 2 * 4096 * 4096 * 230 / _best(lambda: A @ B, repeats, quiet)


def brand_flops(d: int, r: int, n: int) -> dict[str, float]:
    """Flops of the §4 algorithm with truncation to rank r (the floor's numerator)."""
    k = r + n
    parts = {
        "projection U^T X": 2.0 * d * r * n,
        "residual X - U P": 2.0 * d * r * n,
        "thin QR of residual (Householder, Q formed)": 4.0 * d * n * n - 4.0 / 3.0 * n**3,
        "core [P;R][P;R]^T": 2.0 * k * k * n,
        "core eigh (9 k^3)": 9.0 * k**3,
        "rotation [U Q] W_r": 2.0 * d * k * r,
    }
    parts["total"] = sum(parts.values())
    return parts


def _state(d: int, r: int, n: int, seed: int) -> tuple[LowRankPSD, np.ndarray]:
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((d, r), dtype=np.float32))[0]
    w = np.sort(rng.uniform(0.01, 1.0, r).astype(np.float32))[::-1].copy()
    X = (rng.standard_normal((d, n), dtype=np.float32) / np.float32(np.sqrt(n))).astype(np.float32)
    return LowRankPSD(U, w), X


def _dense_factor(M: LowRankPSD, X: np.ndarray) -> np.ndarray:
    U, w = M.eigvecs, M.eigvals
    A = (U * (np.float32(DECAY) * w)) @ U.T
    A += np.float32(1 - DECAY) * (X @ X.T)
    return (A + A.T) / np.float32(2)


def _slope(ds: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ds), np.log(ts), 1)[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    dims, r, n = args.dims, args.rank, args.batch
    rand_eigh = getattr(onlinela, "randomized_eigh", None)
    if rand_eigh is None:
        try:
            from onlinela.randomized import randomized_eigh as rand_eigh  # not exported yet
        except ImportError:
            rand_eigh = None
    rates: list[float] = []
    rows: list[dict[str, Any]] = []
    dense_measured: list[tuple[int, float]] = []
    for d in dims:
        M, X = _state(d, r, n, seed=d)
        rate = gemm_rate(quiet=args.quiet)
        t_brand = _best(lambda: brand_update(M, X, decay=DECAY, rank=r), args.repeats, args.quiet)
        rate = max(rate, gemm_rate(quiet=args.quiet))  # before and after: the machine may be shared
        rates.append(rate)
        out = brand_update(M, X, decay=DECAY, rank=r)
        U = out.eigvecs.astype(np.float64)
        orth = float(np.abs(U.T @ U - np.eye(U.shape[1])).max())
        row: dict[str, Any] = {
            "d": d,
            "brand_s": t_brand,
            "brand_orthonormality_max_abs": orth,
            "gemm_rate_adjacent_gflops": rate / 1e9,
            "flops": brand_flops(d, r, n)["total"],
        }
        A = _dense_factor(M, X)
        # the dense methods must also keep the d x d EA up to date: rho A + (1 - rho) X X^T
        row["dense_ea_update_s"] = _best(lambda: np.float32(DECAY) * A + np.float32(1 - DECAY) * (X @ X.T), 1)
        if rand_eigh is not None:
            for method in args.methods:
                row[f"randomized_{method}_s"] = _best(lambda: rand_eigh(A, r, method=method, rng=0), max(1, args.repeats // 3))
        # dense eigh: run when the O(d^3) extrapolation stays under the limit
        pred = None
        if dense_measured:
            d0, t0 = dense_measured[-1]
            pred = t0 * (d / d0) ** 3
        if pred is None or pred <= args.dense_limit:
            if d >= 4096:  # single run: a warm-up would double minutes of LAPACK
                t0 = time.perf_counter()
                np.linalg.eigh(A)
                t = time.perf_counter() - t0
            else:
                t = _best(lambda: np.linalg.eigh(A), 1)
            dense_measured.append((d, t))
            row["dense_eigh_s"], row["dense_eigh_extrapolated"] = t, False
        else:
            row["dense_eigh_s"], row["dense_eigh_extrapolated"] = pred, True
        del A
        rows.append(row)
        logger.info("d=%d brand %.4fs dense %.3gs%s", d, t_brand, row["dense_eigh_s"], " (extrapolated)" if row["dense_eigh_extrapolated"] else "")
    peak = max(rates)
    for row in rows:
        row["floor_s"] = row["flops"] / peak
        row["brand_over_floor"] = row["brand_s"] / row["floor_s"]
        row["brand_over_floor_adjacent_rate"] = row["brand_s"] / (row["flops"] / (row["gemm_rate_adjacent_gflops"] * 1e9))
        row["dense_over_brand"] = row["dense_eigh_s"] / row["brand_s"]
        # load-independent comparison: the tridiagonal reduction alone is (4/3) d^3 flops; counted at
        # the peak GEMM rate (LAPACK runs half of it as BLAS-2, so the real time is larger)
        row["dense_eigh_flop_lower_bound_s"] = 4.0 / 3.0 * row["d"] ** 3 / peak
        row["dense_lower_bound_over_brand"] = row["dense_eigh_flop_lower_bound_s"] / row["brand_s"]
    ds = [row["d"] for row in rows]
    slopes = {"brand": _slope(ds, [row["brand_s"] for row in rows]), "floor": _slope(ds, [row["floor_s"] for row in rows])}
    if rand_eigh is not None:
        for method in args.methods:
            slopes[f"randomized_{method}"] = _slope(ds, [row[f"randomized_{method}_s"] for row in rows])
    if len(dense_measured) >= 2:
        slopes["dense_eigh_measured"] = _slope([a for a, _ in dense_measured], [b for _, b in dense_measured])
    last = rows[-1]
    bar = {
        "slope_le_1.15": slopes["brand"] <= 1.15,
        "dense_over_brand_ge_100_at_largest_d": last["dense_over_brand"] >= 100,
        "dense_flop_lower_bound_over_brand_ge_100_at_largest_d": last["dense_lower_bound_over_brand"] >= 100,
        "brand_within_3x_floor_at_largest_d": last["brand_over_floor"] <= 3.0,
    }
    return {
        "bar": bar,
        "benchmark": "brand_update",
        "settings": {"dims": dims, "rank": r, "batch": n, "decay": DECAY, "dtype": "float32", "repeats": args.repeats, "quick": args.quick},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_end": list(os.getloadavg()),
            "quiet_waits": dict(QUIET),
            "quiet_rule": f"before each timed repeat of brand and GEMM, wait up to {args.quiet:g} s for >= 80% idle CPUs",
            "numpy": np.__version__,
            "gemm_rate_peak_gflops": peak / 1e9,
            "gemm_rate_min_gflops": min(rates) / 1e9,
            "gemm_reference": "float32 4096x4096 @ 4096x230, best of 3, measured before every d",
        },
        "notes": [
            "floor = flops of the §4 algorithm (brand_flops) / peak measured float32 GEMM rate; "
            "the eigh term is counted at GEMM rate although LAPACK's tridiagonalisation is memory-bound, "
            "so the floor is optimistic",
            f"dense eigh is extrapolated as c*d^3 from the largest measured d wherever the prediction exceeds {args.dense_limit:g} s "
            "(rows with dense_eigh_extrapolated = true)",
            "randomized_eigh runs on the dense d x d factor built outside the timer; keeping that factor as an EA costs "
            "dense_ea_update_s per step on top (the plain NumPy expression, one warm-up, fresh d x d temporaries)",
            "timings are best-of-repeats wall clock on a machine shared with other jobs; the GEMM rate next to each timing is recorded",
            "dense_eigh_flop_lower_bound_s = (4/3) d^3 / peak GEMM rate (tridiagonalisation only): a load-independent "
            "lower bound on dense eigh",
            "randomized_eigh was unavailable" if rand_eigh is None else "randomized_eigh: onlinela defaults (oversample=10, n_iter=2)",
        ],
        "flops_breakdown_at_largest_d": brand_flops(last["d"], r, n),
        "rows": rows,
        "slopes_loglog": slopes,
        "summary_at_largest_d": {
            "d": last["d"],
            "brand_s": last["brand_s"],
            "floor_s": last["floor_s"],
            "brand_over_floor": last["brand_over_floor"],
            "dense_eigh_s": last["dense_eigh_s"],
            "dense_eigh_extrapolated": last["dense_eigh_extrapolated"],
            "dense_over_brand": last["dense_over_brand"],
            "dense_eigh_flop_lower_bound_s": last["dense_eigh_flop_lower_bound_s"],
            "dense_lower_bound_over_brand": last["dense_lower_bound_over_brand"],
        },
    }


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ds = np.array([row["d"] for row in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sl = result["slopes_loglog"]
    ax.loglog(ds, [row["brand_s"] for row in rows], "o-", label=f"brand_update (slope {sl['brand']:.2f})")
    ax.loglog(ds, [row["floor_s"] for row in rows], "k:", label="flop floor at measured GEMM rate")
    for key in sorted(k for k in rows[0] if k.startswith("randomized_") and k.endswith("_s")):
        name = key[len("randomized_") : -2]
        ax.loglog(ds, [row[key] for row in rows], "s-", label=f"randomized_eigh {name} (slope {sl['randomized_' + name]:.2f})")
    meas = [(row["d"], row["dense_eigh_s"]) for row in rows if not row["dense_eigh_extrapolated"]]
    extr = [(row["d"], row["dense_eigh_s"]) for row in rows if row["dense_eigh_extrapolated"]]
    if meas:
        ax.loglog(*zip(*meas), "^-", color="C3", label="dense eigh (measured)")
    if extr:
        pts = meas[-1:] + extr
        ax.loglog(*zip(*pts), "^--", color="C3", mfc="none", label="dense eigh (O(d³) extrapolated)")
    ax.loglog(ds, [row["dense_ea_update_s"] for row in rows], "x:", color="C7", label="dense EA update ρA+(1-ρ)XXᵀ")
    s = result["settings"]
    ax.set_xlabel("dimension d")
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_title(f"EA factor update, r={s['rank']}, n={s['batch']}, float32, {result['machine']['cpu_count']} cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small d, r, n, one repeat")
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--rank", type=int, default=220)
    p.add_argument("--batch", type=int, default=256, help="n, columns of X per update")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--methods", nargs="+", default=["subspace", "nystrom"], help="randomized_eigh methods")
    p.add_argument("--dense-limit", type=float, default=60.0, help="seconds; extrapolate dense eigh beyond")
    p.add_argument("--quiet", type=float, default=20.0, help="max seconds to wait for idle CPUs before each timed repeat (0: never)")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    p.add_argument("--name", default=None, help="output file stem (default brand_update[_quick])")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.rank, args.batch, args.repeats = [256, 512, 1024], 20, 16, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("brand_update_quick" if args.quick else "brand_update")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{stem}.png")
    s = result["summary_at_largest_d"]
    logger.info(
        "slope %.3f; d=%d: brand %.4fs, %.2fx floor, dense eigh %.3gs%s (%.0fx)",
        result["slopes_loglog"]["brand"], s["d"], s["brand_s"], s["brand_over_floor"], s["dense_eigh_s"],
        " extrapolated" if s["dense_eigh_extrapolated"] else "", s["dense_over_brand"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

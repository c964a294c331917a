"""Randomized PSD eigensolvers on EA-built K-FAC-like factors: onlinela vs dense and randomized peers.

Run from the repository root::

    .venv/bin/python benchmarks/randomized_eigh.py            # d = 1024, 2048, 4096 (~10 min on 2 cores)
    .venv/bin/python benchmarks/randomized_eigh.py --quick    # smoke run, d = 256, 512

Writes ``benchmarks/results/randomized_eigh.json`` and ``.png``.  All solvers run in
one process on the same matrices, float32, same BLAS threads.  For every solver:
median (and min) wall time over ``--repeats`` runs after one warm-up, the relative
spectral error ``||A - U diag(w) Uᵀ||_2 / λ_1`` (float64 Lanczos on the residual)
and its ratio to the optimum ``λ_{r+1}/λ_1`` (Eckart–Young).  For the randomized
solvers also the *floor*: the number of ``(d × d)·(d × k)`` products the
configuration performs times the measured time of one such product on the same
backend — the time no randomized method with that many products can beat.

The test matrix (``ea_factor``): an exponential average ``M_k = ρ M_{k-1} + (1-ρ) X_k X_kᵀ``
of ``n_steps`` rank-``s`` increments (``ρ = 0.95``, ``s = 256``, 64 steps: the oldest
weight is ρ^63 ≈ 0.04).  Columns of ``X_k`` are samples of a latent signal with a
power-law covariance (std of latent mode ``j`` is ``(1+j)^{-α}``, ``α = 0.5``) in a
random orthogonal basis, times per-column scales ``0.99^c`` that decay across the
batch, as activations of a trained layer do.  Timing numbers are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.fft
import scipy.linalg
import scipy.sparse.linalg as spla

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onlinela  # noqa: E402
from onlinela.randomized import METHODS  # noqa: E402

RANK = 220
OVERSAMPLE = 10
# onlinela configurations: (method, n_iter, oversample).  The public defaults first; then the
# papers' q = 3; then configurations that trade power iterations for oversampling (wider
# products run closer to peak and converge gap-free, which matters for the flat EA tail).
ONLINELA_CONFIGS = [
    ("subspace", 2, 10),  # randomized_eigh defaults
    ("subspace", 3, 10),
    ("nystrom", 1, 160),
    ("nystrom", 2, 40),
    ("nystrom", 3, 10),
    ("svd", 1, 20),
    ("krylov", 1, 40),
    ("krylov", 2, 10),
]
QUICK_CONFIGS = [("subspace", 2, 10), ("nystrom", 1, 160), ("svd", 1, 20), ("krylov", 2, 10)]
# The configuration the bar is judged on, fixed before the final run (chosen on the seed-0 factor
# at d = 4096 from an exploratory grid; ROBUSTNESS re-checks its error on other factors):
# Nyström with one power iteration and a wide sketch, randomized_eigh(A, 220, method="nystrom",
# n_iter=1, oversample=160): two products with 380 columns.
BAR_CONFIG = ("nystrom", 1, 160)
# other EA factors (seed, alpha) on which the error of every configuration is re-measured at the
# largest d: the claim must hold on matrices the configurations were not chosen on
ROBUSTNESS = [(1, 0.5), (2, 0.65), (3, 0.4)]


def n_products(method: str, q: int) -> int:
    return {"subspace": q + 2, "nystrom": q + 1, "svd": 2 * q + 2, "krylov": q + 2}[method]


# --------------------------------------------------------------------------- test matrix


def ea_factor(d: int, *, n_steps: int = 64, s: int = 256, decay: float = 0.95, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """EA of ``n_steps`` rank-``s`` increments (see module docstring); float32, exactly symmetric."""
    from scipy.linalg.blas import ssyrk

    rng = np.random.default_rng(seed)
    sigma = (1.0 + np.arange(d)) ** (-alpha)
    perm, signs = rng.permutation(d), rng.choice([-1.0, 1.0], d)  # random orthogonal basis: signed,
    colscale = 0.99 ** np.arange(s)  # permuted DCT (O(d log d) per column instead of a d×d QR)
    blocks = []
    for i in range(n_steps):
        w = (1 - decay) * decay ** (n_steps - 1 - i)
        Z = rng.standard_normal((d, s))
        X = scipy.fft.idct(sigma[:, None] * Z, axis=0, norm="ortho")[perm] * signs[:, None]
        blocks.append((X * (colscale * np.sqrt(w / s))).astype(np.float32))
    A = ssyrk(1.0, np.concatenate(blocks, axis=1))  # upper triangle of X Xᵀ
    A = np.triu(A) + np.triu(A, 1).T
    return np.ascontiguousarray(A, dtype=np.float32)


# --------------------------------------------------------------------------- measurement


def spectral_error(A64: np.ndarray, U: np.ndarray, w: np.ndarray) -> float:
    """||A - U diag(w) Uᵀ||_2 by float64 Lanczos on the residual operator."""
    U = np.asarray(U, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    d = A64.shape[0]
    op = spla.LinearOperator((d, d), matvec=lambda x: A64 @ x - U @ (w * (U.T @ x)), dtype=np.float64)
    vals = spla.eigsh(op, k=1, which="LM", tol=1e-6, return_eigenvectors=False, v0=np.ones(d) / np.sqrt(d))
    return float(abs(vals[0]))


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL", "NVPL", "GOTO", "BLIS"))}
    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "onlinela": onlinela.__version__,
        "env": env,
    }
    try:
        import threadpoolctl

        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture", "threading_layer")}
            for p in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "other"
    except ImportError:
        pass
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------- solvers


def peers(A: np.ndarray, r: int, l: int) -> dict:
    """Peer solvers: name -> (callable returning (U (d, r), w (r,)) as numpy, library, params)."""
    d = A.shape[0]
    out = {}

    def top(w, V):
        idx = np.argsort(w)[::-1][:r]
        return V[:, idx], w[idx]

    out["numpy.linalg.eigh"] = (lambda: top(*np.linalg.eigh(A)), "numpy", {})
    out["scipy.linalg.eigh(evd)"] = (lambda: top(*scipy.linalg.eigh(A, driver="evd", check_finite=False)), "scipy", {"driver": "evd"})
    out["scipy.linalg.eigh(evr, top r)"] = (
        lambda: top(*scipy.linalg.eigh(A, driver="evr", subset_by_index=[d - r, d - 1], check_finite=False)),
        "scipy",
        {"driver": "evr", "subset_by_index": "top r"},
    )
    try:
        from sklearn.utils.extmath import randomized_svd as sk_rsvd

        def sk(n_iter):
            def run():
                U, s, Vt = sk_rsvd(A, r, n_oversamples=l, n_iter=n_iter, random_state=0)
                return Vt.T, s

            return run

        out["sklearn randomized_svd (n_iter='auto')"] = (sk("auto"), "sklearn", {"n_components": r, "n_oversamples": l, "n_iter": "auto"})
        out["sklearn randomized_svd (n_iter=2)"] = (sk(2), "sklearn", {"n_components": r, "n_oversamples": l, "n_iter": 2})
    except ImportError:
        pass
    try:
        import torch

        At = torch.from_numpy(A)

        def t_eigh():
            w, V = torch.linalg.eigh(At)
            return V[:, -r:].flip(-1).numpy(), w[-r:].flip(-1).numpy()

        def t_svd_lowrank():
            torch.manual_seed(0)
            U, s, V = torch.svd_lowrank(At, q=r + l, niter=2)
            return V[:, :r].numpy(), s[:r].numpy()

        out["torch.linalg.eigh"] = (t_eigh, "torch", {})
        out["torch.svd_lowrank"] = (t_svd_lowrank, "torch", {"q": r + l, "niter": 2})
    except ImportError:
        pass
    return out


def onlinela_solvers(A: np.ndarray, r: int, configs) -> dict:
    out = {}
    inputs = {"numpy": A}
    try:
        import torch

        inputs["torch"] = torch.from_numpy(A)
    except ImportError:
        pass
    for backend, X in inputs.items():
        for method, q, l in configs:

            def run(X=X, method=method, q=q, l=l):
                M = onlinela.randomized_eigh(X, r, oversample=l, n_iter=q, method=method, rng=0)
                return M.eigvecs, M.eigvals

            name = f"onlinela {method} q={q} l={l} [{backend}]"
            params = {"method": method, "n_iter": q, "oversample": l, "backend": backend, "products": n_products(method, q)}
            out[name] = (run, "onlinela", params)
    return out


def product_fn(A: np.ndarray, k: int, backend: str):
    """One (d × d)·(d × k) product on ``backend``: the unit of a randomized solver's floor."""
    Om = np.random.default_rng(0).standard_normal((A.shape[0], k)).astype(np.float32)
    if backend == "torch":
        import torch

        At, Ot = torch.from_numpy(A), torch.from_numpy(Om)
        return lambda: At @ Ot
    return lambda: A @ Om


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _np(x) -> np.ndarray:
    from onlinela.testing import to_numpy

    return to_numpy(x)


# --------------------------------------------------------------------------- main


def run_size(d: int, r: int, args) -> dict:
    print(f"[d={d}] building the EA factor ...", flush=True)
    A = ea_factor(d, seed=args.seed)
    A64 = A.astype(np.float64)
    lam = np.linalg.eigvalsh(A64)[::-1]
    opt = float(lam[r] / lam[0])
    res: dict = {
        "d": d,
        "rank": r,
        "dtype": "float32",
        "lambda_1": float(lam[0]),
        "optimal_rel_error": opt,
        "spectrum_rel": {str(j + 1): float(lam[j] / lam[0]) for j in (0, 9, 49, 99, r - 1, r, r + 9, min(2 * r, d - 1)) if j < d},
        "gap_r_over_r_plus_l": float(lam[r] / lam[r + OVERSAMPLE]) if r + OVERSAMPLE < d else None,
        "rows": [],
    }
    configs = QUICK_CONFIGS if args.quick else ONLINELA_CONFIGS
    ks = sorted({r + l for _, _, l in configs})
    solvers = {**peers(A, r, OVERSAMPLE), **onlinela_solvers(A, r, configs)}
    products = {}  # the floor's unit: one (d × d)·(d × k) product per backend and k
    for backend in ("numpy", "torch"):
        for k in ks:
            try:
                products[(backend, k)] = product_fn(A, k, backend)
            except ImportError:
                pass
    # Warm-up every solver once (and keep its output for the error), then time.  Dense solvers
    # run back to back; the randomized solvers and the floor products run round-robin, one call
    # each per round, so that load from other processes on a shared machine hits all alike —
    # within one thread pool at a time (torch's OpenMP / NumPy's OpenBLAS): alternating pools
    # makes the idle pool's spinning threads slow the other one down.
    outputs = {name: fn() for name, (fn, _, _) in solvers.items()}
    for f in products.values():
        f()
    times: dict = {name: [] for name in solvers}
    ptimes: dict = {key: [] for key in products}
    dense = [n for n, (_, lib, _) in solvers.items() if lib in ("numpy", "scipy") or n == "torch.linalg.eigh"]
    fast = [n for n in solvers if n not in dense]
    for name in dense:
        for _ in range(args.dense_repeats):
            times[name].append(_time(solvers[name][0]))
    def pool(name: str) -> str:
        return "torch" if name.startswith("torch") or name.endswith("[torch]") else "numpy"

    for group in ("numpy", "torch"):
        members = [n for n in fast if pool(n) == group]
        prods = [key for key in products if key[0] == group]
        for f in [solvers[n][0] for n in members] + [products[key] for key in prods]:
            f()  # re-warm this pool
        for _ in range(args.repeats):
            for name in members:
                times[name].append(_time(solvers[name][0]))
            for key in prods:
                for _ in range(2):
                    ptimes[key].append(_time(products[key]))
    floors = {key: min(v) for key, v in ptimes.items()}  # fastest product: the floor is a lower bound
    res["product_time_s"] = {f"{b} k={k}": v for (b, k), v in floors.items()}
    for name, (fn, lib, params) in solvers.items():
        U, w = outputs[name]
        err = spectral_error(A64, _np(U), _np(w)) / lam[0]
        row = {
            "name": name,
            "library": lib,
            "params": params,
            "time_median_s": statistics.median(times[name]),
            "time_min_s": min(times[name]),
            "times_s": times[name],
            "rel_error": err,
            "error_over_optimal": err / opt,
        }
        if lib == "onlinela":
            floor = params["products"] * floors[(params["backend"], params["oversample"] + r)]
            row["floor_s"] = floor
            row["time_over_floor"] = row["time_median_s"] / floor
        res["rows"].append(row)
        extra = f" floor {row['floor_s']:.3f}s ratio {row['time_over_floor']:.2f}" if "floor_s" in row else ""
        print(f"  {name:45s} {row['time_median_s']:8.3f}s (min {row['time_min_s']:.3f})  err/opt {row['error_over_optimal']:.3f}{extra}", flush=True)
    res["summary"] = summarise(res, args.error_factor)
    return res


def summarise(res: dict, factor: float) -> dict:
    rows = res["rows"]
    peer_rows = [x for x in rows if x["library"] != "onlinela"]
    fastest = min(peer_rows, key=lambda x: x["time_median_s"])
    summary: dict = {
        "error_factor": factor,
        "fastest_peer": fastest["name"],
        "fastest_peer_time_s": fastest["time_median_s"],
        "fastest_peer_error_over_optimal": fastest["error_over_optimal"],
        "per_backend": {},  # fastest configuration meeting the error target (selected post hoc)
    }
    for backend in sorted({x["params"]["backend"] for x in rows if x["library"] == "onlinela"}):
        ours = [x for x in rows if x["library"] == "onlinela" and x["params"]["backend"] == backend]
        ok = [x for x in ours if x["error_over_optimal"] <= factor]
        entry: dict = {"best": None, "bar_met": False}
        if ok:
            best = min(ok, key=lambda x: x["time_median_s"])
            speedup = fastest["time_median_s"] / best["time_median_s"]
            entry = {
                "best": best["name"],
                "time_s": best["time_median_s"],
                "error_over_optimal": best["error_over_optimal"],
                "speedup_vs_fastest_peer": speedup,
                "time_over_floor": best["time_over_floor"],
                "bar_met": bool(speedup >= 2.0 and best["time_over_floor"] <= 2.0),
            }
        dflt = [x for x in ours if (x["params"]["method"], x["params"]["n_iter"], x["params"]["oversample"]) == ("subspace", 2, 10)]
        if dflt:
            entry["public_defaults"] = {"time_s": dflt[0]["time_median_s"], "error_over_optimal": dflt[0]["error_over_optimal"]}
        summary["per_backend"][backend] = entry
    summary["bar_met_post_hoc"] = any(e["bar_met"] for e in summary["per_backend"].values())
    bar = {}
    for x in rows:
        if x["library"] == "onlinela" and (x["params"]["method"], x["params"]["n_iter"], x["params"]["oversample"]) == BAR_CONFIG:
            speedup = fastest["time_median_s"] / x["time_median_s"]
            bar[x["params"]["backend"]] = {
                "name": x["name"],
                "time_s": x["time_median_s"],
                "error_over_optimal": x["error_over_optimal"],
                "speedup_vs_fastest_peer": speedup,
                "time_over_floor": x["time_over_floor"],
                "met": bool(x["error_over_optimal"] <= factor and speedup >= 2.0 and x["time_over_floor"] <= 2.0),
            }
    summary["bar_config"] = {"method": BAR_CONFIG[0], "n_iter": BAR_CONFIG[1], "oversample": BAR_CONFIG[2], "per_backend": bar}
    return summary


def robustness(d: int, r: int, configs, cases) -> list[dict]:
    """error / optimal of every onlinela configuration on other EA factors (torch input, seed = case seed)."""
    out = []
    for seed, alpha in cases:
        A = ea_factor(d, seed=seed, alpha=alpha)
        A64 = A.astype(np.float64)
        lam = np.linalg.eigvalsh(A64)[::-1]
        row = {"seed": seed, "alpha": alpha, "optimal_rel_error": float(lam[r] / lam[0]), "error_over_optimal": {}}
        for method, q, l in configs:
            M = onlinela.randomized_eigh(A, r, oversample=l, n_iter=q, method=method, rng=seed)
            row["error_over_optimal"][f"{method} q={q} l={l}"] = spectral_error(A64, M.eigvecs, M.eigvals) / lam[r]
        print(f"  robustness seed={seed} alpha={alpha}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["error_over_optimal"].items()), flush=True)
        out.append(row)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    names = [row["name"] for row in results[0]["rows"]]
    ds = [res["d"] for res in results]
    for name in names:
        t = [next(x["time_median_s"] for x in res["rows"] if x["name"] == name) for res in results]
        style = "-o" if name.startswith("onlinela") else "--s"
        ax1.plot(ds, t, style, label=name, ms=4, lw=1)
    ax1.set(xscale="log", yscale="log", xlabel="d", ylabel="median time [s]", title=f"float32, r = {results[0]['rank']}")
    ax1.legend(fontsize=6, ncol=2)
    last = results[-1]
    for row in last["rows"]:
        c = "C0" if row["library"] == "onlinela" else "C3"
        ax2.scatter(row["time_median_s"], row["error_over_optimal"], c=c, s=18)
        ax2.annotate(row["name"].replace("onlinela ", ""), (row["time_median_s"], row["error_over_optimal"]), fontsize=5)
    ax2.axhline(last["summary"]["error_factor"], color="k", ls=":", lw=1)
    ax2.set(xscale="log", xlabel="median time [s]", ylabel="error / optimal (λ_{r+1})", title=f"d = {last['d']}: accuracy vs time")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: d = 256, 512, r = 40, few repeats")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per randomized solver (after a warm-up)")
    p.add_argument("--dense-repeats", type=int, default=None, help="timed runs per dense eigensolver")
    p.add_argument("--error-factor", type=float, default=1.2, help="accuracy target, error / optimal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/randomized_eigh[_quick].json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / ("randomized_eigh_quick.json" if args.quick else "randomized_eigh.json")
    sizes = args.sizes or ([256, 512] if args.quick else [1024, 2048, 4096])
    r = args.rank or (40 if args.quick else RANK)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.dense_repeats = args.dense_repeats or (1 if args.quick else 3)
    results = []
    for d in sizes:
        load0 = os.getloadavg()
        res = run_size(d, r, args)
        res["loadavg_before_after"] = [list(load0), list(os.getloadavg())]
        results.append(res)
    configs = QUICK_CONFIGS if args.quick else ONLINELA_CONFIGS
    robust = robustness(sizes[-1], r, configs, ROBUSTNESS[:1] if args.quick else ROBUSTNESS)
    payload = {
        "benchmark": "randomized_eigh",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "environment": environment(),
        "methods": list(METHODS),
        "matrix": "EA of 64 rank-256 increments, decay 0.95, power-law latent covariance (alpha=0.5), column scales 0.99^c",
        "results": results,
        "robustness": {"d": sizes[-1], "rank": r, "cases": robust},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    plot(results, args.out.with_suffix(".png"))
    for res in results:
        s = res["summary"]
        for be, e in s["bar_config"]["per_backend"].items():
            print(
                f"d={res['d']} bar config {BAR_CONFIG} [{be}]: {e['time_s']:.3f}s, error/optimal {e['error_over_optimal']:.3f}, "
                f"{e['speedup_vs_fastest_peer']:.2f}x faster than {s['fastest_peer']} ({s['fastest_peer_time_s']:.3f}s), "
                f"{e['time_over_floor']:.2f}x its product floor -> {'met' if e['met'] else 'NOT met'}"
            )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

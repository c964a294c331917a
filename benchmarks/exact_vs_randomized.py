"""Benchmark: when a full ``eigh`` of a K-factor is cheaper than its randomized decomposition.

``RandomizedFactor`` (RS-KFAC, SRE-KFAC, Nyström-KFAC and the Brand methods'
fallback) replaces its sketch of ``k = r + l`` columns by an exact ``eigh``
where that costs less (``onlinela_torch.factors.exact_is_cheaper``, crossover
``d / k`` in ``EXACT_BELOW``).  This script measures both on random PSD
``d × d`` float32 torch matrices, one thread, process CPU time (best of
``--repeats``), for ``r`` 32-220 (``l = 10``, ``q = 3``, the defaults) and
``d`` 128-1536, reports the measured crossover ``d / k`` per method and how
often the rule picks the cheaper one, and writes
``benchmarks/results/exact_vs_randomized.json`` and ``.png``.  Never asserts timings.

Usage::

    .venv/bin/python benchmarks/exact_vs_randomized.py
    .venv/bin/python benchmarks/exact_vs_randomized.py --quick
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
from typing import Any

import torch

import onlinela
from onlinela import eigh, randomized_eigh
from onlinela_torch.factors import exact_is_cheaper
from timing import best_process_time

ROOT = pathlib.Path(__file__).resolve().parent
METHODS = ("svd", "subspace", "nystrom")
OVERSAMPLE, N_ITER = 10, 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: two sizes, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "exact_vs_randomized.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ranks = (16,) if args.quick else (32, 64, 128, 220)
    dims = (64, 128) if args.quick else (128, 192, 256, 384, 512, 768, 1024, 1536)
    repeats = 1 if args.quick else args.repeats
    rows = []
    for r in ranks:
        for d in dims:
            k = r + OVERSAMPLE
            if k >= d:
                continue
            X = torch.randn(d, 2 * d, generator=gen)
            A = X @ X.T / d
            row: dict[str, Any] = {"r": r, "d": d, "k": k, "eigh": best_process_time(lambda: eigh(A, check_inputs=False), repeats)}
            for m in METHODS:
                row[m] = best_process_time(lambda m=m: randomized_eigh(A, r, method=m, oversample=OVERSAMPLE, n_iter=N_ITER,
                                                           check_inputs=False), repeats)
                row[f"{m}_rule_exact"] = exact_is_cheaper(d, k, m, N_ITER)
            rows.append(row)
            print(f"r={r:3d} d={d:5d}  eigh {row['eigh'] * 1e3:7.1f} ms  " + "  ".join(
                f"{m} {row[m] * 1e3:7.1f} ms" for m in METHODS), flush=True)
    summary = {}
    for m in METHODS:
        agree = sum((row["eigh"] < row[m]) == row[f"{m}_rule_exact"] for row in rows)
        regret = max((row["eigh"] if row[f"{m}_rule_exact"] else row[m]) / min(row["eigh"], row[m]) for row in rows)
        crossings = [row["d"] / row["k"] for row in rows if row["eigh"] >= row[m]]
        summary[m] = {"rule_agreement": agree / len(rows), "worst_regret": regret,
                      "smallest_d_over_k_where_the_sketch_is_cheaper": min(crossings) if crossings else None}
    result = {
        "benchmark": "exact_vs_randomized",
        "settings": {"ranks": ranks, "dims": dims, "oversample": OVERSAMPLE, "n_iter": N_ITER, "repeats": repeats,
                     "clock": "process CPU time, one torch thread", "dtype": "float32"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "onlinela": onlinela.__version__},
        "summary": summary,
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(result, out.with_suffix(".png"))
    for m, s in summary.items():
        print(f"{m}: the rule picks the cheaper decomposition on {s['rule_agreement']:.0%} of {len(rows)} shapes, "
              f"worst regret {s['worst_regret']:.2f}x")
    print(f"-> {out}")
    return 0


def _plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4), sharey=True)
    for ax, m in zip(axes, METHODS):
        for r in result["settings"]["ranks"]:
            rows = [row for row in result["rows"] if row["r"] == r]
            ax.plot([row["d"] / row["k"] for row in rows], [row[m] / row["eigh"] for row in rows], "o-", label=f"r={r}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{m}: randomized / eigh time")
        ax.set_xlabel("d / (r + l)")
    axes[0].set_ylabel("time ratio (below 1: sketch cheaper)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

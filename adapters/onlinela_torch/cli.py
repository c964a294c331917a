"""The ``onlinela`` command.

Subcommands grow with the project; ``demo`` is what ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

import onlinela

logger = logging.getLogger("onlinela")


def _demo(args: argparse.Namespace) -> int:
    """Low-rank damped inverse of an EA-built PSD matrix vs a dense solve."""
    rng = np.random.default_rng(args.seed)
    d, s, rho = args.dim, 32, 0.95
    M = np.zeros((d, d))
    for _ in range(60):
        X = rng.standard_normal((d, s)) * np.geomspace(1, 1e-2, s) / np.sqrt(s)
        M = rho * M + (1 - rho) * X @ X.T
    t0 = time.perf_counter()
    w, U = np.linalg.eigh(M)
    t_eigh = time.perf_counter() - t0
    r = args.rank
    approx = onlinela.LowRankPSD(U[:, ::-1][:, :r].copy(), np.clip(w[::-1][:r], 0, None).copy())
    mu = 1e-3 * w[-1] + 1e-2 * w.max()
    G = rng.standard_normal((d, 8))
    exact = np.linalg.solve(M + mu * np.eye(d), G)
    t0 = time.perf_counter()
    fast = approx.solve(G, mu)
    t_solve = time.perf_counter() - t0
    err = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    out = sys.stdout
    out.write(f"EA matrix d={d}, {60} rank-{s} increments, decay {rho}\n")
    out.write(f"lambda_(r+1)/lambda_1 at r={r}: {w[::-1][r] / w[::-1][0]:.2e}\n")
    out.write(f"dense eigh: {t_eigh:.3f} s; low-rank solve (r={r}): {t_solve * 1e3:.2f} ms; rel. error {err:.2e}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onlinela", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="small linear-algebra demo (what `make demo` runs)")
    demo.add_argument("--dim", type=int, default=512)
    demo.add_argument("--rank", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return int(args.func(args))

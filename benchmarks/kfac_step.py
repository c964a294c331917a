"""Seconds per training step of the K-FAC family vs SGD, Adam and a peer K-FAC.

An MLP ``in -> w -> w -> 10`` (tanh) on random data, batch 256, float32, one
CPU process.  Every method runs one full schedule period at the papers'
defaults (``T_updt = 10``, ``T_inv = 50``, B-updates every ``T_updt``,
B-R overwrite every ``2 T_inv``, correction every 2 B-updates, r = 220,
l = 10, q = 3), so the mean step time *is* the amortised per-step cost.  The
preconditioner's own timers split it into statistics / decomposition /
preconditioning; "other" is forward, backward and the SGD update.

The peer is ASDL's ``KfacGradientMaker`` (package ``asdfghjkl`` on PyPI,
empirical Fisher, same periods) when it imports; otherwise the JSON says why.
Install it without touching torch::

    .venv/bin/pip install --no-deps -c constraints.txt --target /tmp/peer asdfghjkl
    .venv/bin/python benchmarks/kfac_step.py --peer-path /tmp/peer

Usage::

    .venv/bin/python benchmarks/kfac_step.py            # widths 1024 2048 4096
    .venv/bin/python benchmarks/kfac_step.py --quick    # widths 256 512, short periods

Writes ``benchmarks/results/kfac_step.json`` and ``kfac_step.png``.  Timings
are reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onlinela_torch import BrandConfig, KFACPreconditioner
from onlinela_torch.preconditioner import METHODS

logger = logging.getLogger("benchmarks.kfac_step")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PHASES = ("statistics", "decomposition", "preconditioning")


def _model(in_dim: int, width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def _data(n_batches: int, batch: int, in_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(in_dim, 10, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, in_dim, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def _run_ours(method: str, width: int, args: argparse.Namespace, data: list) -> dict[str, Any]:
    model = _model(args.in_dim, width)
    if method in ("sgd", "adam"):
        opt = torch.optim.SGD(model.parameters(), lr=args.lr) if method == "sgd" else torch.optim.Adam(model.parameters(), 1e-3)
        pre = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        pre = KFACPreconditioner(
            model,
            method=method,
            lr=args.lr,
            factor_update_freq=args.t_updt,
            inv_update_freq=args.t_inv,
            brand=BrandConfig(),
            timer=args.clock,
        )
    steps = _period(method, args)
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        losses.append(float(loss.detach()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res: dict[str, Any] = {
        "steps": steps,
        "seconds_per_step": (cpu if args.clock is time.process_time else wall) / steps,
        "wall_seconds_per_step": wall / steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if pre is not None:
        st = pre.stats()
        for ph in PHASES:
            res[ph] = st["seconds"][ph] / steps
        res["other"] = res["seconds_per_step"] - sum(res[ph] for ph in PHASES)
        res["factor_kinds"] = sorted({f["kind"] for layer in st["layers"].values() for f in (layer["A"], layer["G"]) if f})
        res["ranks"] = {n: (layer["A"]["rank"], layer["G"]["rank"]) for n, layer in st["layers"].items()}
        res["low_rank_grad_steps"] = sum(layer["counters"]["low_rank_grad"] for layer in st["layers"].values())
        if method == "b-kfac":
            n_brand = len(range(0, steps, args.t_updt))
            res["decomposition_per_brand_update"] = st["seconds"]["decomposition"] / n_brand
    else:
        res["other"] = res["seconds_per_step"]
    return res


def _period(method: str, args: argparse.Namespace) -> int:
    """One full schedule period: every event happens exactly as often as it is amortised over."""
    if method in ("sgd", "adam", "asdl-kfac"):
        return args.t_inv
    if method in ("br-kfac", "b-kfac-c"):
        return 2 * args.t_inv  # overwrite every 2 T_inv
    return args.t_inv


def _peer_status(peer_path: str | None) -> tuple[Any, str]:
    if peer_path:
        sys.path.insert(0, peer_path)
    try:
        asdl_pre = importlib.import_module("asdl.precondition")
    except Exception as exc:  # not installed, or incompatible with this torch
        return None, (
            f"asdfghjkl (ASDL) not importable: {type(exc).__name__}: {exc}. It exists on PyPI (0.1a5, pure Python, "
            "requires torch>=1.13); install it with `pip install --no-deps -c constraints.txt --target DIR asdfghjkl` "
            "and pass --peer-path DIR"
        )
    status = "ok: asdfghjkl (ASDL) KfacGradientMaker"
    if not torch.cuda.is_available():
        # ASDL brackets its work in torch.cuda.nvtx ranges unconditionally; a CPU-only torch raises there.
        torch.cuda.nvtx.range_push = lambda *a, **k: None
        torch.cuda.nvtx.range_pop = lambda *a, **k: None
        status += " (CPU-only torch: its unconditional torch.cuda.nvtx calls are replaced by no-ops in this process)"
    return asdl_pre, status


def _run_peer(asdl_pre: Any, width: int, args: argparse.Namespace, data: list) -> dict[str, Any]:
    model = _model(args.in_dim, width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    cfg = asdl_pre.PreconditioningConfig(
        data_size=args.batch,
        damping=1e-3,
        curvature_upd_interval=args.t_updt,
        preconditioner_upd_interval=args.t_inv,
        ema_decay=0.05,
    )
    gm = asdl_pre.KfacGradientMaker(model, cfg, fisher_type="fisher_emp")
    steps = _period("asdl-kfac", args)
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy, y)
        _, loss = gm.forward_and_backward()
        opt.step()
        losses.append(float(loss.detach()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "steps": steps,
        "seconds_per_step": (cpu if args.clock is time.process_time else wall) / steps,
        "wall_seconds_per_step": wall / steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "note": "ASDL KfacGradientMaker, fisher_emp, ema_decay 0.05, damping 1e-3 in its own (absolute) convention, "
        "no KL clip: its losses are not comparable with ours, only its time; phases not split",
    }


def _loglog_slope(widths: list[int], values: list[float]) -> float | None:
    if len(widths) < 2 or any(v <= 0 for v in values):
        return None
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def _plot(out: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = out["config"]["widths"]
    methods = out["config"]["methods"]
    fig, axes = plt.subplots(1, len(widths) + 1, figsize=(5 * (len(widths) + 1), 4.5))
    colors = {"statistics": "tab:blue", "decomposition": "tab:red", "preconditioning": "tab:green", "other": "tab:gray"}
    for ax, w in zip(axes, widths):
        res = out["results"][str(w)]
        names = [m for m in methods if m in res]
        bottom = np.zeros(len(names))
        for ph in (*PHASES, "other"):
            # a run without a phase split (SGD, Adam, the peer) is all "other"
            vals = np.array([res[m].get(ph, res[m].get("seconds_per_step", 0.0) if ph == "other" else 0.0) for m in names])
            ax.bar(names, vals, bottom=bottom, label=ph, color=colors[ph])
            bottom += vals
        ax.set_title(f"width {w}: seconds per step (amortised)")
        ax.tick_params(axis="x", rotation=60)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    for m in methods:
        ys = [out["results"][str(w)].get(m, {}).get("decomposition") for w in widths]
        if all(y for y in ys):
            ax.loglog(widths, ys, "o-", label=m)
    ax.set_xlabel("hidden width")
    ax.set_title("decomposition seconds per step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="widths 256 512, T_updt 2, T_inv 6")
    p.add_argument("--widths", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", default=["sgd", "adam", *METHODS, "asdl-kfac"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--in-dim", type=int, default=784)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable ratios on a shared machine; 0 = torch's default)"
    )
    p.add_argument("--peer-path", default=None, help="extra sys.path entry holding the asdl package")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # One thread: the process' CPU time is its compute time, whatever else runs on the machine.
    args.clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    args.widths = args.widths or ([256, 512] if args.quick else [1024, 2048, 4096])
    args.t_updt, args.t_inv = (2, 6) if args.quick else (10, 50)
    asdl_pre, peer = _peer_status(args.peer_path) if "asdl-kfac" in args.methods else (None, "not requested")
    data = _data(8, args.batch, args.in_dim)
    out: dict[str, Any] = {
        "config": {
            "widths": args.widths,
            "methods": args.methods,
            "model": f"MLP {args.in_dim}-w-w-10 tanh, cross-entropy",
            "batch": args.batch,
            "dtype": "float32",
            "T_updt": args.t_updt,
            "T_inv": args.t_inv,
            "defaults": "rank 220, oversample 10, n_iter 3, damping 1e-3, decay 0.95, kl_clip 1e-3; "
            "Brand: update every T_updt, overwrite every 2 T_inv, correction every 2 B-updates",
            "quick": args.quick,
            "clock": "process CPU time (single thread: robust to other load)"
            if args.clock is time.process_time
            else "wall clock (time.perf_counter)",
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "peer": peer,
        "results": {},
    }
    for w in args.widths:
        res = out["results"][str(w)] = {}
        for m in args.methods:
            if m == "asdl-kfac":
                if asdl_pre is None:
                    continue
                try:
                    res[m] = _run_peer(asdl_pre, w, args, data)
                except Exception as exc:  # the peer failing must not lose our numbers
                    res[m] = {"error": f"{type(exc).__name__}: {exc}"}
                    logger.info("width %d %s failed: %s", w, m, exc)
                    continue
            else:
                res[m] = _run_ours(m, w, args, data)
            logger.info("width %5d %-13s %.4f s/step %s", w, m, res[m]["seconds_per_step"],
                        {ph: round(res[m][ph], 4) for ph in PHASES if ph in res[m]})
    summary: dict[str, Any] = {}
    for w in args.widths:
        r = out["results"][str(w)]
        if "kfac" in r:
            summary[f"speedup_vs_kfac_width_{w}"] = {
                m: r["kfac"]["seconds_per_step"] / r[m]["seconds_per_step"] for m in r if m != "kfac" and "seconds_per_step" in r[m]
            }
    if "b-kfac" in args.methods:
        per_update = [out["results"][str(w)]["b-kfac"]["decomposition_per_brand_update"] for w in args.widths]
        summary["b-kfac_decomposition_per_brand_update"] = dict(zip(map(str, args.widths), per_update))
        summary["b-kfac_decomposition_loglog_slope_vs_width"] = _loglog_slope(args.widths, per_update)
    for m in METHODS:
        if m in args.methods:
            ys = [out["results"][str(w)][m]["decomposition"] for w in args.widths]
            summary.setdefault("decomposition_loglog_slope_vs_width", {})[m] = _loglog_slope(args.widths, ys)
    out["summary"] = summary
    out["environment"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kfac_step_quick" if args.quick else "kfac_step"
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2))
    _plot(out, args.out / f"{stem}.png")
    logger.info("summary: %s", json.dumps(summary, indent=1))
    logger.info("wrote %s", args.out / f"{stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

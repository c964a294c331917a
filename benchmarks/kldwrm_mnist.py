"""KLD-WRM (SO, Q, QE) against K-FAC on MNIST with the KLD-WRM paper's small CNN.

The paper's MNIST setting (algorithms.md §5) on the bundled 5,000-image MNIST
subset (4,000 train / 1,000 test, the fixed stratified split of
``load_mnist_subset(seed=0)``): the small CNN (dropout 0.5), batch 512 (the
last partial batch of an epoch is dropped: 7 steps per epoch), lr 0.01 with
plain SGD (momentum 0), weight decay 1e-3 added by SGD after the
preconditioning, damping 0.01, KL clip 0.1; ρ = 0.95 for K-FAC, 0.33 for SO,
0.5 for Q and QE; QE with 7 inner steps (lr 0.1·lr, momentum 0.5) and 3
stored networks.  The paper uses T_updt = T_inv = 30 on full MNIST (117 steps
per epoch, ~4 statistics updates per epoch); with 7 steps per epoch the
default here is T_updt = T_inv = 2, the same number of updates per epoch.
Plain SGD is run as a reference.

Every optimizer runs the same seeds (initialisation, shuffling and dropout);
the table reports the test accuracy after the last epoch, mean ± std over
seeds.  Runs are spread over ``--workers`` processes with one torch thread each.

Usage::

    .venv/bin/python benchmarks/kldwrm_mnist.py              # 15 epochs, seeds 0 1 2
    .venv/bin/python benchmarks/kldwrm_mnist.py --quick      # 2 epochs, seed 0
    # QE's kl_weight ablation and the exact-KL / K-FAC-KL diagnostic (docs/kldwrm.rst):
    .venv/bin/python benchmarks/kldwrm_mnist.py --optimizers kld-wrm-qe --epochs 6 --seeds 0 1 \
        --qe-kl-weight 1.0 --tag qe_klw1
    .venv/bin/python benchmarks/kldwrm_mnist.py --optimizers kfac kld-wrm-q --epochs 1 --seeds 0 1 \
        --kl-ratio-steps 42 --tag klratio

Writes ``benchmarks/results/kldwrm_mnist[_quick][_TAG].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import pathlib
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from onlinela_torch import KLDWRM, KFACPreconditioner, KLDWRMConfig
from onlinela_torch.data import load_mnist_subset
from onlinela_torch.models import SmallCNN

logger = logging.getLogger("benchmarks.kldwrm_mnist")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OPTIMIZERS = ("sgd", "kfac", "kld-wrm-so", "kld-wrm-q", "kld-wrm-qe")


def _curvature(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace) -> Any:
    common = dict(damping=args.damping, kl_clip=args.kl_clip, factor_update_freq=args.t_updt, inv_update_freq=args.t_inv)
    if name == "sgd":
        return None
    if name == "kfac":
        return KFACPreconditioner(
            model, method="kfac", lr=lambda step: opt.param_groups[0]["lr"], factor_decay=args.kfac_decay, **common
        )
    config = KLDWRMConfig() if args.qe_kl_weight is None else KLDWRMConfig(kl_weight=args.qe_kl_weight)
    return KLDWRM(model, opt, variant=name.rsplit("-", 1)[1], config=config, **common)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean()) * 100.0
    model.train()
    return acc


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one optimizer with one seed; the history has one record per epoch (epoch 0 = initial model)."""
    torch.set_num_threads(1)
    data = load_mnist_subset(seed=0)
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0, weight_decay=args.wd)
    curv = _curvature(name, model, opt, args)
    n = data.x_train.shape[0]
    steps_per_epoch = n // args.batch
    history = [{"epoch": 0, "seconds": 0.0, "train_loss": float("nan"), "test_acc": _accuracy(model, data.x_test, data.y_test)}]
    elapsed, skipped = 0.0, 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch))
        losses = []
        t0 = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * args.batch : (b + 1) * args.batch]
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if isinstance(curv, KLDWRM):
                skipped += not curv.step(closure=lambda x=x: model(x))
            elif curv is not None:
                skipped += not curv.step()
            opt.step()
            losses.append(float(loss.detach()))
        elapsed += time.perf_counter() - t0
        history.append({
            "epoch": epoch,
            "seconds": elapsed,
            "train_loss": sum(losses) / len(losses),
            "test_acc": _accuracy(model, data.x_test, data.y_test),
        })
    logger.info("%s seed %d: %.2f%% after %d epochs (%.1f s)", name, seed, history[-1]["test_acc"], args.epochs, elapsed)
    return {"optimizer": name, "seed": seed, "history": history, "skipped_steps": skipped}


def kl_ratio(name: str, seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Exact KL of each step on its batch over its second-order K-FAC estimate, for K-FAC or Q.

    The estimate is ``½ Σ_l tr(S_lᵀ G_l S_l A_l)`` with the debiased EA factors
    and ``S_l`` the layer's step ``-lr·p.grad``; the exact KL is
    ``KL(p_θ ‖ p_{θ+s})`` on the batch in eval mode.  Steps ``6 … kl_ratio_steps-1``
    of each seed (the same data order as training).
    """
    torch.set_num_threads(1)
    data = load_mnist_subset(seed=0)
    ratios = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.wd)
        curv = _curvature(name, model, opt, args)
        pre = curv.preconditioner if isinstance(curv, KLDWRM) else curv
        n = data.x_train.shape[0]
        steps_per_epoch = n // args.batch
        for k in range(args.kl_ratio_steps):
            epoch, b = divmod(k, steps_per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch + 1))
            idx = order[b * args.batch : (b + 1) * args.batch]
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            curv.step()
            with torch.no_grad():
                steps = [-args.lr * p.grad for p in model.parameters()]
                predicted = sum(
                    0.5 * float(torch.trace(S.T @ layer.G.dense() @ S @ layer.A.dense()))
                    for layer in pre.layers.values()
                    for S in [-args.lr * layer.helper.grad_matrix()]
                )
                model.eval()
                logp = torch.log_softmax(model(x), -1)
                for p, s in zip(model.parameters(), steps):
                    p.add_(s)
                logq = torch.log_softmax(model(x), -1)
                for p, s in zip(model.parameters(), steps):
                    p.sub_(s)
                model.train()
                exact = float((logp.exp() * (logp - logq)).sum(-1).mean())
            if k >= 6:
                ratios.append(exact / predicted)
            opt.step()
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "quartiles": q, "n": len(ratios), "seeds": seeds}


def _run_star(job: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_one(*job)


def summarise(runs: list[dict[str, Any]], optimizers: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Final test accuracy and seconds per epoch, mean and std over seeds, per optimizer."""
    out = {}
    for name in optimizers:
        accs = [r["history"][-1]["test_acc"] for r in runs if r["optimizer"] == name]
        secs = [r["history"][-1]["seconds"] / r["history"][-1]["epoch"] for r in runs if r["optimizer"] == name]
        out[name] = {
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seconds_per_epoch": statistics.fmean(secs),
            "n_seeds": len(accs),
        }
    return out


def _plot(runs: list[dict[str, Any]], optimizers: tuple[str, ...], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in optimizers:
        hs = [r["history"] for r in runs if r["optimizer"] == name]
        epochs = [h["epoch"] for h in hs[0]]
        acc = torch.tensor([[h["test_acc"] for h in hist] for hist in hs])
        mean = acc.mean(0)
        std = acc.std(0) if acc.shape[0] > 1 else torch.zeros_like(mean)
        ax.plot(epochs, mean, label=name)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--wd", type=float, default=1e-3)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--kl-clip", type=float, default=0.1)
    parser.add_argument("--kfac-decay", type=float, default=0.95)
    parser.add_argument("--t-updt", type=int, default=2)
    parser.add_argument("--t-inv", type=int, default=2)
    parser.add_argument("--qe-kl-weight", type=float, default=None, help="QE's KLDWRMConfig.kl_weight (λ = kl_weight/lr; default the config's 0.1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 epochs, seed 0 (a smoke run)")
    parser.add_argument("--tag", default="", help="suffix of the output files (ablations)")
    parser.add_argument(
        "--kl-ratio-steps", type=int, default=0,
        help="run the exact-KL / K-FAC-KL diagnostic of kfac and kld-wrm-q for this many steps (0: skip)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, [0]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optimizers = tuple(args.optimizers)
    # the slowest runs first, so the workers finish together
    jobs = [(name, seed, args) for name in reversed(optimizers) for seed in args.seeds]
    t0 = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            runs = pool.map(_run_star, jobs, chunksize=1)
    else:
        runs = [run_one(*job) for job in jobs]
    wall = time.perf_counter() - t0
    summary = summarise(runs, optimizers)
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    result = {
        "benchmark": "kldwrm_mnist",
        "config": config,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "wall_seconds": wall,
        "summary": summary,
        "runs": runs,
    }
    if args.kl_ratio_steps:
        result["kl_ratio"] = {
            name: kl_ratio(name, args.seeds[:2], args) for name in ("kfac", "kld-wrm-q") if name in optimizers
        }
    stem = "kldwrm_mnist" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    title = (
        f"MNIST subset, small CNN, batch {args.batch}, lr {args.lr}, {args.epochs} epochs, "
        f"seeds {args.seeds} (mean ± std)"
    )
    _plot(runs, optimizers, args.out / f"{stem}.png", title)
    logger.info("%-12s %-16s %s", "optimizer", "test acc (%)", "s/epoch")
    for name, s in summary.items():
        logger.info("%-12s %6.2f ± %-7.2f %.2f", name, s["test_acc_mean"], s["test_acc_std"], s["seconds_per_epoch"])
    for name, r in result.get("kl_ratio", {}).items():
        logger.info("%s: exact KL / K-FAC second-order KL of the step: median %.1f, quartiles %.1f-%.1f",
                    name, r["median"], r["quartiles"][0], r["quartiles"][2])
    logger.info("wall %.0f s; wrote %s", wall, args.out / f"{stem}.json")
    return result


if __name__ == "__main__":
    main()

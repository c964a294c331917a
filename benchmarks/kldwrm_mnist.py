"""KLD-WRM (SO, Q, QE) against K-FAC on MNIST with the KLD-WRM paper's small CNN.

The paper's MNIST protocol (algorithms.md §5) on the bundled 5,000-image
MNIST subset (4,000 train / 1,000 test, the fixed stratified split of
``load_mnist_subset(seed=0)``): the small CNN (dropout 0.5), batch 512 (the
last partial batch of an epoch is dropped: 7 steps per epoch), plain SGD
(momentum 0) with weight decay 1e-3 added by SGD after the preconditioning.

* K-FAC and the SGD reference run the paper's setting: lr 0.01, damping 0.01,
  KL clip 0.1, ρ = 0.95; the paper's T_updt = T_inv = 30 on full MNIST (117
  steps per epoch, ~4 statistics updates per epoch) becomes T_updt = T_inv = 2
  here (7 steps per epoch, the same number of updates per epoch); K-FAC
  takes the natural-gradient step (``graft=None``, as in the paper).
* ``kfac-defaults``: ``KFACPreconditioner(model, method="kfac", optimizer=opt)``
  with the library's defaults, at ``--kld-lr`` like the KLD-WRM variants.
* The KLD-WRM variants run, by default (``--kld-settings defaults``), the
  library's defaults (``KLDWRM(model, opt, variant=v)``, docs/kldwrm.rst) at
  ``--kld-lr`` (0.3: the lr the task zoo's ``mnist-smallcnn`` task picks for
  every variant at equal steps).  ``--kld-settings paper`` gives them the
  paper's setting instead (lr 0.01, damping 0.01, KL clip 0.1, T = 2, no
  graft, no RMS cap for SO; ρ = 0.33 for SO, 0.5 for Q and QE; QE with 7 inner
  steps, inner lr 0.1·lr, momentum 0.5, 3 stored networks).

Every optimizer runs the same seeds (initialisation, shuffling and dropout);
the table reports the test accuracy after the last epoch, mean ± std over
seeds, and the process CPU seconds per epoch (one torch thread per run).
Runs are spread over ``--workers`` processes.

Usage::

    .venv/bin/python benchmarks/kldwrm_mnist.py --epochs 50 --seeds 0 1 2 3 4 --workers 1 --tag e50
    .venv/bin/python benchmarks/kldwrm_mnist.py --merge A.json B.json --tag e50   # runs of B replace A's
    .venv/bin/python benchmarks/kldwrm_mnist.py              # 15 epochs, seeds 0 1 2
    .venv/bin/python benchmarks/kldwrm_mnist.py --quick      # 2 epochs, seed 0
    # QE's kl_weight ablation and the exact-KL / K-FAC-KL diagnostic (docs/kldwrm.rst):
    .venv/bin/python benchmarks/kldwrm_mnist.py --kld-settings paper --optimizers kld-wrm-qe --epochs 6 --seeds 0 1 \
        --qe-kl-weight 1.0 --tag qe_klw1
    .venv/bin/python benchmarks/kldwrm_mnist.py --kld-settings paper --optimizers kfac kld-wrm-q --epochs 1 --seeds 0 1 \
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
OPTIMIZERS = ("sgd", "kfac", "kfac-defaults", "kld-wrm-so", "kld-wrm-q", "kld-wrm-qe")


def _curvature(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace) -> Any:
    common = dict(damping=args.damping, kl_clip=args.kl_clip, factor_update_freq=args.t_updt, inv_update_freq=args.t_inv)
    if name == "sgd":
        return None
    if name == "kfac":  # the paper's natural-gradient step: no graft, KL clip
        return KFACPreconditioner(
            model, method="kfac", lr=lambda step: opt.param_groups[0]["lr"], factor_decay=args.kfac_decay, graft=None,
            **common,
        )
    if name == "kfac-defaults":  # the library's defaults, at the KLD-WRM variants' lr
        return KFACPreconditioner(model, method="kfac", optimizer=opt)
    variant = name.rsplit("-", 1)[1]
    if args.kld_settings == "defaults":
        return KLDWRM(model, opt, variant=variant)
    paper = dict(graft=None, config=KLDWRMConfig(
        rms_clip=None if variant == "so" else 2.0,
        kl_weight=0.1 if args.qe_kl_weight is None else args.qe_kl_weight,
    ))
    return KLDWRM(model, opt, variant=variant, **common, **paper)


def _lr(name: str, args: argparse.Namespace) -> float:
    """The optimizer's lr: ``--kld-lr`` for the runs with the library defaults, ``--lr`` for the paper's setting."""
    defaults = name == "kfac-defaults" or (name.startswith("kld-wrm") and args.kld_settings == "defaults")
    return args.kld_lr if defaults else args.lr


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
    opt = torch.optim.SGD(model.parameters(), lr=_lr(name, args), momentum=0.0, weight_decay=args.wd)
    curv = _curvature(name, model, opt, args)
    n = data.x_train.shape[0]
    steps_per_epoch = n // args.batch
    history = [{"epoch": 0, "seconds": 0.0, "cpu_seconds": 0.0, "train_loss": float("nan"),
                "test_acc": _accuracy(model, data.x_test, data.y_test)}]
    elapsed, cpu, skipped = 0.0, 0.0, 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch))
        losses = []
        t0, c0 = time.perf_counter(), time.process_time()
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
        cpu += time.process_time() - c0
        history.append({
            "epoch": epoch,
            "seconds": elapsed,
            "cpu_seconds": cpu,
            "train_loss": sum(losses) / len(losses),
            "test_acc": _accuracy(model, data.x_test, data.y_test),
        })
    logger.info("%s seed %d: %.2f%% after %d epochs (%.1f s)", name, seed, history[-1]["test_acc"], args.epochs, elapsed)
    return {"optimizer": name, "seed": seed, "lr": _lr(name, args), "history": history, "skipped_steps": skipped}


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
        cpus = [r["history"][-1]["cpu_seconds"] / r["history"][-1]["epoch"] for r in runs if r["optimizer"] == name]
        out[name] = {
            "lr": next(r["lr"] for r in runs if r["optimizer"] == name),
            "test_acc_per_seed": accs,
            "cpu_seconds_per_epoch": statistics.fmean(cpus),
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


def _title(args: argparse.Namespace, seeds: list[int]) -> str:
    kld_lr = args.kld_lr if args.kld_settings == "defaults" else args.lr
    return (
        f"MNIST subset, small CNN, batch {args.batch}, {args.epochs} epochs\nKLD-WRM {args.kld_settings} "
        f"(lr {kld_lr}), K-FAC paper (lr {args.lr}); seeds {seeds} (mean ± std)"
    )


def _result(
    runs: list[dict[str, Any]], optimizers: tuple[str, ...], args: argparse.Namespace, wall: float, *,
    partial: bool, path: pathlib.Path | None,
) -> dict[str, Any]:
    """The JSON record of ``runs`` (written to ``path`` when given); ``partial`` marks a run still in progress."""
    done = tuple(name for name in optimizers if any(r["optimizer"] == name for r in runs))
    result = {
        "benchmark": "kldwrm_mnist",
        "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "partial": partial,
        "wall_seconds": wall,
        "summary": summarise(runs, done),
        "runs": runs,
    }
    if path is not None:
        path.write_text(json.dumps(result, indent=1))
    return result


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """``--merge``: one result from several JSONs of this benchmark (runs of one optimizer and seed replaced)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources = [json.loads(path.read_text()) for path in args.merge]
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for src in sources:
        for r in src["runs"]:
            runs[(r["optimizer"], r["seed"])] = r
    optimizers = tuple(name for name in OPTIMIZERS if any(k[0] == name for k in runs))
    seeds = sorted({k[1] for k in runs})
    # only the seeds every optimizer finished
    complete = [s for s in seeds if all((name, s) in runs for name in optimizers)]
    kept = [runs[(name, s)] for s in complete for name in optimizers]
    result = {
        "benchmark": "kldwrm_mnist",
        "merged_from": [str(p) for p in args.merge],
        "configs": [src["config"] for src in sources],
        "platform": sources[-1]["platform"],
        "seeds": complete,
        "summary": summarise(kept, optimizers),
        "runs": kept,
    }
    stem = "kldwrm_mnist" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cfg = sources[0]["config"]
    args.epochs, args.batch, args.kld_settings, args.kld_lr, args.lr = (
        cfg["epochs"], cfg["batch"], cfg["kld_settings"], cfg["kld_lr"], cfg["lr"]
    )
    _plot(kept, optimizers, args.out / f"{stem}.png", _title(args, complete))
    for name, s in result["summary"].items():
        logger.info("%-14s lr %-6g %6.2f ± %-5.2f (%s)  CPU s/epoch %.2f", name, s["lr"], s["test_acc_mean"],
                    s["test_acc_std"], ", ".join(f"{a:.1f}" for a in s["test_acc_per_seed"]), s["cpu_seconds_per_epoch"])
    return result


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
    parser.add_argument("--qe-kl-weight", type=float, default=None,
                        help="QE's KLDWRMConfig.kl_weight with --kld-settings paper (λ = kl_weight/lr; default 0.1)")
    parser.add_argument("--kld-settings", choices=("defaults", "paper"), default="defaults",
                        help="KLD-WRM with the library defaults at --kld-lr, or with the paper's setting at --lr")
    parser.add_argument("--kld-lr", type=float, default=0.3, help="lr of the KLD-WRM variants with --kld-settings defaults")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 epochs, seed 0 (a smoke run)")
    parser.add_argument("--tag", default="", help="suffix of the output files (ablations)")
    parser.add_argument(
        "--kl-ratio-steps", type=int, default=0,
        help="run the exact-KL / K-FAC-KL diagnostic of kfac and kld-wrm-q for this many steps (0: skip)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--merge", nargs="+", type=pathlib.Path, default=None,
                        help="merge the runs of these JSONs (a later file's (optimizer, seed) replaces an earlier "
                             "one's) into the --tag output, table and PNG; runs nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)
    if args.quick:
        args.epochs, args.seeds = 2, [0]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optimizers = tuple(args.optimizers)
    stem = "kldwrm_mnist" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.workers > 1:
        # the slowest runs first, so the workers finish together
        jobs = [(name, seed, args) for name in reversed(optimizers) for seed in args.seeds]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            runs = pool.map(_run_star, jobs, chunksize=1)
    else:
        # seed by seed, every optimizer of a seed before the next seed, the JSON rewritten after each run:
        # a run stopped early leaves complete seeds behind
        runs = []
        for seed in args.seeds:
            for name in optimizers:
                runs.append(run_one(name, seed, args))
                _result(runs, optimizers, args, time.perf_counter() - t0, partial=True, path=args.out / f"{stem}.json")
            done = args.seeds[: args.seeds.index(seed) + 1]
            _plot(runs, optimizers, args.out / f"{stem}.png", _title(args, done))
    result = _result(runs, optimizers, args, time.perf_counter() - t0, partial=False, path=None)
    if args.kl_ratio_steps:
        result["kl_ratio"] = {
            name: kl_ratio(name, args.seeds[:2], args) for name in ("kfac", "kld-wrm-q") if name in optimizers
        }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    _plot(runs, optimizers, args.out / f"{stem}.png", _title(args, args.seeds))
    logger.info("%-12s %-6s %-16s %-8s %s", "optimizer", "lr", "test acc (%)", "s/epoch", "CPU s/epoch")
    for name, s in result["summary"].items():
        logger.info("%-12s %-6g %6.2f ± %-7.2f %-8.2f %.2f", name, s["lr"], s["test_acc_mean"], s["test_acc_std"],
                    s["seconds_per_epoch"], s["cpu_seconds_per_epoch"])
    for name, r in result.get("kl_ratio", {}).items():
        logger.info("%s: exact KL / K-FAC second-order KL of the step: median %.1f, quartiles %.1f-%.1f",
                    name, r["median"], r["quartiles"][0], r["quartiles"][2])
    logger.info("wall %.0f s; wrote %s", result["wall_seconds"], args.out / f"{stem}.json")
    return result


if __name__ == "__main__":
    main()

"""Other libraries' optimizers beside the onlinela K-FAC family, each with its own documented defaults (issue 12, item 10).

Two workloads on the bundled MNIST subset (4,000 train / 1,000 held-out images):

* ``mnist-ae``: the K-FAC paper's deep autoencoder at width 0.25
  (784-250-125-62-30 and mirror, logistic units, sparse init from
  :class:`onlinela_torch.models.MNISTAutoencoder`), binary cross-entropy on
  logits (mean), batch 500.  Score: held-out BCE; the summed squared error of
  the reconstruction per image is reported too.
* ``mnist-cnn``: conv 5x5 (8) + max-pool, conv 3x3 (16) + max-pool, FC 784-64,
  FC 64-10, ReLU, cross-entropy, batch 128 (the zoo's ``cnn_maxpool``).
  Score: held-out cross-entropy; accuracy reported too.

Methods, every one with its library's defaults and only the lr from the grid:

* ``sgd`` (``torch.optim.SGD``, momentum 0.9), ``adam`` (``torch.optim.Adam``).
* ``muon``: ``torch.optim.Muon`` on the hidden 2-D matrices (every ``nn.Linear``
  weight except the first and the last weight-bearing layer's), ``torch.optim.Adam``
  on the rest (biases, convolutions, the input and output layers), as the
  Muon docstring advises; ``adjust_lr_fn="match_rms_adamw"`` so that one lr
  serves both, as that docstring describes.
* ``soap``, ``psgd-kron``: ``heavyball.SOAP`` / ``heavyball.PSGDKron``, eager
  (``heavyball.utils.compile_mode = None``; the ``peers`` extra installs heavyball).
* ``kfac-pytorch``: ``kfac.preconditioner.KFACPreconditioner(model,
  lr=lambda s: opt.param_groups[0]["lr"])`` in front of SGD momentum 0.9, as in
  its README and examples (only used when ``kfac`` is importable: it is not on
  the package index; never a dependency of this package).
* the onlinela K-FAC methods and optimizer classes exactly as in
  ``benchmarks/zoo.py`` (``KFACPreconditioner(model, method=m)`` + SGD momentum
  0.9; ``KFAC/RSKFAC/BKFAC(model, lr=lr)``).

Budget: the same process CPU time per run (``time.process_time``,
``torch.set_num_threads(1)``), held-out loss at 10 fractions of it, eval time
excluded; the best lr per method by the final held-out loss.  A library that
cannot be imported is reported as absent (with the reason) in the JSON.

Usage::

    .venv/bin/python benchmarks/peers.py                       # make peers (5 s a run)
    .venv/bin/python benchmarks/peers.py --budget 10 --workers 2

Writes ``benchmarks/results/peers.json`` and ``peers.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import zoo  # noqa: E402  (benchmarks/zoo.py: tasks, runs, summaries)

from onlinela_torch.models import MNISTAutoencoder  # noqa: E402

logger = logging.getLogger("benchmarks.peers")
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)
PEERS = ("muon", "soap", "psgd-kron", "kfac-pytorch")

TASKS = (
    zoo.Task("mnist-ae", "autoencoder", "mnist-ae", lambda: MNISTAutoencoder(784, width=0.25), "bce", "mean", 500,
             budget=5.0, note="K-FAC paper autoencoder at width 0.25, sparse init, logistic units, BCE on logits"),
    zoo.Task("mnist-cnn", "classification", "mnist", lambda: zoo.cnn_maxpool("relu"), "ce", "mean", 128,
             budget=5.0, note="conv-pool-conv-pool-FC-FC, ReLU"),
)  # fmt: skip


def task_by_name(name: str) -> zoo.Task:
    """The peers task ``name``."""
    for t in TASKS:
        if t.name == name:
            return t
    raise ValueError(f"`--tasks`: unknown task {name!r}; expected some of {', '.join(t.name for t in TASKS)}")


# =========================================================================== other libraries
def availability() -> dict[str, str | None]:
    """``{peer: None if importable else the reason}``."""
    out: dict[str, str | None] = {"muon": None if hasattr(torch.optim, "Muon") else f"torch {torch.__version__} has no Muon"}
    for name, module in (("soap", "heavyball"), ("psgd-kron", "heavyball"), ("kfac-pytorch", "kfac.preconditioner")):
        try:
            __import__(module)
            out[name] = None
        except Exception as exc:  # ImportError, or a broken install
            out[name] = f"cannot import {module}: {exc!r}"
    return out


def versions() -> dict[str, str | None]:
    """Installed versions of the peer libraries (None when absent)."""
    from importlib import metadata

    out = {}
    for dist in ("heavyball", "kfac-pytorch", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


class _Both(torch.optim.Optimizer):
    """Steps several optimizers as one (Muon on the hidden matrices, Adam on the rest)."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]
        self.state = {}
        self.defaults = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        for o in self.opts:
            o.step()


def muon(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Muon`` on hidden Linear weights, ``torch.optim.Adam`` on every other parameter."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    hidden = [m.weight for m in layers[1:-1] if isinstance(m, nn.Linear)]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opts = [torch.optim.Adam(rest, lr=lr)]
    if hidden:
        opts.insert(0, torch.optim.Muon(hidden, lr=lr, adjust_lr_fn="match_rms_adamw"))
    return _Both(opts)


class PeerStepper(zoo.Stepper):
    """The zoo's stepper plus the other libraries' optimizers."""

    def __init__(self, method: str, model: nn.Module, lr: float, task: zoo.Task, kw: dict, kld_kw: dict) -> None:
        if method not in PEERS:
            super().__init__(method, model, lr, task, kw, kld_kw)
            return
        self.model, self.task, self.extra, self.closure_needed = model, task, None, False
        if method == "muon":
            self.opt = muon(model, lr)
        elif method in ("soap", "psgd-kron"):
            import heavyball
            import heavyball.utils

            heavyball.utils.compile_mode = None  # eager on CPU
            cls = heavyball.SOAP if method == "soap" else heavyball.PSGDKron
            self.opt = cls(model.parameters(), lr=lr)
        else:
            from kfac.preconditioner import KFACPreconditioner as PeerKFAC

            self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            opt = self.opt
            self.extra = PeerKFAC(model, lr=lambda step: opt.param_groups[0]["lr"])


def run_peer(spec: zoo.RunSpec) -> dict[str, Any]:
    """One run of a peers task (picklable for worker processes)."""
    logging.getLogger("kfac").setLevel(logging.WARNING)
    return zoo.run_one(spec, task_by_name(spec.task), PeerStepper)


# =========================================================================== report
def peers_table(summary: dict[str, Any], runs: list[dict]) -> str:
    """Per task and method: best lr, held-out loss, ratio to min(SGD, Adam), squared error / accuracy, step time."""
    extra: dict[tuple, list[float]] = {}
    for r in runs:
        best = summary["per_task"][r["task"]]["methods"][r["method"]]["best_lr"]
        if r["lr"] == best and not r["diverged"]:
            v = r.get("final_test_sqerr_per_sample", r.get("final_test_acc"))
            if v is not None:
                extra.setdefault((r["task"], r["method"]), []).append(v)
    lines = []
    for task, t in summary["per_task"].items():
        metric = "sqerr/img" if task_by_name(task).kind == "autoencoder" else "acc %"
        lines.append(f"{task}: {'method':<14} {'lr':>7} {'held-out':>10} {'ratio':>7} {metric:>10} {'step/SGD':>9}")
        rows = sorted(t["methods"].items(), key=lambda kv: kv[1]["score"] if kv[1]["score"] is not None else math.inf)
        for method, c in rows:
            e = extra.get((task, method))
            lines.append(
                f"{'':<{len(task) + 2}}{method:<14} {c['best_lr'] if c['best_lr'] is not None else '-':>7} "
                f"{(c['score'] if c['score'] is not None else math.inf):>10.4g} {(c['ratio'] or math.inf):>7.3g} "
                f"{(sum(e) / len(e) if e else math.nan):>10.4g} {(c['step_time_vs_sgd'] or math.nan):>9.2f}"
            )
    return "\n".join(lines)


def peers_rst(summary: dict[str, Any], runs: list[dict]) -> str:
    """One reST table per task (as :func:`peers_table`) for docs/results.rst."""
    out = []
    for task, t in summary["per_task"].items():
        metric = "squared error / image" if task_by_name(task).kind == "autoencoder" else "accuracy %"
        header = ["method", "best lr", "held-out loss", "/ min(SGD, Adam)", metric, "step / SGD step"]
        rows = []
        order = sorted(t["methods"].items(), key=lambda kv: kv[1]["score"] if kv[1]["score"] is not None else math.inf)
        for method, c in order:
            vals = [
                r.get("final_test_sqerr_per_sample", r.get("final_test_acc"))
                for r in runs
                if r["task"] == task and r["method"] == method and r["lr"] == c["best_lr"] and not r["diverged"]
            ]
            vals = [v for v in vals if v is not None]
            rows.append([
                method, "-" if c["best_lr"] is None else f"{c['best_lr']:g}",
                "diverged" if c["score"] is None else f"{c['score']:.4f}",
                "" if c["ratio"] is None else f"{c['ratio']:.2f}",
                f"{sum(vals) / len(vals):.1f}" if vals else "",
                "" if c["step_time_vs_sgd"] is None else f"{c['step_time_vs_sgd']:.2f}",
            ])  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        rule = "  ".join("=" * w for w in widths)
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out += [f"``{task}``:", "", rule, line(header), rule, *map(line, rows), rule, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the peers benchmark; write JSON + PNG; print the table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(t.name for t in TASKS))
    p.add_argument("--methods", default=None, help="default: sgd, adam, the peers, every onlinela K-FAC method and class")
    p.add_argument("--lrs", default=",".join(map(str, DEFAULT_LRS)))
    p.add_argument("--budget", type=float, default=None, help="process CPU seconds per run (default 5)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--kw", nargs="*", default=[], help="extra KFACPreconditioner options for the onlinela runs")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=str(zoo.RESULTS / "peers.json"))
    p.add_argument("--report", nargs="+", default=None,
                   help="print the tables (text and reST) of written JSONs, merged (e.g. one per seed); runs nothing")
    args = p.parse_args(argv)
    if args.report:
        runs = zoo.merge_runs([json.loads(pathlib.Path(f).read_text()) for f in args.report])
        summary = zoo.summarize(runs)
        print(peers_table(summary, runs), peers_rst(summary, runs), sep="\n\n")
        return 0
    avail = availability()
    for name, why in avail.items():
        if why:
            logger.warning("peer %s absent: %s", name, why)
    methods = args.methods.split(",") if args.methods else [*zoo.FIRST_ORDER, *PEERS, *zoo.kfac_methods(), *zoo.CLASSES]
    known = set(zoo.all_methods("time")) | set(PEERS)
    for m in methods:
        if m not in known:
            raise SystemExit(f"--methods: unknown method {m!r}; expected some of {', '.join(sorted(known))}")
    methods = [m for m in methods if not avail.get(m)]
    kw = zoo._kv(args.kw, "--kw")
    todo = [
        zoo.RunSpec(t.name, m, float(lr), int(seed), args.budget or t.budget, "time", kw)
        for t in map(task_by_name, args.tasks.split(","))
        for m in methods
        for lr in args.lrs.split(",")
        for seed in args.seeds.split(",")
    ]
    env = zoo.environment()  # before the runs: the library the workers import is the one checked out now
    t0 = time.perf_counter()
    runs = []
    if args.workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for i, rec in enumerate(pool.imap(run_peer, todo), 1):
                zoo._log(i, len(todo), rec)
                runs.append(rec)
    else:
        for i, spec in enumerate(todo, 1):
            rec = run_peer(spec)
            zoo._log(i, len(todo), rec)
            runs.append(rec)
    summary = zoo.summarize(runs)
    out = pathlib.Path(args.out)
    doc = dict(
        benchmark="peers", argv=sys.argv[1:] if argv is None else list(argv),
        budget_unit="process CPU seconds per run", lrs=sorted({s.lr for s in todo}), kw=dict(kw),
        absent={k: v for k, v in avail.items() if v}, versions=versions(),
        tasks={t.name: dict(dataclasses.asdict(t) | {"model": None}) for t in TASKS},
        environment=env, wall_seconds=time.perf_counter() - t0, summary=summary, runs=runs,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(zoo.clean(doc), indent=1, allow_nan=False))
    zoo.plot(summary, out.with_suffix(".png"), f"peers ({doc['environment']['git'][:12]})")
    print(peers_table(summary, runs))
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({doc['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-step cost of every K-FAC-family method as a ratio to an SGD step (issue 14, deliverable 5).

Each run: the task's model (seed 0), ``torch.optim.SGD(lr=0.01, momentum=0.9)``
and, for the K-FAC family, ``KFACPreconditioner(model, method=m, optimizer=opt)``
with the library defaults; one fixed training batch, one thread, process CPU
time (``time.process_time``).  Two windows are timed:

* **warm-up**: steps ``0 .. T_inv-1`` (the default ``warmup=True`` captures
  statistics every step and decomposes after 1, 4, 16 batches);
* **steady**: steps ``100 .. 100+steps-1`` (with the default periods
  ``T_updt = 10``, ``T_inv = 50`` and ``steps = 100`` that is exactly two
  decomposition periods, so the mean *is* the amortised step cost).

Each window is split into forward, backward, ``precond.step()`` and
``optimizer.step()``, and by the preconditioner's own timers
(``timer=time.process_time``) into statistics (hooks and EA updates: part of
forward/backward), decomposition and preconditioning; the ratio is the method's mean step time over SGD's
steady-state one (the convention curvlinops uses).  Tasks: the zoo
(``benchmarks/zoo.py``), the showcase ``mnist-autoencoder``
(:class:`~onlinela_torch.models.MNISTAutoencoder`, width 0.25 as ``onlinela
compare`` runs it, batch 1000) and ``tiny-lm``
(:class:`~onlinela_torch.models.TinyCausalLM`, d_model 64, 2 layers, batch 32
windows of 64 characters of the bundled pydoc text).

Usage::

    .venv/bin/python benchmarks/step_overhead.py --label after            # all tasks, all methods
    .venv/bin/python benchmarks/step_overhead.py --tasks mnist-mlp-gelu --methods sgd,kfac --label quick
    .venv/bin/python benchmarks/step_overhead.py --plot-only              # PNG from the JSONs

Writes ``benchmarks/results/step_overhead_<label>.json`` and
``step_overhead.png`` (before/after bars when both JSONs exist).  Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import zoo  # noqa: E402

from onlinela_torch import KFACPreconditioner  # noqa: E402
from onlinela_torch.data import load_pydoc_text  # noqa: E402
from onlinela_torch.models import MNISTAutoencoder, TinyCausalLM  # noqa: E402
from onlinela_torch.preconditioner import METHODS  # noqa: E402

logger = logging.getLogger("benchmarks.step_overhead")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PHASES = ("forward", "backward", "precond", "optimizer")
WARMUP_STEPS = 50  # the default T_inv: the warm-up window
STEADY_START = 100


class Workload:
    """A model factory, one batch and its loss."""

    def __init__(self, name: str, model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.name, self.model, self.x, self.y, self.loss = name, model, x, y, loss


def _zoo_workload(task: zoo.Task) -> Workload:
    split = zoo.load(task.data)
    return Workload(task.name, task.model, split.x_train[: task.batch], split.y_train[: task.batch],
                    lambda out, y: zoo.loss_fn(task, out, y))


def _showcase() -> Workload:
    split = zoo.load("mnist-ae")
    x = split.x_train[:1000]

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="sum") / y.shape[0]

    return Workload("mnist-autoencoder", lambda: MNISTAutoencoder(784, width=0.25), x, x, loss)


def _tiny_lm(batch: int = 32, context: int = 64) -> Workload:
    corpus = load_pydoc_text()
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, corpus.train.numel() - context - 1, (batch,), generator=gen)
    x = torch.stack([corpus.train[s : s + context] for s in starts.tolist()])
    y = torch.stack([corpus.train[s + 1 : s + context + 1] for s in starts.tolist()])
    vocab = corpus.vocab_size

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return Workload("tiny-lm", lambda: TinyCausalLM(vocab, context=context), x, y, loss)


def workloads(names: list[str] | None) -> list[Workload]:
    """The named workloads (all by default): the zoo tasks, ``mnist-autoencoder``, ``tiny-lm``."""
    table: dict[str, Callable[[], Workload]] = {t.name: (lambda t=t: _zoo_workload(t)) for t in zoo.TASKS}
    table["mnist-autoencoder"] = _showcase
    table["tiny-lm"] = _tiny_lm
    names = list(table) if names is None else names
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"`--tasks`: unknown {unknown}; expected some of {', '.join(table)}")
    return [table[n]() for n in names]


def time_method(w: Workload, method: str, steps: int) -> dict[str, Any]:
    """Per-phase mean milliseconds of the warm-up and steady windows of one method on one workload."""
    torch.manual_seed(0)
    model = w.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pre = None if method == "sgd" else KFACPreconditioner(model, method=method, optimizer=opt, timer=time.process_time)
    marks: dict[tuple[str, str], dict[str, float]] = {}
    windows = {"warmup": range(0, WARMUP_STEPS), "steady": range(STEADY_START, STEADY_START + steps)}
    acc = {k: dict.fromkeys(PHASES, 0.0) for k in windows}
    clock = time.process_time
    for i in range(STEADY_START + steps):
        if pre is not None:
            for name, rng in windows.items():
                for edge, at in (("start", rng.start), ("stop", rng.stop)):
                    if i == at:
                        marks[name, edge] = dict(pre.stats()["seconds"])
        t0 = clock()
        opt.zero_grad()
        loss = w.loss(model(w.x), w.y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        if pre is not None:
            pre.step()
        t3 = clock()
        opt.step()
        t4 = clock()
        for name, rng in windows.items():
            if i in rng:
                for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    acc[name][phase] += dt
    if pre is not None:
        marks["steady", "stop"] = dict(pre.stats()["seconds"])
    out: dict[str, Any] = {}
    for name, rng in windows.items():
        ms = {p: 1e3 * v / len(rng) for p, v in acc[name].items()}
        out[name] = dict(ms, total=sum(ms.values()))
        if (name, "start") in marks and (name, "stop") in marks:  # the preconditioner's own phase split (CPU ms/step)
            a, b = marks[name, "start"], marks[name, "stop"]
            out[name]["phases"] = {k: 1e3 * (b[k] - a[k]) / len(rng) for k in b}
    out["final_loss"] = loss.item()
    return out


def _prime(w: Workload) -> None:
    """Two untimed steps on a throwaway model: torch's one-off first-call costs stay out of every window."""
    model = w.model()
    for _ in range(2):
        w.loss(model(w.x), w.y).backward()


def run(names: list[str] | None, methods: list[str], steps: int) -> dict[str, Any]:
    """Every method on every workload, with the ratios to SGD's steady-state step."""
    results: dict[str, Any] = {}
    for w in workloads(names):
        _prime(w)
        per = {}
        for m in methods:
            per[m] = time_method(w, m, steps)
            logger.info("%-18s %-13s steady %7.2f ms  warm-up %7.2f ms", w.name, m, per[m]["steady"]["total"],
                        per[m]["warmup"]["total"])
        if "sgd" in per:
            ref = per["sgd"]["steady"]["total"]
            for m, r in per.items():
                r["ratio_steady"] = r["steady"]["total"] / ref
                r["ratio_warmup"] = r["warmup"]["total"] / ref
        results[w.name] = per
    return results


def plot(paths: dict[str, pathlib.Path], out: pathlib.Path) -> None:
    """Grouped bars: steady-state ratio to SGD per task and method, one hatch per JSON label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: json.loads(p.read_text())["results"] for label, p in paths.items() if p.exists()}
    if not data:
        raise FileNotFoundError(f"none of {[str(p) for p in paths.values()]} exists")
    tasks = list(next(iter(data.values())))
    methods = [m for m in next(iter(data.values()))[tasks[0]] if m != "sgd"]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 1.9 * len(tasks)), sharex=True, squeeze=False)
    width = 0.8 / len(data)
    for ax, task in zip(axes[:, 0], tasks):
        for j, (label, res) in enumerate(data.items()):
            vals = [res.get(task, {}).get(m, {}).get("ratio_steady", float("nan")) for m in methods]
            ax.bar([i + j * width for i in range(len(methods))], vals, width, label=label, hatch="//" if j else None)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(task, rotation=0, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8, ncol=len(data))
    axes[-1, 0].set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, fontsize=8)
    fig.suptitle("step time / SGD step time (steady state, 1 thread, process CPU time)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def rst_table(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    """An RST list-table: per task and method the steady-state (and warm-up) ratio to SGD, before -> after."""
    methods = [m for m in next(iter(after.values())) if m != "sgd"]
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - task (SGD ms/step)"]
    lines += [f"     - {m}" for m in methods]
    for task, res in after.items():
        lines.append(f"   * - {task} ({res['sgd']['steady']['total']:.2f})")
        for m in methods:
            a = res[m]
            cell = f"{a['ratio_steady']:.2f} ({a['ratio_warmup']:.1f})"
            b = (before or {}).get(task, {}).get(m)
            if b is not None:
                cell = f"{b['ratio_steady']:.2f} → {cell}"
            lines.append(f"     - {cell}")
    return "\n".join(lines)


def phase_table(after: dict[str, Any], methods: tuple[str, ...] = ("kfac", "rs-kfac", "b-kfac")) -> str:
    """An RST list-table of the steady-state phase split (ms/step): statistics, decomposition, preconditioning."""
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - task", "     - SGD step"]
    lines += [f"     - {m}: stat / dec / prec" for m in methods]
    for task, res in after.items():
        lines += [f"   * - {task}", f"     - {res['sgd']['steady']['total']:.2f}"]
        for m in methods:
            ph = res.get(m, {}).get("steady", {}).get("phases")
            cell = "" if ph is None else f"{ph['statistics']:.2f} / {ph['decomposition']:.2f} / {ph['preconditioning']:.2f}"
            lines.append(f"     - {cell}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=None, help="comma-separated workloads (default: all)")
    p.add_argument("--methods", default=",".join(("sgd", *METHODS)))
    p.add_argument("--steps", type=int, default=100, help="steady-state steps timed (from step 100)")
    p.add_argument("--label", default="after", help="JSON name suffix, e.g. before / after")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--rst", action="store_true", help="print the docs table from the before/after JSONs and exit")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True): subnormal floats slow some tasks' backward ~7x on x86")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    RESULTS.mkdir(exist_ok=True)
    labels = {lab: RESULTS / f"step_overhead_{lab}.json" for lab in ("before", "after")}
    if args.label not in labels:  # a side run (e.g. ftz_before / ftz_after): its own PNG
        labels = {lab: RESULTS / f"step_overhead_{args.label.rsplit('_', 1)[0]}_{lab}.json" for lab in ("before", "after")}
    if args.rst:
        got = {lab: json.loads(path.read_text())["results"] for lab, path in labels.items() if path.exists()}
        print(rst_table(got.get("before"), got["after"]))
        if any("phases" in r["steady"] for res in got["after"].values() for r in res.values()):
            print()
            print(phase_table(got["after"]))
        return 0
    if not args.plot_only:
        torch.set_num_threads(1)
        torch.set_flush_denormal(args.flush_denormal)
        methods = args.methods.split(",")
        results = run(None if args.tasks is None else args.tasks.split(","), methods, args.steps)
        env = zoo.environment()
        import onlinela_torch

        env.update(library=onlinela_torch.__file__, flush_denormal=args.flush_denormal, steps=args.steps, warmup_window=[0, WARMUP_STEPS], steady_window=[STEADY_START, STEADY_START + args.steps])
        path = RESULTS / f"step_overhead_{args.label}.json"
        path.write_text(json.dumps(zoo.clean({"environment": env, "results": results}), indent=1))
        logger.info("wrote %s", path)
        labels.setdefault(args.label, path)
    stem = "step_overhead" if "before" in labels and labels["before"].name == "step_overhead_before.json" else (
        f"step_overhead_{args.label.rsplit('_', 1)[0]}")
    plot(labels, RESULTS / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

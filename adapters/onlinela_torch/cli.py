"""The ``onlinela`` command: compare, train and inspect K-FAC-family optimizers.

Subcommands
-----------
compare   every available optimizer on one task, same seeds and budget, learning
          rates picked from one grid by a short probe; table, JSON and PNG
train     one optimizer on one task, with checkpoint and resume
spectrum  eigenvalue decay of real EA K-factors at several widths vs the EA bound
demo      ``compare`` with a budget that runs in a few minutes on 2 CPU cores

Data are read from disk only (see :mod:`onlinela_torch.data`); results go to
``--out`` (default ``out/<command>``).
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import logging
import math
import os
import pathlib
import platform
import re
import signal
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import distributed as dp
from . import experiment as ex
from . import plots
from .data import DataError, Dataset, TextCorpus

logger = logging.getLogger("onlinela_torch")

DEFAULT_LR_GRID = (0.1, 0.01, 0.001)
#: ``onlinela demo``: the MNIST MLP on the bundled subset, every optimizer, one seed, one thread.
DEMO_DEFAULTS = {"task": "mnist-mlp", "epochs": 5, "probe_epochs": 1.0, "threads": 1, "out": "out/demo"}


class CLIError(Exception):
    """A bad argument found after parsing; ``main`` prints it and returns 2."""


class RunFailed(Exception):
    """A requested run failed (``compare`` without ``--keep-going``); ``main`` prints it and returns 1."""


# ------------------------------------------------------------ argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _list_of(kind: Any) -> Any:
    def parse(text: str) -> list[Any]:
        items = [t for t in text.replace(" ", "").split(",") if t]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]

    return parse


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _momentum(text: str) -> float:
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text!r}")
    return value


def _open_unit(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. damping=0.01), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


# ------------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available in this torch build ({torch.__version__})")
    return device


def _task(args: argparse.Namespace) -> ex.Task:
    task = ex.TASKS[args.task]
    if task.needs_data_dir and args.data_dir is None:
        raise CLIError(f"task {task.name} needs --data-dir (a directory holding the CIFAR-10 python batches)")
    return task


def _load(args: argparse.Namespace, task: ex.Task) -> Dataset | TextCorpus:
    device = _device(args.device)
    try:
        return ex.load_task_data(task, data_dir=args.data_dir, max_train=args.max_train, device=device)
    except DataError:
        raise
    except ValueError as exc:  # --max-train too small for a text task
        raise CLIError(f"--max-train: {exc}") from None


def _progress(args: argparse.Namespace, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=args.quiet or not sys.stderr.isatty())


def _environment(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def _out_dir(args: argparse.Namespace) -> pathlib.Path:
    out = pathlib.Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot create the output directory: {exc}") from None
    return out


def _write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    path.write_text(json.dumps(clean(payload), indent=1))


def _kfac_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(args.kfac_opt or [])


def _build(args: argparse.Namespace, task: ex.Task, data: Dataset | TextCorpus, name: str, lr: float,
           seed: int) -> tuple[Any, Any]:
    """A model initialised from ``seed`` and its optimizer."""
    torch.manual_seed(seed)
    model = task.build_model(data, args.width).to(ex.data_device(data))
    return model, _stepper(args, task, model, name, lr)


def _stepper(args: argparse.Namespace, task: ex.Task, model: torch.nn.Module, name: str, lr: float) -> ex.Stepper:
    """The optimizer ``name`` for ``model``; a ``--kfac-opt`` the preconditioner refuses is a :class:`CLIError`."""
    try:
        return ex.build_stepper(name, model, lr=lr, momentum=args.momentum, kfac_momentum=args.kfac_momentum,
                                weight_decay=args.weight_decay, kfac_options=_kfac_options(args), task=task)
    except ex.OptionError as exc:
        raise CLIError(f"--kfac-opt: {exc}") from None
    except (ValueError, TypeError) as exc:  # the preconditioner's argument checks
        if not args.kfac_opt:
            raise
        raise CLIError(f"--kfac-opt: {name}: {exc}") from None


#: ``--kfac-opt`` keys that another option sets (the registry drops them from the keywords).
_KFAC_OPT_OWNED = {"lr": "--lr (or --lr-grid)"}


def _check_kfac_options(options: dict[str, Any], names: Sequence[str]) -> None:
    """Refuse ``--kfac-opt`` keys that contradict ``--optimizers``/``--optimizer`` or another option.

    ``method`` must be the method of every requested K-FAC-family optimizer
    (KLD-WRM ignores it); ``lr`` belongs to ``--lr``; options with no
    curvature optimizer among ``names`` would be ignored.
    """
    if not options:
        return
    specs = ex.available_optimizers()
    curvature = [n for n in names if specs[n].family != "baseline"]
    if not curvature:
        raise CLIError(f"--kfac-opt {', '.join(options)}: applies to the K-FAC family and KLD-WRM, "
                       f"and none of {', '.join(names)} is one")
    for key, flag in _KFAC_OPT_OWNED.items():
        if key in options:
            raise CLIError(f"--kfac-opt {key}={options[key]!r}: set it with {flag}, not --kfac-opt")
    if "method" in options:
        clash = [n for n in curvature if specs[n].family != "kfac" or specs[n].variant != options["method"]]
        if clash:
            raise CLIError(f"--kfac-opt method={options['method']!r} contradicts the requested optimizer(s) "
                           f"{', '.join(clash)}; choose the method with --optimizers/--optimizer instead")


def _validate_kfac_options(args: argparse.Namespace, task: ex.Task, data: Dataset | TextCorpus,
                           names: Sequence[str]) -> None:
    """Build each requested curvature optimizer once, so a bad ``--kfac-opt`` value fails before any training."""
    if not args.kfac_opt:
        return
    specs = ex.available_optimizers()
    for name in names:
        if specs[name].family != "baseline":
            _build(args, task, data, name, specs[name].lr, 0)


def _optimizer_names(requested: Sequence[str] | None, task: ex.Task) -> list[str]:
    """Validated optimizer names; nothing is the task's :attr:`~onlinela_torch.experiment.Task.optimizers`
    when it names some, ``all`` (or nothing) every available one that suits ``task``."""
    specs = ex.available_optimizers()
    if not requested and task.optimizers:
        missing = [n for n in task.optimizers if n not in specs]
        if missing:
            logger.warning("%s: %s not available in this installation, left out", task.name, ", ".join(missing))
        return [n for n in task.optimizers if n in specs]
    if not requested or requested == ["all"]:
        names = [n for n, s in specs.items() if task.is_classifier or not s.classification_only]
        if len(names) < len(specs):
            logger.info("KLD-WRM needs a classifier with (n, C) logits: left out of %s", task.name)
        return names
    unknown = [n for n in requested if n not in specs]
    if unknown:
        missing = [n for n in unknown if n in ex.KFAC_METHODS or n.startswith("kld-wrm-")]
        hint = f" ({', '.join(missing)} need the K-FAC family, not importable in this installation)" if missing else ""
        raise CLIError(f"unknown optimizer(s) {', '.join(unknown)}{hint}; available: {', '.join(specs)}")
    unsuited = [n for n in requested if specs[n].classification_only and not task.is_classifier]
    if unsuited:
        kind = "an autoencoder" if task.is_autoencoder else "a language model ((n, T, V) logits)"
        raise CLIError(f"{', '.join(unsuited)} need a classification task; {task.name} is {kind}")
    return list(dict.fromkeys(requested))


# ------------------------------------------------------------------- compare
def _compare(args: argparse.Namespace) -> int:
    task = _task(args)
    names = _optimizer_names(args.optimizers, task)
    _check_kfac_options(_kfac_options(args), names)
    data = _load(args, task)
    _validate_kfac_options(args, task, data, names)
    epochs = args.epochs or task.epochs
    batch = args.batch_size or task.batch_size
    targets = args.targets or list(task.targets)
    grid = [args.lr] if args.lr else (args.lr_grid or list(DEFAULT_LR_GRID))
    steps_per_epoch = task.steps_per_epoch(data, batch)
    probe_epochs = args.probe_epochs if args.probe_epochs is not None else task.probe_epochs
    probe_steps = max(1, math.ceil(probe_epochs * steps_per_epoch))
    out = _out_dir(args)
    preset = {} if args.lr or args.lr_grid else {n: task.lrs[n] for n in names if n in task.lrs}  # not probed
    logger.info(
        "compare: %s, %s, %d epochs x %d steps, batch %d, seeds %s, %s",
        task.name, ", ".join(names), epochs, steps_per_epoch, batch, args.seeds,
        f"lr grid {grid}" if len(preset) < len(names) else "the task's learning rates",
    )
    if preset:
        logger.info("compare: %s sets the learning rates %s (no probe; --lr-grid probes them)", task.name, preset)

    def run(name: str, lr: float, seed: int, *, max_steps: int | None = None) -> ex.RunResult:
        model, stepper = _build(args, task, data, name, lr, seed)
        n_epochs = epochs if max_steps is None else math.ceil(max_steps / steps_per_epoch)
        with _progress(args, n_epochs, f"{name} lr={lr:g} seed={seed}") as bar:
            return ex.train(task, data, model, stepper, epochs=n_epochs, batch_size=batch, seed=seed,
                            max_steps=max_steps, progress=bar)

    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    t_start = time.perf_counter()
    for name in names:
        try:
            if name in preset:
                lr, scores, source = preset[name], {}, "task"
            elif len(grid) > 1:
                lr, scores = ex.select_lr(task, grid, lambda lr: run(name, lr, args.seeds[0], max_steps=probe_steps))
                logger.info("%s: probe %s -> lr %g", name, {k: round(v, 4) for k, v in scores.items()}, lr)
                source = "probe"
            else:
                lr, scores, source = grid[0], {}, "given"
            runs = {seed: run(name, lr, seed) for seed in args.seeds}
        except CLIError:
            raise
        except Exception as exc:  # reported on one line; --verbose logs the traceback
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            logger.debug("%s failed", name, exc_info=True)
            if not args.keep_going:
                raise RunFailed(f"{name} failed: {why} (--keep-going leaves failed optimizers out and "
                                "runs the others)") from None
            logger.warning("%s failed and is left out (--keep-going): %s", name, why)
            failed[name] = why
            continue
        results[name] = {"lr_source": source, **_summarise(task, targets, name, lr, scores, runs)}
    wall = time.perf_counter() - t_start
    if not results:
        raise RunFailed(f"every requested optimizer failed: {'; '.join(f'{n}: {w}' for n, w in failed.items())}")
    clock = _step_clock(ex.data_device(data))
    _add_step_ratios(results, clock)

    payload = {
        "command": "compare",
        "task": task.name,
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "data": task.data_summary(data),
        "config": {"epochs": epochs, "batch_size": batch, "seeds": args.seeds, "targets": targets,
                   "lr_grid": grid, "probe_steps": probe_steps if len(grid) > 1 and len(preset) < len(names) else 0,
                   "width": args.width if args.width is not None else task.width, "momentum": args.momentum,
                   "kfac_momentum": args.kfac_momentum if args.kfac_momentum is not None else task.kfac_momentum,
                   "weight_decay": args.weight_decay, "kfac_options": {**task.kfac, **_kfac_options(args)},
                   "step_clock": clock},
        "environment": _environment(ex.data_device(data)),
        "wall_seconds": wall,
        "results": results,
        "failed": failed,
    }
    _write_json(out / "compare.json", payload)
    _plot_compare(out / "compare.png", task, targets, results)
    sys.stdout.write(_compare_table(task, targets, results, failed, steps_per_epoch, clock))
    sys.stdout.write(f"\n{wall:.0f} s in all; wrote {out / 'compare.json'} and {out / 'compare.png'}\n")
    return 0


def _summarise(task: ex.Task, targets: Sequence[float], name: str, lr: float, scores: dict[float, float],
               runs: dict[int, ex.RunResult]) -> dict[str, Any]:
    per_seed = []
    for seed, res in runs.items():
        hits = {str(t): ex.reached(task, res.history, t) for t in targets}
        cpu_hits = {str(t): ex.reached(task, res.history, t, clock="cpu_seconds") for t in targets}
        per_seed.append({
            "seed": seed,
            "final_metric": res.final_metric,
            "diverged": res.diverged,
            "seconds_per_epoch": res.seconds_per_epoch,
            "step_seconds": res.step_seconds,
            "step_cpu_seconds": res.step_cpu_seconds,
            "time_to_target": {t: h[0] if h else None for t, h in hits.items()},
            "cpu_time_to_target": {t: h[0] if h else None for t, h in cpu_hits.items()},
            "epochs_to_target": {t: h[1] if h else None for t, h in hits.items()},
            "phase_seconds": res.phase_seconds,
            "hyperparameters": res.hyperparameters,
            "factors": res.factors,
            "history": res.history,
        })
    finals = [r["final_metric"] for r in per_seed if math.isfinite(r["final_metric"])]
    return {
        "lr": lr,
        "probe": {str(k): v for k, v in scores.items()},
        "final_metric_mean": statistics.fmean(finals) if finals else math.nan,
        "final_metric_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in per_seed),
        "step_seconds": statistics.fmean(r["step_seconds"] for r in per_seed),
        "step_cpu_seconds": statistics.fmean(r["step_cpu_seconds"] for r in per_seed),
        "phase_seconds": {k: statistics.fmean(r["phase_seconds"][k] for r in per_seed) for k in ex._PHASES},
        **_brand_split(name, per_seed[0]["factors"]),
        "runs": per_seed,
    }


def _brand_split(name: str, factors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``brand_factors`` (Brand-updated) and ``fallback_factors`` (a Brand method's RS-KFAC fallback) of a run.

    The split is decided by the factors' dimensions, the rank and the batch
    (``rank + s < d``), so it is the same for every seed.  Empty lists for
    the methods that are not Brand methods.
    """
    brand = [f for f, v in factors.items() if v["kind"] in ex.BRAND_KINDS]
    fallback = [f for f, v in factors.items() if v["kind"] == "randomized"] if name in ex.BRAND_METHODS else []
    return {"n_factors": len(factors), "brand_factors": brand, "fallback_factors": fallback}


def _step_clock(device: torch.device) -> str:
    """The clock of the step ratios: process CPU time on a CPU (steady on a shared machine), else wall-clock."""
    return "cpu" if device.type == "cpu" else "wall"


def _add_step_ratios(results: dict[str, Any], clock: str) -> None:
    """Set each result's ``step_vs_sgd``: its mean step time over SGD's in the same run (None without SGD)."""
    key = "step_cpu_seconds" if clock == "cpu" else "step_seconds"
    ref = results.get("sgd", {}).get(key, math.nan)
    usable = isinstance(ref, float) and math.isfinite(ref) and ref > 0
    if not usable:
        logger.info("compare: no SGD run with a measured step, so no step/SGD ratios (add sgd to --optimizers)")
    for r in results.values():
        value = r[key]
        r["step_vs_sgd"] = value / ref if usable and math.isfinite(value) else None


def _compare_table(task: ex.Task, targets: Sequence[float], results: dict[str, Any], failed: dict[str, str],
                   steps_per_epoch: int, clock: str) -> str:
    arrow = ">=" if task.higher_is_better else "<="
    head = ["optimizer", "lr", task.metric_name, "s/epoch", "step/SGD"]
    head += [f"{arrow}{t:g}: s / ep" for t in targets]
    head += ["stats s", "decomp s", "precond s", "Brand"]
    rows = []
    for name, r in results.items():
        n = len(r["runs"])
        metric = f"{r['final_metric_mean']:.4g}" + (f" ± {r['final_metric_std']:.2g}" if n > 1 else "")
        if any(run["diverged"] for run in r["runs"]):
            metric += " (diverged)"
        ratio = r.get("step_vs_sgd")
        row = [name, f"{r['lr']:g}", metric, f"{r['seconds_per_epoch']:.3g}",
               f"{ratio:.2f}x" if ratio is not None else "-"]
        for t in targets:
            times = [run["time_to_target"][str(t)] for run in r["runs"] if run["time_to_target"][str(t)] is not None]
            eps = [run["epochs_to_target"][str(t)] for run in r["runs"] if run["epochs_to_target"][str(t)] is not None]
            if not times:
                row.append("never")
            else:
                cell = f"{statistics.median(times):.3g} / {statistics.median(eps):g}"
                row.append(cell + (f" ({len(times)}/{n})" if len(times) < n else ""))
        row += [f"{r['phase_seconds'][k]:.3g}" if r["phase_seconds"][k] else "-" for k in ex._PHASES]
        row.append(f"{len(r['brand_factors'])}/{r['n_factors']}" if name in ex.BRAND_METHODS else "-")
        rows.append(row)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines) + "\n"
    text += "(time to target: median training seconds / epochs over the seeds that reached it; evaluation excluded)\n"
    preset = [n for n, r in results.items() if r.get("lr_source") == "task"]
    if preset:
        who = "every optimizer" if len(preset) == len(results) else ", ".join(preset)
        text += f"(lr of {who}: the task's preset, not probed; --lr-grid probes the grid)\n"
    clock = "process-CPU" if clock == "cpu" else "wall-clock"
    text += (f"(step/SGD: mean {clock} seconds of a training step, forward and backward included, over SGD's "
             "in this run" + ("" if "sgd" in results else "; needs sgd among --optimizers") + ")\n")
    if task.is_text:
        text += f"(an epoch of {task.name} is {steps_per_epoch} training steps between two evaluations)\n"
    text += _brand_lines(results)
    for name, why in failed.items():
        text += f"{name}: failed, left out ({why})\n"
    return text


def _brand_lines(results: dict[str, Any]) -> str:
    """Per Brand method (grouped when they agree): which factors were Brand-updated, which fell back to RS-KFAC."""
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for name, r in results.items():
        if name in ex.BRAND_METHODS:
            groups.setdefault((tuple(r["brand_factors"]), tuple(r["fallback_factors"])), []).append(name)
    if not groups:
        return ""
    text = ("(Brand: factors Brand-updated / all factors; a factor is Brand-updated only where rank + batch rows < d "
            "and the update is cheaper per step than the randomized fallback, BrandConfig.cost)\n")
    for (brand, fallback), names in groups.items():
        who = ", ".join(names)
        if not brand:
            text += f"{who}: no factor is Brand-eligible: every factor ran as RS-KFAC\n"
            continue
        line = f"{who}: Brand updates on {', '.join(brand)}"
        line += f"; RS-KFAC fallback on {', '.join(fallback)}" if fallback else ""
        text += textwrap.fill(line, width=110, subsequent_indent="    ", break_on_hyphens=False) + "\n"
    return text


def _plot_compare(path: pathlib.Path, task: ex.Task, targets: Sequence[float], results: dict[str, Any]) -> None:
    plots.render(plots.compare_figure(task.name, task.metric_name, task.higher_is_better, targets, results), path)


# --------------------------------------------------------------------- train
#: Settings a resumed run must share with its checkpoint; compared before any state is loaded.
_RESUME_KEYS = ("task", "optimizer", "lr", "seed", "batch_size", "width", "momentum", "kfac_momentum", "weight_decay",
                "kfac_options")


def _train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and not dp.distributed_active():
        return _spawn_train(args)
    joined = _join_torchrun(args)
    try:
        return _train_joined(args)
    finally:
        if joined:  # the teardown order of spawn(): no gloo thread outlives the interpreter's shutdown
            gc.collect()
            torch.distributed.destroy_process_group()


def _train_joined(args: argparse.Namespace) -> int:
    task = _task(args)
    name = _optimizer_names([args.optimizer], task)[0]
    _check_kfac_options(_kfac_options(args), [name])
    if args.resume and not args.checkpoint:
        raise CLIError("--resume needs --checkpoint PATH (the file to resume from)")
    if args.resume == "required" and not pathlib.Path(args.checkpoint).is_file():
        raise CLIError(f"--resume: no checkpoint at {args.checkpoint}")
    if args.checkpoint:
        _check_writable(args.checkpoint)
    spec = ex.available_optimizers()[name]
    lr = args.lr or spec.lr
    batch = args.batch_size or task.batch_size
    epochs = args.epochs or task.epochs
    # the resolved weight decay, so that checkpoints of runs with the same settings match however they were spelled
    config = {"task": task.name, "optimizer": name, "lr": lr, "seed": args.seed, "batch_size": batch,
              "width": args.width, "momentum": args.momentum, "kfac_momentum": args.kfac_momentum,
              "weight_decay": spec.weight_decay if args.weight_decay is None else args.weight_decay,
              "kfac_options": _kfac_options(args)}
    resume = args.resume == "required" or (args.resume == "auto" and _checkpoint_exists(args.checkpoint))
    if args.resume == "auto" and not resume:
        logger.info("--resume auto: no checkpoint at %s, starting from epoch 0", args.checkpoint)
    state = _read_resume(args.checkpoint, config) if resume else None  # before any data or state is loaded
    data = _load(args, task)
    model, stepper = _build(args, task, data, name, lr, args.seed)
    net = _data_parallel(model, stepper, batch) if dp.distributed_active() else model
    main_rank = not dp.distributed_active() or torch.distributed.get_rank() == 0
    if args.checkpoint and main_rank:
        ex.discard_partial_checkpoint(args.checkpoint)  # a writer killed mid-save left its temporary file
    history = None
    if state is not None:
        try:
            ex.restore_checkpoint(state, model=model, stepper=stepper)
        except ex.CheckpointError as exc:
            raise CLIError(f"--resume: {args.checkpoint}: {exc}") from None
        history = state["history"]
        logger.info("resumed from %s at epoch %d", args.checkpoint, state["epoch"])

    def on_epoch(epoch: int, hist: list[dict[str, float]]) -> None:
        rec = hist[-1]
        logger.info("epoch %d: %.1f s, loss %.4g, %s %.4g", epoch, rec["seconds"], rec["train_loss"],
                    task.metric_name, rec["metric"])
        if args.checkpoint and main_rank:  # every rank holds the same state
            try:
                ex.save_checkpoint(args.checkpoint, model=model, stepper=stepper, history=hist, config=config)
            except OSError as exc:  # e.g. the disk is full; the previous checkpoint is intact
                raise CLIError(f"--checkpoint {args.checkpoint}: cannot write it: {exc.strerror or exc}") from None
        if args.checkpoint and dp.distributed_active():
            torch.distributed.barrier()  # no rank goes on (or dies) before the checkpoint is on disk
        _inject_fault(epoch)

    start = int(history[-1]["epoch"]) if history else 0
    with _progress(args, max(0, epochs - start), f"{name} on {task.name}") as bar:
        result = ex.train(task, data, net, stepper, epochs=epochs, batch_size=batch, seed=args.seed,
                          history=history, on_epoch=on_epoch, progress=bar)
    if not main_rank:
        return 1 if result.diverged else 0
    out = _out_dir(args)
    _write_json(out / "train.json", {
        "command": "train", "config": config, "metric": task.metric_name, "diverged": result.diverged,
        "phase_seconds": result.phase_seconds, "hyperparameters": result.hyperparameters,
        "history": result.history, "environment": _environment(ex.data_device(data)),
    })
    last = result.history[-1]
    status = " (diverged)" if result.diverged else ""
    sys.stdout.write(f"{name} on {task.name}: epoch {last['epoch']}, {task.metric_name} {last['metric']:.4g}{status}, "
                     f"{last['seconds']:.1f} s training; wrote {out / 'train.json'}\n")
    return 1 if result.diverged else 0


def _check_writable(path: str) -> None:
    """Refuse a ``--checkpoint`` that cannot be written, before any training."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise CLIError(f"--checkpoint {path}: is a directory; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--checkpoint {path}: cannot create its directory: {exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CLIError(f"--checkpoint {path}: not writable")


def _read_resume(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """The verified checkpoint at ``path``, refused unless its settings are ``config``'s (:data:`_RESUME_KEYS`)."""
    try:
        state = ex.read_checkpoint(path)
    except ex.CheckpointError as exc:
        raise CLIError(f"--resume: {exc}") from None
    diff = ex.checkpoint_differences(state["config"], config, _RESUME_KEYS)
    if diff:
        raise CLIError(f"--resume: {path} was written with different settings: {', '.join(diff)}")
    return state


def _checkpoint_exists(path: str) -> bool:
    """Whether ``path`` is a file, as rank 0 sees it (broadcast, so all ranks agree on resuming or not)."""
    exists = [pathlib.Path(path).is_file()]
    if dp.distributed_active():
        torch.distributed.broadcast_object_list(exists, src=0)
    return bool(exists[0])


def _inject_fault(epoch: int) -> None:
    """Testing hook, inert unless ``ONLINELA_FAULT_AFTER_EPOCH`` is set: SIGKILL the last rank once.

    With ``ONLINELA_FAULT_AFTER_EPOCH=N`` and ``ONLINELA_FAULT_MARKER=PATH``
    the highest rank kills itself after epoch ``N``'s checkpoint, unless
    ``PATH`` exists; it creates ``PATH`` first, so a restarted run is not
    killed again (tests/test_restart.py).
    """
    after, marker = os.environ.get("ONLINELA_FAULT_AFTER_EPOCH"), os.environ.get("ONLINELA_FAULT_MARKER")
    if after is None or marker is None or epoch != int(after) or os.path.exists(marker):
        return
    if dp.distributed_active() and torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return
    pathlib.Path(marker).touch()
    logger.warning("ONLINELA_FAULT_AFTER_EPOCH=%s: killing this process (testing hook)", after)
    os.kill(os.getpid(), signal.SIGKILL)


def _spawn_train(args: argparse.Namespace) -> int:
    """``--nproc N``: ``_train`` in N local processes (gloo on CPU, nccl with one GPU each)."""
    batch = args.batch_size or _task(args).batch_size
    if batch % args.nproc:
        raise CLIError(f"--batch-size {batch} must be a multiple of --nproc {args.nproc}")
    cuda = _device(args.device).type == "cuda"
    try:
        dp.spawn(_train_rank, args.nproc, (args,), backend="nccl" if cuda else "gloo")
    except torch.multiprocessing.ProcessExitedException as exc:
        return exc.exit_code
    return 0


def _train_rank(args: argparse.Namespace) -> int:
    """One spawned rank: logging and progress on rank 0 only, a fair share of the CPU threads, its own GPU."""
    rank = torch.distributed.get_rank()
    args.quiet = args.quiet or rank > 0
    _configure_logging(logging.DEBUG if args.verbose and not rank else logging.WARNING if args.quiet else logging.INFO)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    if _device(args.device).type == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"
    try:
        return _train(args)
    except (CLIError, DataError) as exc:
        sys.stderr.write(f"onlinela train (rank {rank}): error: {_one_line(exc)}\n")
        return 2


def _join_torchrun(args: argparse.Namespace) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join its process group, one GPU per local rank; whether it joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    cuda = _device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        args.device = f"cuda:{torch.cuda.current_device()}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True


def _data_parallel(model: torch.nn.Module, stepper: ex.Stepper, batch: int) -> torch.nn.Module:
    """DDP over ``model``; its K-FAC preconditioner made distributed (DDP averages the gradients)."""
    world = torch.distributed.get_world_size()
    if batch % world:
        raise CLIError(f"--batch-size {batch} must be a multiple of the {world} processes")
    if stepper.curvature is not None:
        raise CLIError("KLD-WRM optimizers do not run data-parallel")
    precond = getattr(stepper.optimizer, "preconditioner", None)
    if precond is not None:
        dp.distribute(precond, average_gradients=False)
    return torch.nn.parallel.DistributedDataParallel(model)


# ------------------------------------------------------------------ spectrum
def _spectrum(args: argparse.Namespace) -> int:
    import onlinela

    task = _task(args)
    name = _optimizer_names([args.optimizer], task)[0]
    _check_kfac_options(_kfac_options(args), [name])
    data = _load(args, task)
    bounds = {
        key: getattr(onlinela, fn, None)
        for key, fn in (("weyl", "ea_eigenvalue_bound"), ("stream", "ea_stream_eigenvalue_bound"))
    }
    if not any(bounds.values()):
        logger.warning("onlinela has no EA eigenvalue bound in this installation: plotting spectra without it")
    batch = args.batch_size or task.batch_size
    lr = args.lr or ex.available_optimizers()[name].lr
    out = _out_dir(args)
    spectra = []
    for width in args.widths:
        torch.manual_seed(args.seed)
        model = task.build_model(data, width).to(ex.data_device(data))
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not -len(linears) <= args.layer < len(linears):
            raise CLIError(f"--layer {args.layer}: the {task.name} model has {len(linears)} Linear layers")
        layer = linears[args.layer]
        recorder = ex.EAFactorRecorder(layer, decay=args.decay)
        stepper = _stepper(args, task, model, name, lr)
        with _progress(args, args.epochs, f"width {width:g}") as bar:
            ex.train(task, data, model, stepper, epochs=args.epochs, batch_size=batch, seed=args.seed, progress=bar)
        recorder.remove()
        if not recorder.increments["A"]["norms"] or not recorder.increments["G"]["norms"]:
            raise CLIError(f"--layer {args.layer}: its module hooks never ran during training (torch calls "
                           "an attention layer's out_proj functionally); choose another Linear layer")
        for key in ("A", "G"):
            eig = recorder.eigenvalues(key)
            inc = recorder.increments[key]
            entry = {
                "width": width, "factor": key, "layer": f"{args.layer}: {layer.in_features}->{layer.out_features}",
                "dim": int(eig.numel()), "steps": len(inc["norms"]), "decay": args.decay,
                "increment_rank": max(inc["ranks"]), "increment_norm": max(inc["norms"]),
                "eigenvalues": eig.tolist(), "increments": inc,
            }
            js = range(1, eig.numel() + 1)
            if bounds["weyl"] is not None:
                entry["bound"] = [float(bounds["weyl"](j, decay=args.decay, increment_rank=entry["increment_rank"],
                                                       increment_norm=entry["increment_norm"], steps=entry["steps"]))
                                  for j in js]
            if bounds["stream"] is not None:
                entry["stream_bound"] = [
                    float(bounds["stream"](j, decay=args.decay, increment_norms=inc["norms"],
                                           increment_ranks=inc["ranks"], increment_traces=inc["traces"]))
                    for j in js
                ]
            lam1 = float(eig[0])
            entry["modes_above"] = {
                str(eps): {kind: int(sum(v > eps * lam1 for v in entry[field]))
                           for kind, field in (("measured", "eigenvalues"), ("bound", "bound"),
                                               ("stream_bound", "stream_bound")) if field in entry}
                for eps in args.eps
            }
            spectra.append(entry)
    _write_json(out / "spectrum.json", {
        "command": "spectrum", "task": task.name, "optimizer": name, "lr": lr, "epochs": args.epochs,
        "batch_size": batch, "bounds_available": {k: v is not None for k, v in bounds.items()}, "spectra": spectra,
        "environment": _environment(ex.data_device(data)),
    })
    _plot_spectrum(out / "spectrum.png", task, spectra)
    head = ["width", "factor", "dim", "steps", "lambda_1", "K"]
    head += [f"modes > {eps:g}·lambda_1 (measured / stream bound / bound)" for eps in args.eps]
    rows = []
    for sp in spectra:
        row = [f"{sp['width']:g}", sp["factor"], str(sp["dim"]), str(sp["steps"]), f"{sp['eigenvalues'][0]:.3g}",
               f"{sp['increment_norm']:.3g}"]
        for eps in args.eps:
            counts = sp["modes_above"][str(eps)]
            row.append(" / ".join(str(counts.get(k, "-")) for k in ("measured", "stream_bound", "bound")))
        rows.append(row)
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    for line in [head, *rows]:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
    sys.stdout.write(f"wrote {out / 'spectrum.json'} and {out / 'spectrum.png'}\n")
    return 0


def _plot_spectrum(path: pathlib.Path, task: ex.Task, spectra: list[dict[str, Any]]) -> None:
    plots.render(plots.spectrum_figure(task.name, spectra), path)


# --------------------------------------------------------------------- parser
_ROLE = re.compile(r":[\w.:-]+:`(~?)([^`<]*?)\s*(?:<[^>]*>)?`")


def _plain_text(rst: str) -> str:
    """``rst`` without inline reStructuredText markup, for ``--help``.

    An interpreted-text role keeps its text (a target written with ``~``
    keeps its last dotted component, one written as ``text <target>`` keeps
    ``text``); double backquotes are dropped; section underlines and
    indentation stay.
    """
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), rst)
    return text.replace("``", "")


def _common(
    parser: argparse.ArgumentParser, *, default_task: str, default_out: str, default_threads: int | None = None
) -> None:
    # also accepted after the subcommand; SUPPRESS keeps the top-level value when absent here
    parser.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars or log lines")
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser.add_argument("--task", choices=sorted(ex.TASKS), default=default_task,
                        help=f"benchmark (default {default_task}): "
                             + "; ".join(f"{t.name}: {t.description}" for t in ex.TASKS.values()))
    parser.add_argument("--data-dir", help="directory with MNIST IDX files or CIFAR-10 python batches "
                                           "(default for mnist: the bundled 5,000-image subset)")
    parser.add_argument("--max-train", type=_positive_int,
                        help="use a seeded subset of this many training images (tiny-lm: the first this many "
                             "characters of the training text)")
    parser.add_argument("--batch-size", type=_positive_int,
                        help="minibatch size, in images or (tiny-lm) text windows (default: the task's)")
    parser.add_argument("--width", type=_positive_float, help="model width scale (default: the task's)")
    parser.add_argument("--momentum", type=_momentum, default=0.9, help="momentum of the SGD baseline (default 0.9)")
    parser.add_argument("--kfac-momentum", type=_momentum, default=None,
                        help="momentum of the K-FAC methods and KLD-WRM (default: the task's; 0 as in the "
                             "RS-KFAC and KLD-WRM papers, 0.9 for mnist-autoencoder as in the K-FAC paper, "
                             "the optimizer classes' default for tiny-lm)")
    parser.add_argument("--weight-decay", type=_nonneg_float, default=None,
                        help="weight decay of every optimizer, added after preconditioning (default: each "
                             "optimizer's own: 0.01 for adamw, 0 for the others)")
    parser.add_argument("--kfac-opt", type=_key_value, action="append", metavar="KEY=VALUE",
                        help="extra KFACPreconditioner keyword (repeatable), e.g. damping=0.01 rank=64")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 or auto (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=default_threads,
                        help="torch intra-op CPU threads (default: " + (f"{default_threads})" if default_threads else
                                                                        "torch's choice)"))
    parser.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")


def build_parser() -> argparse.ArgumentParser:
    """The ``onlinela`` argument parser."""
    parser = argparse.ArgumentParser(prog="onlinela", description=_plain_text(__doc__ or ""), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines; only results")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for cmd, helptext in (("compare", "compare optimizers on one task"),
                          ("demo", "what 'make demo' runs: compare with a few-minute budget")):
        p = sub.add_parser(cmd, help=helptext, description=helptext, allow_abbrev=False)
        demo = cmd == "demo"
        _common(p, default_task=DEMO_DEFAULTS["task"] if demo else "mnist-mlp",
                default_out=DEMO_DEFAULTS["out"] if demo else "out/compare",
                default_threads=DEMO_DEFAULTS["threads"] if demo else None)
        p.add_argument("--optimizers", type=_list_of(str),
                       help="comma-separated names, or all (default: the task's showcase set where it has one, "
                            "mnist-autoencoder-brand; else all available)")
        p.add_argument("--epochs", type=_positive_int, default=DEMO_DEFAULTS["epochs"] if demo else None,
                       help="epochs per run (default: the task's)")
        p.add_argument("--targets", type=_list_of(_float), help="metric targets for time-to-target (default: the task's)")
        p.add_argument("--seeds", type=_list_of(_nonneg_int), default=[0], help="comma-separated seeds (default 0)")
        p.add_argument("--lr-grid", type=_list_of(_positive_float),
                       help="learning rates every optimizer picks from by a probe run "
                            f"(default {','.join(map(str, DEFAULT_LR_GRID))}; a task with preset learning "
                            "rates, mnist-autoencoder-brand, probes only when this is given)")
        p.add_argument("--lr", type=_positive_float, help="one learning rate for every optimizer (no probe)")
        p.add_argument("--probe-epochs", type=_positive_float, default=DEMO_DEFAULTS["probe_epochs"] if demo else None,
                       help="length of each learning-rate probe run, in epochs (fractions allowed; "
                            "default: the task's)")
        p.add_argument("--keep-going", action="store_true",
                       help="when an optimizer fails, leave it out, run the others and exit 0 (1 if every one "
                            "failed); default: stop at the first failure and exit 1")
        p.set_defaults(func=_compare)

    p = sub.add_parser("train", help="train one optimizer, with checkpoint/resume", allow_abbrev=False,
                       description="Train one optimizer on one task; --checkpoint saves after every epoch.")
    _common(p, default_task="mnist-mlp", default_out="out/train")
    p.add_argument("--optimizer", default="sgd", help="optimizer name (see: onlinela compare --help)")
    p.add_argument("--lr", type=_positive_float, help="learning rate (default: the optimizer's)")
    p.add_argument("--epochs", type=_positive_int, help="total epochs to reach (default: the task's)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--checkpoint", help="checkpoint file, written after every epoch")
    p.add_argument("--resume", nargs="?", const="required", choices=("required", "auto"),
                   help="continue from --checkpoint, which must exist; '--resume auto': continue if it exists, "
                        "else start fresh (for torchrun --max-restarts, which repeats the command line)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="data-parallel processes on this machine (gloo on CPU, nccl on CUDA; see docs/distributed.rst)")
    p.set_defaults(func=_train)

    p = sub.add_parser("spectrum", help="eigenvalue decay of EA K-factors at several widths vs the bound",
                       allow_abbrev=False,
                       description="Train briefly at several widths, record one Linear layer's EA K-factors "
                                   "with hooks, and plot their spectra against onlinela.ea_eigenvalue_bound.")
    _common(p, default_task="mnist-mlp", default_out="out/spectrum")
    p.add_argument("--widths", type=_list_of(_positive_float), default=[0.25, 0.5, 1.0, 2.0],
                   help="model width scales (default 0.25,0.5,1,2)")
    p.add_argument("--layer", type=int, default=1, help="index of the Linear layer to record (default 1)")
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--decay", type=_open_unit, default=0.95, help="EA decay rho (default 0.95)")
    p.add_argument("--eps", type=_list_of(_positive_float), default=[1e-2, 1e-3], help="relative eigenvalue levels")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.set_defaults(func=_spectrum)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error message on one line (so that stderr holds exactly one line per error)."""
    return " ".join(str(exc).split())


def _configure_logging(level: int) -> None:
    """Log lines of both packages to the current stderr, replacing the handler of an earlier ``main`` call."""
    for name in ("onlinela", "onlinela_torch"):
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if getattr(h, "_onlinela_cli", False)]:
            log.removeHandler(handler)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._onlinela_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``onlinela`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success; 2 on a bad argument, unreadable data or an
        unusable checkpoint (one line on stderr); 1 when a ``train`` run
        diverged or a ``compare`` optimizer failed (without ``--keep-going``,
        or when every one failed).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    _configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Subnormal floats (gradients of saturated logistic units reach 1e-34) make
    # CPU matrix products ~10x slower; flushing them to zero is what GPUs do and
    # treats every optimizer alike.  Reset on return: main() may run in-process.
    torch.set_flush_denormal(True)
    try:
        return int(args.func(args))
    except (CLIError, DataError) as exc:
        sys.stderr.write(f"onlinela {args.command}: error: {_one_line(exc)}\n")
        return 2
    except RunFailed as exc:
        sys.stderr.write(f"onlinela {args.command}: error: {_one_line(exc)}\n")
        return 1
    finally:
        torch.set_flush_denormal(False)

"""A zoo of small training tasks on which to choose the library's defaults (issue 12, item 5).

Every method is used the way a new user would use it, with the library's
defaults; only the learning rate comes from a grid, the same grid for all:

* ``sgd``: ``torch.optim.SGD(lr, momentum=0.9)``; ``adam``: ``torch.optim.Adam(lr)``.
* every name of ``KFACPreconditioner.METHODS`` (``kfac``, ``rs-kfac``, ...):
  ``KFACPreconditioner(model, method=m, **kw)`` plugged into
  ``torch.optim.SGD(lr, momentum=0.9)`` as kfac-pytorch's README shows
  (``loss.backward(); precond.step(); opt.step()``).  The optimizer is passed
  as ``optimizer=opt`` when ``KFACPreconditioner`` has that parameter (checked
  with :func:`inspect.signature`), otherwise ``lr=lr``.
* ``cls:kfac``, ``cls:rs-kfac``, ``cls:b-kfac``: the optimizer classes
  ``KFAC``, ``RSKFAC``, ``BKFAC`` as ``cls(model, lr=lr, **kw)``.
* ``--mode steps`` (at EQUAL STEPS; the classification tasks unless ``--tasks`` names others):
  ``kldwrm:so``, ``kldwrm:q``, ``kldwrm:qe``, i.e. ``KLDWRM(model, opt,
  variant=v, **kld_kw)`` under ``torch.optim.SGD(lr)`` (momentum 0, as the
  KLD-WRM docstring advises; QE gets the closure ``lambda: model(x)``),
  against ``sgd`` and ``adam``.

``--kw key=value`` passes extra options to every K-FAC run (the preconditioner
runs and the optimizer classes), ``--kld-kw`` to every KLD-WRM run, so that
candidate defaults can be tried without editing the library.

Protocol
--------
* Equal budget: in ``--mode time`` every run gets the same budget of
  **process CPU time** (``time.process_time``) with ``torch.set_num_threads(1)``,
  so that other jobs on a shared machine do not change the result, and
  subnormal floats flushed to zero (``torch.set_flush_denormal(True)``;
  ``--keep-denormals`` to keep them): on x86 their slow path made SGD's
  backward 16x slower on mnist-cnn-max and timed it, not the optimisers.  The
  held-out loss is evaluated at 10 fixed fractions of the budget; evaluation
  time is not counted.  In ``--mode steps`` every run takes the same number of
  optimizer steps and is evaluated at 10 fractions of them.
* Score: the final held-out loss (the task's loss on the test split,
  per sample: a summed loss is divided by the number of test samples).  Train
  loss (on at most 2,000 training samples) and accuracy (classification) are
  recorded too.
* Divergence: a run diverged when a loss is non-finite or its final held-out
  loss is above the initial one; a run is stopped early when its held-out
  loss at a checkpoint is non-finite or above 100x the initial one.
* Best lr per method per task: the lowest mean (over seeds) final score.  A
  method *beats* first order on a task when its best score is below both
  SGD's and Adam's best; its *ratio* is best / min(best SGD, best Adam); it
  *fails* a task when every lr diverged.

The bar (issue 12): every K-FAC-family method beats both SGD and Adam on all
tasks but at most one, its worst ratio is at most 1.5, and it fails no task.

Usage::

    .venv/bin/python benchmarks/zoo.py                         # the default zoo (make zoo)
    .venv/bin/python benchmarks/zoo.py --budget 2 --lrs 0.01,0.1,0.3 --out benchmarks/results/zoo_quick.json
    .venv/bin/python benchmarks/zoo.py --mode steps            # KLD-WRM at equal steps
    .venv/bin/python benchmarks/zoo.py --tasks reg-s100-sum --methods sgd,adam,kfac --kw damping=0.01

Writes the JSON given by ``--out`` (default ``benchmarks/results/zoo.json``,
``zoo_steps.json`` in steps mode) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import multiprocessing
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import onlinela_torch
from onlinela_torch import KLDWRM, KFACPreconditioner
from onlinela_torch.data import load_digits, load_mnist_subset
from onlinela_torch.models import MNISTAutoencoder, SmallCNN

logger = logging.getLogger("benchmarks.zoo")
ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
CHECKPOINTS = 10
BLOWUP = 100.0  # stop a run whose held-out loss exceeds this multiple of the initial one
FIRST_ORDER = ("sgd", "adam")
CLASSES = {"cls:kfac": "KFAC", "cls:rs-kfac": "RSKFAC", "cls:b-kfac": "BKFAC"}
KLD_VARIANTS = ("kldwrm:so", "kldwrm:q", "kldwrm:qe")
TRAIN_EVAL = 2000


# =========================================================================== data
@dataclasses.dataclass(frozen=True)
class Split:
    """Train and held-out tensors of one task (``y`` is the target: labels, regression values or the input)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


_CACHE: dict[str, Split] = {}


def _images(name: str) -> Split:
    data = load_digits(seed=0) if name == "digits" else load_mnist_subset(seed=0)
    return Split(data.x_train, data.y_train, data.x_test, data.y_test)


def _flat_autoencoder(name: str) -> Split:
    s = _images(name)
    xtr, xte = s.x_train.flatten(1), s.x_test.flatten(1)
    return Split(xtr, xtr, xte, xte)


def _teacher(scale: float, d_in: int = 20, d_out: int = 5, n_train: int = 2000, n_test: int = 1000) -> Split:
    """A random tanh teacher ``d_in-32-d_out``, targets multiplied by ``scale``, 10 % noise."""
    g = torch.Generator().manual_seed(1234)
    w1 = torch.randn(d_in, 32, generator=g) / math.sqrt(d_in)
    w2 = torch.randn(32, d_out, generator=g) / math.sqrt(32)
    x = torch.randn(n_train + n_test, d_in, generator=g)
    y = torch.tanh(2.0 * x @ w1) @ w2
    y = scale * (y / y.std() + 0.1 * torch.randn(y.shape, generator=g))
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


_DATA: dict[str, Callable[[], Split]] = {
    "teacher-1": lambda: _teacher(1.0),
    "teacher-10": lambda: _teacher(10.0),
    "teacher-100": lambda: _teacher(100.0),
    "digits": lambda: _images("digits"),
    "mnist": lambda: _images("mnist"),
    "digits-ae": lambda: _flat_autoencoder("digits"),
    "mnist-ae": lambda: _flat_autoencoder("mnist"),
}


def load(name: str) -> Split:
    """The (cached) split of data set ``name`` (a key of the zoo's data table)."""
    if name not in _CACHE:
        _CACHE[name] = _DATA[name]()
    return _CACHE[name]


# =========================================================================== models
def _act(name: str) -> type[nn.Module]:
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}[name]


def mlp(sizes: Sequence[int], act: str) -> nn.Module:
    """``Linear`` layers of ``sizes`` with activation ``act`` between them (flattens its input)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_act(act)())
    return nn.Sequential(*layers)


def cnn_gap(channels: int = 16, act: str = "relu") -> nn.Module:
    """Stride-2 3x3 convolutions and global average pooling (the issue's failing CNN)."""
    a = _act(act)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, stride=2, padding=1), a(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), a(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, 10),
    )  # fmt: skip


def cnn_bn_avg(act: str = "gelu") -> nn.Module:
    """3x3 convolutions with BatchNorm and 2x2 average pooling, then a linear head (8x8 inputs)."""
    a = _act(act)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), a(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), a(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )  # fmt: skip


def cnn_maxpool(act: str = "relu") -> nn.Module:
    """5x5 and 3x3 convolutions with 2x2 max pooling on 28x28 inputs, a hidden FC layer."""
    a = _act(act)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), a(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), a(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), a(), nn.Linear(64, 10),
    )  # fmt: skip


def autoencoder(sizes: Sequence[int], act: str) -> nn.Module:
    """Encoder ``sizes`` and its mirror, ``act`` between layers, linear output (logits for a BCE loss)."""
    return nn.Sequential(mlp(sizes, act), _act(act)(), mlp(list(sizes)[::-1], act))


# =========================================================================== tasks
@dataclasses.dataclass(frozen=True)
class Task:
    """One zoo task.

    Attributes
    ----------
    name : str
    kind : {"regression", "classification", "autoencoder"}
    data : str
        Key of the data table (see :func:`load`).
    model : callable () -> nn.Module
        Builds the model (torch's global generator is seeded before the call).
    loss : {"mse", "ce", "bce"}
        Squared error, cross-entropy on logits, binary cross-entropy on logits.
    reduction : {"mean", "sum"}
        Reduction of the training loss over the batch (and, for "sum", over outputs).
    batch : int
        Batch size (the last partial batch of an epoch is dropped).
    budget : float
        Seconds of process CPU time per run (``--budget`` overrides it).
    note : str
    """

    name: str
    kind: str
    data: str
    model: Callable[[], nn.Module]
    loss: str
    reduction: str
    batch: int
    budget: float = 2.5
    note: str = ""


TASKS: tuple[Task, ...] = (
    Task("reg-s1", "regression", "teacher-1", lambda: mlp([20, 64, 64, 5], "tanh"), "mse", "mean", 64,
         note="teacher-student, target std 1, tanh MLP"),
    Task("reg-s10", "regression", "teacher-10", lambda: mlp([20, 64, 64, 5], "relu"), "mse", "mean", 128,
         note="teacher-student, target std 10, ReLU MLP"),
    Task("reg-s100-sum", "regression", "teacher-100", lambda: mlp([20, 64, 64, 5], "gelu"), "mse", "sum", 256,
         note="teacher-student, target std 100, GELU MLP, summed squared error"),
    Task("digits-deep-tanh", "classification", "digits", lambda: mlp([64] + [64] * 6 + [10], "tanh"), "ce", "mean", 32,
         note="8x8 digits, 7-layer tanh MLP at batch 32"),
    Task("digits-mlp-sum", "classification", "digits", lambda: mlp([64, 128, 10], "relu"), "ce", "sum", 16,
         note="8x8 digits, ReLU MLP, summed cross-entropy, batch 16"),
    Task("digits-cnn-gap", "classification", "digits", lambda: cnn_gap(16, "relu"), "ce", "mean", 128,
         note="8x8 digits, stride-2 3x3 convs + global average pooling"),
    Task("digits-cnn-bn", "classification", "digits", lambda: cnn_bn_avg("gelu"), "ce", "mean", 64,
         note="8x8 digits, conv + BatchNorm + GELU + average pooling"),
    Task("mnist-mlp-gelu", "classification", "mnist", lambda: mlp([784, 128, 64, 10], "gelu"), "ce", "mean", 256,
         note="MNIST subset, GELU MLP"),
    Task("mnist-cnn-max", "classification", "mnist", lambda: cnn_maxpool("relu"), "ce", "mean", 128,
         note="MNIST subset, conv + max pooling + FC"),
    Task("mnist-smallcnn", "classification", "mnist", lambda: SmallCNN(), "ce", "mean", 512,
         note="MNIST subset, the KLD-WRM paper's small CNN (dropout 0.5), batch 512"),
    Task("mnist-ae-mse", "autoencoder", "mnist-ae", lambda: autoencoder([784, 128, 32], "relu"), "mse", "mean", 1000,
         note="MNIST subset, ReLU autoencoder 784-128-32-128-784, MSE, batch 1000"),
    Task("digits-ae-bce", "autoencoder", "digits-ae",
         lambda: MNISTAutoencoder(64, hidden=(128, 64, 32), code=16, activation="sigmoid"), "bce", "sum", 100,
         note="8x8 digits, sparse-init logistic autoencoder 64-128-64-32-16, BCE with logits summed per image"),
)  # fmt: skip
TASK_NAMES = tuple(t.name for t in TASKS)


def task_by_name(name: str) -> Task:
    """The task called ``name``; ValueError naming the known tasks otherwise."""
    for task in TASKS:
        if task.name == name:
            return task
    raise ValueError(f"`--tasks`: unknown task {name!r}; expected some of {', '.join(TASK_NAMES)}")


def loss_fn(task: Task, out: torch.Tensor, y: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
    """The task's loss of outputs ``out`` against targets ``y`` with ``reduction`` (default the task's)."""
    reduction = task.reduction if reduction is None else reduction
    if task.loss == "ce":
        return F.cross_entropy(out, y, reduction=reduction)
    if task.loss == "bce":
        full = F.binary_cross_entropy_with_logits(out, y, reduction="none")
    else:
        full = F.mse_loss(out, y, reduction="none")
    return full.mean() if reduction == "mean" else full.sum()


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
    """Per-sample loss (mean loss, or summed loss / n) and accuracy in % (classification; else None)."""
    was_training = model.training
    model.eval()
    out = model(x)
    loss = float(loss_fn(task, out, y))
    if task.reduction == "sum":
        loss /= x.shape[0]
    acc = float((out.argmax(1) == y).float().mean()) * 100.0 if task.kind == "classification" else None
    model.train(was_training)
    return loss, acc


@torch.no_grad()
def squared_error(task: Task, model: nn.Module, x: torch.Tensor) -> float:
    """Autoencoders: summed squared reconstruction error per sample (of the sigmoid of the logits for BCE tasks)."""
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    recon = torch.sigmoid(out) if task.loss == "bce" else out
    return float(((recon - x.flatten(1)) ** 2).sum(1).mean())


# =========================================================================== methods
def kfac_methods() -> tuple[str, ...]:
    """The preconditioner's method names, read from the library."""
    return tuple(KFACPreconditioner.METHODS)


def all_methods(mode: str) -> tuple[str, ...]:
    """The methods a mode runs by default."""
    if mode == "steps":
        return (*FIRST_ORDER, *KLD_VARIANTS)
    return (*FIRST_ORDER, *kfac_methods(), *CLASSES)


def is_kfac_family(method: str) -> bool:
    """True for the methods the bar is about (preconditioner, optimizer classes, KLD-WRM)."""
    return method not in FIRST_ORDER


def takes_optimizer() -> bool:
    """Whether ``KFACPreconditioner`` accepts ``optimizer=`` (then the lr is read from it)."""
    return "optimizer" in inspect.signature(KFACPreconditioner).parameters


class Stepper:
    """One method wired to one model: ``step(x, y)`` takes an optimizer step on the batch."""

    def __init__(self, method: str, model: nn.Module, lr: float, task: Task, kw: dict, kld_kw: dict) -> None:
        self.model, self.task, self.extra, self.closure_needed = model, task, None, False
        if method == "sgd":
            self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        elif method == "adam":
            self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        elif method in CLASSES:
            self.opt = getattr(onlinela_torch, CLASSES[method])(model, lr=lr, **kw)
        elif method in KLD_VARIANTS:
            self.opt = torch.optim.SGD(model.parameters(), lr=lr)
            self.extra = KLDWRM(model, self.opt, variant=method.split(":")[1], **kld_kw)
            self.closure_needed = method == "kldwrm:qe"
        elif method in kfac_methods():
            self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            link = {"optimizer": self.opt} if takes_optimizer() else {"lr": lr}
            self.extra = KFACPreconditioner(model, method=method, **link, **kw)
        else:
            raise ValueError(f"`--methods`: unknown method {method!r}; expected some of {', '.join(all_methods('time'))}")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on ``(x, y)``; returns the batch loss before the step."""
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.task, self.model(x), y)
        loss.backward()
        if self.extra is not None:
            if self.closure_needed:
                self.extra.step(closure=lambda: self.model(x))
            else:
                self.extra.step()
        self.opt.step()
        return loss.item()


# =========================================================================== one run
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one run trains: task, method, lr, seed, and the budget (seconds in time mode, steps in steps mode)."""

    task: str
    method: str
    lr: float
    seed: int
    budget: float
    mode: str = "time"
    kw: tuple = ()
    kld_kw: tuple = ()
    flush_denormal: bool = True


def _batches(n: int, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def run_one(spec: RunSpec, task: Task | None = None, make_stepper: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train one run; returns its record (curve of held-out losses at 10 checkpoints, score, divergence).

    ``task`` defaults to the zoo task ``spec.task``; ``make_stepper(method, model, lr, task, kw, kld_kw)``
    (default :class:`Stepper`) wires the method to the model (benchmarks/peers.py passes its own).
    """
    torch.set_num_threads(1)
    # subnormal floats take a slow path on x86 CPUs: with them SGD's backward on mnist-cnn-max took 71 ms a
    # step against 4.4 ms flushed, so an equal-CPU-time comparison would time subnormal arithmetic
    torch.set_flush_denormal(spec.flush_denormal)
    task = task_by_name(spec.task) if task is None else task
    make_stepper = Stepper if make_stepper is None else make_stepper
    data = load(task.data)
    torch.manual_seed(spec.seed)
    model = task.model()
    gen = torch.Generator().manual_seed(spec.seed)
    ntr = data.x_train.shape[0]
    sub = torch.randperm(ntr, generator=torch.Generator().manual_seed(99))[:TRAIN_EVAL]
    x_sub, y_sub = data.x_train[sub], data.y_train[sub]
    init_loss, init_acc = evaluate(task, model, data.x_test, data.y_test)
    init_train, _ = evaluate(task, model, x_sub, y_sub)
    rec: dict[str, Any] = dict(dataclasses.asdict(spec), kw=dict(spec.kw), kld_kw=dict(spec.kld_kw))
    rec.update(initial_loss=init_loss, initial_train_loss=init_train, error=None)
    curve = [dict(fraction=0.0, used=0.0, cpu=0.0, steps=0, test_loss=init_loss, test_acc=init_acc)]
    steps, used, cpu, diverged, stopped = 0, 0.0, 0.0, False, False
    try:
        stepper = make_stepper(spec.method, model, spec.lr, task, dict(spec.kw), dict(spec.kld_kw))
        clock = time.process_time
        batches = _batches(ntr, task.batch, gen)
        for k in range(1, CHECKPOINTS + 1):
            target = spec.budget * k / CHECKPOINTS
            while used < target:
                idx = next(batches)
                t0 = clock()
                loss = stepper.step(data.x_train[idx], data.y_train[idx])
                dt = clock() - t0
                cpu += dt
                used += dt if spec.mode == "time" else 1.0
                steps += 1
                if not math.isfinite(loss):
                    diverged = stopped = True
                    break
            test_loss, test_acc = evaluate(task, model, data.x_test, data.y_test)
            curve.append(
                dict(fraction=k / CHECKPOINTS, used=used, cpu=cpu, steps=steps, test_loss=test_loss, test_acc=test_acc)
            )
            if stopped or not math.isfinite(test_loss) or test_loss > BLOWUP * init_loss:
                diverged = stopped = True
                break
    except Exception as exc:  # a library failure is recorded as a diverged run, never hidden
        logger.warning("%s %s lr=%g seed=%d raised %r", spec.task, spec.method, spec.lr, spec.seed, exc)
        rec["error"] = repr(exc)
        diverged = stopped = True
    final = curve[-1]["test_loss"] if not stopped else math.inf
    if not math.isfinite(final) or final > init_loss:
        diverged = True
    train_loss, _ = evaluate(task, model, x_sub, y_sub)
    if task.kind == "autoencoder":
        rec["final_test_sqerr_per_sample"] = squared_error(task, model, data.x_test)
    rec.update(
        curve=curve,
        steps=steps,
        score=final,
        final_test_loss=curve[-1]["test_loss"],
        final_test_acc=curve[-1]["test_acc"],
        train_loss=train_loss,
        diverged=diverged,
        stopped_early=stopped,
        cpu_seconds=cpu,
        seconds_per_step=cpu / steps if steps else None,
    )
    return rec


# =========================================================================== summary
def _finite(v: float) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def best_by_method(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """``{task: {method: {"lr", "score", "failed", "seconds_per_step"}}}``: the best lr by mean score over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"], r["lr"]), []).append(r)
    out: dict[str, dict[str, dict]] = {}
    for (task, method, lr), rs in groups.items():
        score = statistics.fmean(r["score"] for r in rs) if all(math.isfinite(r["score"]) for r in rs) else math.inf
        all_div = all(r["diverged"] for r in rs)
        sps = [r["seconds_per_step"] for r in rs if r["seconds_per_step"]]
        accs = [r["final_test_acc"] for r in rs if r["final_test_acc"] is not None and not r["diverged"]]
        cell = out.setdefault(task, {}).setdefault(method, {"lr": None, "score": math.inf, "failed": True, "lrs": {}})
        cell["lrs"][str(lr)] = {"score": _finite(score), "diverged": all_div}
        cell["failed"] = cell["failed"] and all_div
        if not all_div and (cell["lr"] is None or score < cell["score"]):
            cell.update(lr=lr, score=score, acc=statistics.fmean(accs) if accs else None)
        if sps:
            cell.setdefault("_sps", []).extend(sps)
    for methods in out.values():
        for cell in methods.values():
            sps = cell.pop("_sps", [])
            cell["seconds_per_step"] = statistics.median(sps) if sps else None
    return out


def _ratio(score: float, ref: float) -> float:
    """``score / ref``; 0 when only ``score`` is finite (first order never finished), inf when ``score`` is not."""
    if not math.isfinite(score):
        return math.inf
    if not math.isfinite(ref):
        return 0.0
    return score / ref if ref > 0 else math.inf


def summarize(runs: list[dict], mode: str = "time") -> dict[str, Any]:
    """Per-task best scores and ratios, and per method: wins over both SGD and Adam, worst ratio, failures, bar.

    The bar in ``"time"`` mode (issue 12): wins on all tasks but at most one, worst ratio <= 1.5, no
    failed task.  In ``"steps"`` mode (KLD-WRM): wins on every task.
    """
    slack = 1 if mode == "time" else 0
    best = best_by_method(runs)
    per_task: dict[str, dict] = {}
    per_method: dict[str, dict] = {}
    for task, methods in best.items():
        ref = min(methods.get(m, {}).get("score", math.inf) for m in FIRST_ORDER)
        sgd_sps = methods.get("sgd", {}).get("seconds_per_step")
        row = {}
        for method, cell in methods.items():
            ratio = _ratio(cell["score"], ref)
            step_ratio = cell["seconds_per_step"] / sgd_sps if cell["seconds_per_step"] and sgd_sps else None
            beats = all(m in methods and cell["score"] < methods[m]["score"] for m in FIRST_ORDER) and not cell["failed"]
            row[method] = dict(
                best_lr=cell["lr"], score=_finite(cell["score"]), acc=cell.get("acc"), ratio=_finite(ratio),
                beats_first_order=beats, failed=cell["failed"], step_time_vs_sgd=step_ratio, lrs=cell["lrs"],
            )  # fmt: skip
            m = per_method.setdefault(method, dict(tasks=0, wins=0, worst_ratio=0.0, worst_task=None, failed=0, step=[]))
            m["tasks"] += 1
            m["wins"] += beats
            m["failed"] += cell["failed"]
            if ratio > m["worst_ratio"]:
                m["worst_ratio"], m["worst_task"] = ratio, task
            if step_ratio:
                m["step"].append(step_ratio)
        per_task[task] = dict(first_order_best=_finite(ref), methods=row)
    for method, m in per_method.items():
        m["median_step_time_vs_sgd"] = statistics.median(m.pop("step")) if m["step"] else None
        m["worst_ratio"] = _finite(m["worst_ratio"])
        complete = all(fo in per_task[t]["methods"] for t in per_task for fo in FIRST_ORDER)
        m["meets_bar"] = (
            complete and m["wins"] >= m["tasks"] - slack
            and m["worst_ratio"] is not None and m["worst_ratio"] <= 1.5 and m["failed"] == 0
        ) if is_kfac_family(method) else None  # fmt: skip
    bar = "wins on all tasks but one, worst ratio <= 1.5, no failed task" if slack else "wins on every task"
    return dict(per_task=per_task, per_method=per_method, bar=bar)


def table(summary: dict[str, Any]) -> str:
    """The printed summary: one line per method."""
    lines = [f"{'method':<14} {'beats SGD&Adam':>14} {'worst ratio':>12} {'(task)':<18} {'fails':>5} {'step/SGD':>9} bar"]
    for method, m in summary["per_method"].items():
        worst = "inf" if m["worst_ratio"] is None else f"{m['worst_ratio']:.3g}"
        step = "-" if m["median_step_time_vs_sgd"] is None else f"{m['median_step_time_vs_sgd']:.2f}"
        bar = {True: "yes", False: "NO", None: "-"}[m["meets_bar"]]
        lines.append(
            f"{method:<14} {m['wins']:>6}/{m['tasks']:<7} {worst:>12} {str(m['worst_task']):<18} {m['failed']:>5} {step:>9} {bar}"
        )
    return "\n".join(lines)


def task_table(summary: dict[str, Any]) -> str:
    """Per task: each method's best score / min(SGD, Adam) (``x`` = every lr diverged)."""
    methods = list(summary["per_method"])
    lines = [f"{'task':<18} {'min(SGD,Adam)':>13} " + " ".join(f"{m[-10:]:>10}" for m in methods)]
    for task, t in summary["per_task"].items():
        ref = "inf" if t["first_order_best"] is None else f"{t['first_order_best']:.4g}"
        cells = []
        for m in methods:
            c = t["methods"].get(m)
            cells.append(f"{'':>10}" if c is None else f"{'x' if c['failed'] else format(c['ratio'] or math.inf, '.3g'):>10}")
        lines.append(f"{task:<18} {ref:>13} " + " ".join(cells))
    return "\n".join(lines)


def rst(summary: dict[str, Any]) -> str:
    """The summary as two reStructuredText tables (per method, then per task ratios) for docs/results.rst."""

    def grid(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        rule = "  ".join("=" * w for w in widths)
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return [rule, fmt(header), rule, *map(fmt, rows), rule]

    per_method = summary["per_method"]
    rows = []
    for m, v in per_method.items():
        worst = f"{'inf' if v['worst_ratio'] is None else format(v['worst_ratio'], '.3g')} ({v['worst_task']})"
        step = "" if v["median_step_time_vs_sgd"] is None else f"{v['median_step_time_vs_sgd']:.2f}"
        bar = {True: "yes", False: "no", None: ""}[v["meets_bar"]]
        rows.append([m, f"{v['wins']} / {v['tasks']}", worst, str(v["failed"]), step, bar])
    out = grid(["method", "beats SGD and Adam", "worst ratio (task)", "tasks failed", "step / SGD step", "bar"], rows)
    methods = list(per_method)
    rows = []
    for task, t in summary["per_task"].items():
        cells = [task, "" if t["first_order_best"] is None else f"{t['first_order_best']:.4g}"]
        for m in methods:
            c = t["methods"].get(m)
            ratio = "n/a" if c is not None and c["ratio"] is None else f"{c['ratio']:.2f}" if c else ""
            cells.append("" if c is None else ("x" if c["failed"] else ratio))
        rows.append(cells)
    return "\n".join([*out, "", *grid(["task", "min(SGD, Adam)", *methods], rows)])


def plot(summary: dict[str, Any], path: pathlib.Path, title: str) -> None:
    """Per task, each method's best score divided by the best first-order score (log scale; failures at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["per_task"])
    methods = list(summary["per_method"])
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        cells = summary["per_task"][task]["methods"]
        vals = [(cells[m]["ratio"] if m in cells and cells[m]["ratio"] else math.nan) for m in methods]
        finite = [v for v in vals if math.isfinite(v)]
        top = max(finite + [1.0]) * 2
        colors = ["tab:gray" if m in FIRST_ORDER else "tab:blue" for m in methods]
        heights = [v if math.isfinite(v) else top for v in vals]
        bars = ax.bar(range(len(methods)), heights, color=colors)
        for b, v in zip(bars, vals):
            if not math.isfinite(v):
                b.set_color("tab:red")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.5, color="tab:orange", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xticks(range(len(methods)), methods, rotation=90, fontsize=7)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle(title + "\nbest held-out loss / min(SGD, Adam); red = every lr diverged; dashed = 1.5", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =========================================================================== CLI
def _kv(items: Sequence[str], flag: str) -> tuple:
    out = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag}: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.append((key, value))
    return tuple(out)


def clean(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def git_head() -> str:
    """``git log -1 --format=...`` of the checkout (or the reason it is unknown)."""
    try:
        return subprocess.run(
            ["git", "log", "-1", "--format=%H %cI %s"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"


def library_diff() -> dict[str, Any]:
    """Uncommitted changes to the library (``adapters/``, ``onlinela/``) that the run used: files and a diff hash."""
    try:
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "adapters", "onlinela"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        names = subprocess.run(
            ["git", "status", "--porcelain", "--", "adapters", "onlinela"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as exc:
        return dict(error=repr(exc))
    return dict(files=[n.strip() for n in names if n.strip()], diff_sha256=hashlib.sha256(diff).hexdigest())


def environment() -> dict[str, Any]:
    """What the JSON records about the machine and the library version."""
    return dict(
        git=git_head(), uncommitted=library_diff(), python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
        processor=platform.processor(), clock="time.process_time (process CPU seconds, eval excluded)",
        torch_threads=1, kfac_preconditioner_takes_optimizer=takes_optimizer(),
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("time", "steps"), default="time",
                   help="time: equal CPU-time budget; steps: equal steps (KLD-WRM, classification tasks)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, default all of {','.join(TASK_NAMES)}")
    p.add_argument("--methods", default=None, help="comma-separated (default: all for the mode)")
    p.add_argument("--lrs", default=",".join(map(str, DEFAULT_LRS)))
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of process CPU time per run (time mode; default each task's, 2.5 s); steps in steps mode (default 200)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--kw", nargs="*", default=[], help="extra KFACPreconditioner options for every K-FAC run, key=value")
    p.add_argument("--kld-kw", nargs="*", default=[], help="extra KLDWRM options, key=value")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush subnormal floats to zero (default: flushed, torch.set_flush_denormal(True))")
    p.add_argument("--workers", type=int, default=1, help="processes (each one torch thread; the budget is CPU time)")
    p.add_argument("--fast", action="store_true", help="a tiny slice for tests: 2 tasks, sgd+kfac, 2 lrs, 0.3 s")
    p.add_argument("--out", default=None)
    p.add_argument("--report", nargs="+", default=None,
                   help="print the tables (text and reST) of written JSONs, merged; runs nothing (see report())")
    return p  # fmt: skip


def specs(args: argparse.Namespace) -> list[RunSpec]:
    """Every run the options ask for."""
    if args.fast:
        args.tasks = args.tasks or "reg-s1,digits-mlp-sum"
        args.methods = args.methods or ("sgd,kldwrm:so" if args.mode == "steps" else "sgd,kfac")
        args.lrs = "0.01,0.1" if args.lrs == ",".join(map(str, DEFAULT_LRS)) else args.lrs
        args.budget = args.budget or (0.3 if args.mode == "time" else 20)
    tasks = [task_by_name(t) for t in args.tasks.split(",")] if args.tasks else list(TASKS)
    if args.mode == "steps" and not args.tasks:  # the KLD-WRM comparison; tasks named in --tasks always run
        tasks = [t for t in tasks if t.kind == "classification"]
    methods = args.methods.split(",") if args.methods else list(all_methods(args.mode))
    known = set(all_methods("time")) | set(KLD_VARIANTS)
    for m in methods:
        if m not in known:
            raise SystemExit(f"--methods: unknown method {m!r}; expected some of {', '.join(sorted(known))}")
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    kw, kld_kw = _kv(args.kw, "--kw"), _kv(args.kld_kw, "--kld-kw")
    out = []
    for task in tasks:
        budget = args.budget if args.budget is not None else (task.budget if args.mode == "time" else 200)
        for method in methods:
            for lr in lrs:
                for seed in seeds:
                    out.append(RunSpec(task.name, method, lr, seed, budget, args.mode, kw, kld_kw,
                                       flush_denormal=not args.keep_denormals))
    return out


def run_all(todo: list[RunSpec], workers: int) -> list[dict]:
    """Run the specs (in ``workers`` processes), logging one line per run."""
    results = []
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            it = pool.imap(run_one, todo)
            for i, rec in enumerate(it, 1):
                _log(i, len(todo), rec)
                results.append(rec)
    else:
        for i, spec in enumerate(todo, 1):
            rec = run_one(spec)
            _log(i, len(todo), rec)
            results.append(rec)
    return results


def _log(i: int, n: int, rec: dict) -> None:
    logger.info(
        "[%d/%d] %-16s %-13s lr=%-6g seed=%d steps=%-5d score=%-10.4g %s", i, n, rec["task"], rec["method"],
        rec["lr"], rec["seed"], rec["steps"], rec["score"], "DIVERGED" if rec["diverged"] else "",
    )  # fmt: skip


def merge_runs(docs: list[dict], keep: set[str] | None = None) -> list[dict]:
    """The runs of written JSON documents, merged: a later document's run of the same task, method, lr and
    seed replaces an earlier one; only the methods in ``keep`` when given.  Strict JSON wrote non-finite
    scores as null; they are read back as inf."""
    runs: dict[tuple, dict] = {}
    for doc in docs:
        for r in doc["runs"]:
            if keep is None or r["method"] in keep:
                r["score"] = math.inf if r["score"] is None else r["score"]
                runs[(r["task"], r["method"], r["lr"], r["seed"])] = r
    return list(runs.values())


def report(args: argparse.Namespace) -> int:
    """``--report A.json [B.json ...]``: the tables of written runs, merged (a later file's run of the same
    task, method, lr and seed replaces an earlier one), restricted to ``--methods`` when given; with ``--out``
    the merged JSON and PNG are written too."""
    docs = [json.loads(pathlib.Path(f).read_text()) for f in args.report]
    keep = set(args.methods.split(",")) if args.methods else None
    runs = merge_runs(docs, keep)
    summary = summarize(runs, docs[-1]["mode"])
    print(task_table(summary), table(summary), rst(summary), sep="\n\n")
    if args.out:
        out = pathlib.Path(args.out)
        merged = dict(docs[-1], merged_from=list(args.report), methods=sorted(keep) if keep else None)
        merged.update(summary=summary, runs=runs)
        out.write_text(json.dumps(clean(merged), indent=1, allow_nan=False))
        plot(summary, out.with_suffix(".png"), f"zoo (merged report, {merged['environment']['git'][:12]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the zoo, write JSON + PNG, print the summary tables."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    if args.report:
        return report(args)
    todo = specs(args)
    default_out = RESULTS / ("zoo_steps.json" if args.mode == "steps" else "zoo.json")
    out = pathlib.Path(args.out) if args.out else default_out
    env = environment()  # before the runs: the library the workers import is the one checked out now
    t0 = time.perf_counter()
    runs = run_all(todo, args.workers)
    summary = summarize(runs, args.mode)
    doc = dict(
        benchmark="zoo", mode=args.mode, argv=sys.argv[1:] if argv is None else list(argv),
        budget_unit="process CPU seconds per run" if args.mode == "time" else "optimizer steps per run",
        lrs=sorted({s.lr for s in todo}), seeds=sorted({s.seed for s in todo}),
        kw=dict(_kv(args.kw, "--kw")), kld_kw=dict(_kv(args.kld_kw, "--kld-kw")),
        tasks={t.name: dict(kind=t.kind, data=t.data, loss=t.loss, reduction=t.reduction, batch=t.batch,
                            budget=t.budget, note=t.note) for t in TASKS if t.name in {s.task for s in todo}},
        environment=env, wall_seconds=time.perf_counter() - t0, summary=summary, runs=runs,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean(doc), indent=1, allow_nan=False))
    plot(summary, out.with_suffix(".png"), f"zoo ({args.mode}, {doc['environment']['git'][:12]})")
    print(task_table(summary))
    print()
    print(table(summary))
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({doc['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One-shot GPU check: the CUDA/CuPy test subset, randomized eigh, Brand updates and K-FAC step times on one GPU.

Run once on a machine with one CUDA GPU (<= 8 minutes on an H100/H200-class
device); everything lands in one JSON file:

1. **tests**: ``pytest -m gpu`` (CUDA-torch tests, skipped without a GPU)
   and ``pytest -k cupy`` (the ``xp[cupy]`` backend of every numerical test).
2. **eigh**: on torch CUDA and on CuPy, ``onlinela.randomized_eigh(A, r)``
   as a user calls it (defaults) against ``torch.linalg.eigh`` /
   ``cupy.linalg.eigh`` (exact) and ``torch.svd_lowrank(A, r + 10, niter)``
   at ``d = 4096, 8192, 16384`` (float32, ``r = 220``), and on a batched
   stack ``64 × 1024²``.  ``A = Y Yᵀ / n`` with ``Y`` Gaussian times a
   power-law column scale (an EA-like decaying spectrum).  Every result
   carries its spectral error ``||A - U diag(w) Uᵀ||₂`` (block-Lanczos
   estimate, :func:`onlinela.estimate_spectral_error`) relative to the
   optimal ``λ_{r+1}``, so speed is compared at stated accuracy.
   Goal (issue 14): randomized >= 5x faster than ``torch.linalg.eigh`` at
   ``d = 8192`` at equal accuracy.
3. **brand**: one :func:`onlinela.brand_update` (rank 220, increment of 256
   columns) at ``d = 4096 ... 65536`` against the dense ``eigh`` at 16384.
   Goal: >= 100x faster than dense at ``d = 16384``.
4. **kfac_step**: seconds per training step (CUDA-synchronised) of every
   K-FAC method on the MNIST autoencoder at width 1 (784-1000-500-250-30,
   batch 500 so that Brand updates run on the wide factors) and on the
   ``tiny-lm`` transformer, each as a ratio to an SGD step (curvlinops'
   convention), with the factor kinds that ran.

Every section is timed with the device synchronised before and after each
call (best of ``--repeats``, after one warm-up call); a section that fails
records its error and the script goes on.  ``--budget`` seconds (default
420) bound the whole run: sections past it are recorded as skipped.

``--dry-run`` runs the same code paths on the CPU at tiny sizes in seconds
(pytest only collects, CuPy is stood in for by NumPy when it is absent), so
CI checks that the script works without a GPU (``tests/test_gpu_script.py``).

Usage::

    .venv/bin/python benchmarks/gpu.py                 # on the GPU machine
    .venv/bin/python benchmarks/gpu.py --dry-run --out /tmp/gpu_dry.json

Writes ``benchmarks/results/gpu.json`` (or ``--out``).  Timings are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import onlinela
from onlinela_torch import KFACPreconditioner
from onlinela_torch.models import MNISTAutoencoder, TinyCausalLM
from onlinela_torch.preconditioner import METHODS

logger = logging.getLogger("benchmarks.gpu")
ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (full GPU run or the CPU dry run)."""

    eigh_dims: tuple[int, ...]
    rank: int
    stack: tuple[int, int]  # (batch, d) of the batched eigh
    brand_dims: tuple[int, ...]
    brand_cols: int
    brand_dense_dim: int  # dense eigh reference of the Brand section
    ae_width: float
    ae_in: int
    ae_batch: int
    lm_batch: tuple[int, int]  # (sequences, tokens)
    kfac_steps: int
    methods: tuple[str, ...]  # K-FAC methods of the step-time section
    tests_collect_only: bool


FULL = Sizes((4096, 8192, 16384), 220, (64, 1024), (4096, 16384, 65536), 256, 16384, 1.0, 784, 500, (32, 64), 50,
             METHODS, False)
DRY = Sizes((96, 160), 8, (4, 48), (64, 160), 8, 160, 0.05, 64, 32, (4, 16), 2, ("kfac", "rs-kfac", "b-kfac"), True)


# ------------------------------------------------------------------ backends
@dataclass(frozen=True)
class Backend:
    """An array namespace on a device, with its synchronisation and dense eigh."""

    name: str
    xp: Any
    device: Any
    sync: Callable[[], None]
    eigh: Callable[[Any], tuple[Any, Any]]  # ascending (w, V), like numpy


def _torch_backend(device: torch.device) -> Backend:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return Backend(f"torch-{device.type}", torch, device, sync, torch.linalg.eigh)


def _cupy_backend(dry_run: bool) -> tuple[Backend | None, str]:
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return Backend("cupy", cupy, None, lambda: cupy.cuda.Device().synchronize(), cupy.linalg.eigh), "cupy"
        why = "cupy sees no CUDA device"
    except Exception as exc:  # ImportError, CUDA driver errors
        why = f"cupy unavailable ({type(exc).__name__}: {exc})"
    if dry_run:  # the same code path, NumPy standing in
        return Backend("numpy (stand-in for cupy)", np, None, lambda: None, np.linalg.eigh), why
    return None, why


def _best_seconds(fn: Callable[[], Any], sync: Callable[[], None], repeats: int, warmup: bool = True) -> tuple[float, Any]:
    """Best wall-clock seconds of ``fn()`` over ``repeats`` calls (after one warm-up call), synchronised; its last result."""
    out = fn() if warmup else None
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _ea_like(b: Backend, d: int, batch: tuple[int, ...] = (), seed: int = 0) -> Any:
    """``Y Yᵀ / n`` with ``Y`` Gaussian ``(…, d, n)`` times ``j^-0.8`` column scales, ``n = min(2d, 2048)``: float32, PSD."""
    n = min(2 * d, 2048)
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, n + 1, dtype=np.float32) ** -0.8).astype(np.float32)
    Y = rng.standard_normal((*batch, d, n), dtype=np.float32) * scale
    if b.xp is torch:
        Yt = torch.from_numpy(Y).to(b.device)
        A = Yt @ Yt.transpose(-1, -2) / n
        return (A + A.transpose(-1, -2)) / 2
    Yx = b.xp.asarray(Y)
    A = Yx @ b.xp.swapaxes(Yx, -1, -2) / n
    return (A + b.xp.swapaxes(A, -1, -2)) / 2


def _spectral(A: Any, approx: onlinela.LowRankPSD) -> float:
    return float(onlinela.estimate_spectral_error(A, approx, n_iter=12, rng=0))


# ------------------------------------------------------------------ sections
def section_tests(sizes: Sizes) -> dict[str, Any]:
    """``pytest -m gpu`` and ``pytest -k cupy`` in subprocesses (collect-only in the dry run)."""
    out = {}
    extra = ["--collect-only"] if sizes.tests_collect_only else []
    targets = ["tests/test_gpu_script.py"] if sizes.tests_collect_only else ["tests"]
    for name, select in (("gpu_marker", ["-m", "gpu"]), ("cupy_backend", ["-k", "cupy"])):
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", "-p", "no:cacheprovider",
               *select, *extra, *targets]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        out[name] = {
            "command": " ".join(cmd[1:]),
            "returncode": proc.returncode,  # 5: nothing selected
            "summary": lines[-1] if lines else proc.stderr.strip()[-500:],
            "skipped_reasons": sorted({line for line in lines if line.startswith("SKIPPED")})[:20],
            "seconds": time.perf_counter() - t0,
        }
    return out


def _eigh_case(b: Backend, A: Any, r: int, repeats: int, big: bool) -> dict[str, Any]:
    """randomized_eigh (defaults), the exact eigh and (torch) svd_lowrank on one matrix or stack.

    ``big``: one timed call of the exact eigh and no warm-up (the smaller cases warmed the solver up).
    """
    res: dict[str, Any] = {}
    t, (w, V) = _best_seconds(lambda: b.eigh(A), b.sync, 1 if big else repeats, warmup=not big)
    if b.xp is torch:  # descending, top r
        w, V = torch.flip(w, dims=(-1,)), torch.flip(V, dims=(-1,))
        top = onlinela.LowRankPSD(V[..., :r].contiguous(), w[..., :r].clamp_min(0).contiguous())
    else:
        w, V = b.xp.flip(w, axis=-1), b.xp.flip(V, axis=-1)
        top = onlinela.LowRankPSD(b.xp.ascontiguousarray(V[..., :r]), b.xp.ascontiguousarray(b.xp.clip(w[..., :r], 0, None)))
    opt = float(w[..., r].max())
    res["optimal_error"] = opt  # λ_{r+1}, the best rank-r spectral error (max over a stack)
    res["exact_eigh"] = {"seconds": t, "error_ratio": _spectral(A, top) / opt}
    t, approx = _best_seconds(lambda: onlinela.randomized_eigh(A, r, rng=0), b.sync, repeats)
    res["randomized_eigh_default"] = {"seconds": t, "error_ratio": _spectral(A, approx) / opt}
    if b.xp is torch:
        for niter in (1, 2):
            t, (U, S, _) = _best_seconds(lambda: torch.svd_lowrank(A, q=r + 10, niter=niter), b.sync, repeats)
            lr = onlinela.LowRankPSD(U[..., :r].contiguous(), S[..., :r].contiguous())
            res[f"svd_lowrank_niter{niter}"] = {"seconds": t, "error_ratio": _spectral(A, lr) / opt}
    for key, entry in res.items():
        if isinstance(entry, dict) and key != "exact_eigh":
            entry["speedup_vs_exact"] = res["exact_eigh"]["seconds"] / entry["seconds"]
    return res


def section_eigh(backends: list[Backend], sizes: Sizes, repeats: int, deadline: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in backends:
        per: dict[str, Any] = {}
        cases = [(f"d={d}", (), d) for d in sizes.eigh_dims] + [(f"stack={sizes.stack[0]}x{sizes.stack[1]}^2", (sizes.stack[0],), sizes.stack[1])]
        for label, batch, d in cases:
            if time.perf_counter() > deadline:
                per[label] = {"skipped": "time budget spent"}
                continue
            try:
                per[label] = _eigh_case(b, _ea_like(b, d, batch), sizes.rank, repeats, big=d >= max(sizes.eigh_dims) and not batch)
            except Exception as exc:  # recorded; the run goes on
                per[label] = {"error": f"{type(exc).__name__}: {exc}"}
            logger.info("eigh %s %s: %s", b.name, label, per[label])
        out[b.name] = per
    return out


def section_brand(b: Backend, sizes: Sizes, repeats: int, deadline: float, dense_seconds: float | None) -> dict[str, Any]:
    """Brand updates; ``dense_seconds``: the exact eigh at ``brand_dense_dim`` measured by :func:`section_eigh`, if any."""
    out: dict[str, Any] = {}
    r, s = sizes.rank, sizes.brand_cols
    gen = torch.Generator(device=b.device).manual_seed(0)
    for d in sizes.brand_dims:
        if time.perf_counter() > deadline:
            out[f"d={d}"] = {"skipped": "time budget spent"}
            continue
        try:
            X = [torch.randn(d, s, generator=gen, device=b.device) / math.sqrt(s) for _ in range(r // s + 2)]
            approx = onlinela.empty_lowrank(d, like=X[0])
            for x in X[:-1]:  # fill up to rank r
                approx = onlinela.brand_update(approx, x, decay=0.95, rank=r)
            t, new = _best_seconds(lambda: onlinela.brand_update(approx, X[-1], decay=0.95, rank=r), b.sync, repeats)
            out[f"d={d}"] = {"seconds": t, "rank": new.rank}
        except Exception as exc:
            out[f"d={d}"] = {"error": f"{type(exc).__name__}: {exc}"}
        logger.info("brand %d: %s", d, out[f"d={d}"])
    d = sizes.brand_dense_dim
    if "seconds" in out.get(f"d={d}", {}) and (dense_seconds is not None or time.perf_counter() <= deadline):
        if dense_seconds is None:
            A = _ea_like(b, d)
            dense_seconds, _ = _best_seconds(lambda: b.eigh(A), b.sync, 1, warmup=False)
        out["dense_eigh"] = {"d": d, "seconds": dense_seconds, "speedup_of_brand": dense_seconds / out[f"d={d}"]["seconds"]}
    return out


def _dense_seconds(eigh: Any, backend: str, d: int) -> float | None:
    """The exact eigh's seconds at ``d`` from the eigh section's results, when it ran."""
    try:
        return float(eigh[backend][f"d={d}"]["exact_eigh"]["seconds"])
    except (KeyError, TypeError):
        return None


def _autoencoder_task(sizes: Sizes, device: torch.device):
    torch.manual_seed(0)
    model = MNISTAutoencoder(in_features=sizes.ae_in, width=sizes.ae_width).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    x = (torch.rand(sizes.ae_batch, sizes.ae_in, generator=g, device=device) > 0.5).float()

    def loss() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / x.shape[0]

    return model, loss


def _lm_task(sizes: Sizes, device: torch.device):
    torch.manual_seed(0)
    n, T = sizes.lm_batch
    model = TinyCausalLM(96, context=T).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, 96, (n, T + 1), generator=g, device=device)

    def loss() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return model, loss


def _step_seconds(task, sizes: Sizes, device: torch.device, method: str | None, sync: Callable[[], None]) -> dict[str, Any]:
    """Mean seconds per step over ``kfac_steps`` steps (after 2 warm-up steps) of SGD, or SGD preconditioned by ``method``."""
    model, loss = task(sizes, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    precond = None if method is None else KFACPreconditioner(model, method=method, factor_update_freq=10, inv_update_freq=50)

    def step() -> None:
        opt.zero_grad()
        loss().backward()
        if precond is not None:
            precond.step()
        opt.step()

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(sizes.kfac_steps):
        step()
    sync()
    entry: dict[str, Any] = {"seconds_per_step": (time.perf_counter() - t0) / sizes.kfac_steps}
    if precond is not None:
        kinds: dict[str, int] = {}
        for layer in precond.stats()["layers"].values():
            for which in ("A", "G"):
                if layer[which] is not None:
                    kinds[layer[which]["kind"]] = kinds.get(layer[which]["kind"], 0) + 1
        entry["factor_kinds"] = kinds
        precond.remove_hooks()
    return entry


def section_kfac(device: torch.device, sync: Callable[[], None], sizes: Sizes, deadline: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task_name, task in (("mnist-autoencoder-width1", _autoencoder_task), ("tiny-lm", _lm_task)):
        per: dict[str, Any] = {}
        for method in (None, *sizes.methods):
            key = method or "sgd"
            if time.perf_counter() > deadline:
                per[key] = {"skipped": "time budget spent"}
                continue
            try:
                per[key] = _step_seconds(task, sizes, device, method, sync)
            except Exception as exc:
                per[key] = {"error": f"{type(exc).__name__}: {exc}"}
            logger.info("kfac %s %s: %s", task_name, key, per[key])
        sgd = per.get("sgd", {}).get("seconds_per_step")
        for entry in per.values():
            if sgd and "seconds_per_step" in entry:
                entry["ratio_to_sgd"] = entry["seconds_per_step"] / sgd
        out[task_name] = per
    return out


# ------------------------------------------------------------------ main
def _environment(device: torch.device, cupy_note: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__,
        "device": str(device), "cupy": cupy_note, "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return env


def run(dry_run: bool, repeats: int, budget: float) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + budget
    sizes = DRY if dry_run else FULL
    if dry_run:  # CI-like: tiny kernels on shared cores are 10-40x slower with more threads than cores
        torch.set_num_threads(1)
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device (use --dry-run to check the script on a CPU)")
    device = torch.device("cpu" if dry_run else "cuda")
    tb = _torch_backend(device)
    cb, cupy_note = _cupy_backend(dry_run)
    backends = [tb] + ([cb] if cb is not None else [])
    payload: dict[str, Any] = {
        "benchmark": "gpu",
        "dry_run": dry_run,
        "sizes": asdict(sizes),
        "environment": _environment(device, cupy_note),
        "goals": {"eigh": "randomized >= 5x faster than torch.linalg.eigh at d=8192 float32, equal accuracy",
                  "brand": ">= 100x faster than dense eigh at d=16384"},
    }
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("tests", lambda: section_tests(sizes)),
        ("eigh", lambda: section_eigh(backends, sizes, repeats, deadline)),
        ("brand", lambda: section_brand(tb, sizes, repeats, deadline,
                                        _dense_seconds(payload.get("eigh"), tb.name, sizes.brand_dense_dim))),
        ("kfac_step", lambda: section_kfac(device, tb.sync, sizes, deadline)),
    ]
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            payload[name] = fn()
        except Exception as exc:  # a broken section is a finding, not the end of the run
            payload[name] = {"error": f"{type(exc).__name__}: {exc}"}
            logger.exception("section %s failed", name)
        payload.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    payload["total_seconds"] = time.perf_counter() - start
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds): checks the script")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case, best kept (after one warm-up)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining cases are skipped")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default benchmarks/results/gpu.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    payload = run(args.dry_run, args.repeats, args.budget)
    out = args.out or RESULTS / ("gpu_dry_run.json" if args.dry_run else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    logger.info("wrote %s (%.1f s)", out, payload["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

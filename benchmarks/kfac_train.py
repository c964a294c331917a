"""Training loss after a fixed number of steps: every K-FAC method vs SGD at the same learning rate.

Models none of the tests use: the project's ``MLPClassifier`` (64-512-256-10,
ReLU) and ``SmallCNN`` on scikit-learn's bundled 8×8 digits, batch 128,
SGD with ``lr`` and no momentum for every run; the K-FAC runs add a
:class:`onlinela_torch.KFACPreconditioner` with its *default* options
(``T_updt=10``, ``T_inv=50``, rank 220, damping 1e-3, KL clip 1e-3).  Same
initial weights and batch order for every run.

Usage::

    .venv/bin/python benchmarks/kfac_train.py            # 200 steps
    .venv/bin/python benchmarks/kfac_train.py --quick    # 60 steps

Writes ``benchmarks/results/kfac_train.json`` (``kfac_train_quick.json``);
reports, never asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time
from typing import Any

import torch
import torch.nn.functional as F

from onlinela_torch import KFACPreconditioner
from onlinela_torch.data import load_digits
from onlinela_torch.models import MLPClassifier, SmallCNN
from onlinela_torch.preconditioner import METHODS

logger = logging.getLogger("benchmarks.kfac_train")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLPClassifier(64, 10) if arch == "mlp" else SmallCNN(1, 8, 10, dropout=0.0)


def _run(method: str, arch: str, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int) -> dict[str, Any]:
    model = _model(arch)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pre = None if method == "sgd" else KFACPreconditioner(model, method=method, lr=lr)
    gen = torch.Generator().manual_seed(1)
    t0 = time.process_time()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if pre is not None:
            pre.step()
        opt.step()
    cpu = time.process_time() - t0
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    out: dict[str, Any] = {"train_loss": loss, "cpu_seconds": cpu}
    if pre is not None:
        st = pre.stats()
        out["factor_kinds"] = sorted({f["kind"] for layer in st["layers"].values() for f in (layer["A"], layer["G"]) if f})
        out["skipped_steps"] = st["skipped_steps"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    steps = args.steps or (60 if args.quick else 200)
    data = load_digits()
    out: dict[str, Any] = {
        "config": {"data": data.source, "steps": steps, "lr": args.lr, "batch": args.batch, "preconditioner": "defaults"},
        "results": {},
    }
    for arch in ("mlp", "cnn"):
        res = out["results"][arch] = {}
        for method in ("sgd", *METHODS):
            res[method] = _run(method, arch, data.x_train, data.y_train, steps, args.lr, args.batch)
            logger.info("%s %-13s train loss %.4f", arch, method, res[method]["train_loss"])
        sgd = res["sgd"]["train_loss"]
        out.setdefault("beats_sgd", {})[arch] = {m: res[m]["train_loss"] < sgd for m in METHODS}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("kfac_train_quick.json" if args.quick else "kfac_train.json")
    path.write_text(json.dumps(out, indent=2))
    logger.info("beats SGD: %s", out["beats_sgd"])
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

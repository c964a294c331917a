"""K-FAC-expand vs K-FAC-reduce for the Linear blocks of a tiny causal LM (the default of ``LinearBlock``).

The model is :class:`onlinela_torch.models.TinyCausalLM` (d_model 64, 2 pre-LN
layers, 4 heads, context 64) on the ``pydoc_data`` character corpus, batch
32.  Every parameter gets a curvature block (``build_blocks``); only the
``mode`` of the ``nn.Linear`` blocks (feed-forward layers and the output
layer; with ``--attention`` also the attention projections) differs between
the two arms.  The loop is the K-FAC recipe of
``KFACPreconditioner`` written on the block interface (dense factors,
product damping ``λ = 1e-2``, ``ρ = 0.95``, statistics every ``T_updt = 10``,
decompositions every ``T_inv = 50`` steps, the papers' per-parameter RMS cap
``min(1, κ/rms(v))`` with ``κ = 0.01``; with the KL clip ``κ = 1e-3`` of the
MNIST runs instead every arm stalled near 3.2 nats because the clip is set
by the q/k projections, whose curvature is tiny at initialisation), then
SGD with momentum 0.9; the lr is the best of a 3-value grid per arm.
``--adamw`` runs the AdamW peer (lr grid 1e-3, 3e-3, 1e-2) on the same batches.  Both arms
see the same batches (same seeds).  Reported: validation loss (mean
cross-entropy in nats per character on 64 fixed windows) after ``--steps``
steps, and seconds.  The seconds are reported, never asserted.

Usage::

    .venv/bin/python benchmarks/lm_expand_reduce.py                # 300 steps, lr grid 0.1 0.3 1, seeds 0 1
    .venv/bin/python benchmarks/lm_expand_reduce.py --quick        # 60 steps, one lr, one seed
    .venv/bin/python benchmarks/lm_expand_reduce.py --attention    # attention projections switched too
    .venv/bin/python benchmarks/lm_expand_reduce.py --adamw        # the AdamW peer

Writes ``benchmarks/results/lm_expand_reduce[_adamw][_attention][_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import time

import torch
import torch.nn.functional as F

from onlinela_torch import blocks as B
from onlinela_torch.data import load_pydoc_text
from onlinela_torch.models import TinyCausalLM

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
T_UPDT, T_INV, DAMPING, KL_CLIP, RMS_CLIP = 10, 50, 1e-2, None, 1e-2


def run_adamw(lr: float, seed: int, steps: int, corpus, val) -> dict:
    torch.manual_seed(seed)
    model = TinyCausalLM(corpus.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1000 + seed)
    curve = []
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = corpus.batch("train", 32, 64, generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, corpus.vocab_size), y.reshape(-1))
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    return {"mode": "adamw", "lr": lr, "seed": seed, "val_loss": _val_loss(model, corpus, val), "seconds": seconds, "train_curve": curve}


def _val_loss(model, corpus, val) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(val[0]).reshape(-1, corpus.vocab_size), val[1].reshape(-1)))


def run(mode: str, lr: float, seed: int, steps: int, corpus, val, attention: bool = False) -> dict:
    torch.manual_seed(seed)
    model = TinyCausalLM(corpus.vocab_size)
    step = {"k": 0}
    ctx = B.BlockContext(plan=lambda: B.StepFlags(ea=step["k"] % T_UPDT == 0))
    ctx.watch(model)
    bs = B.build_blocks(model, ctx)
    for blk in bs.blocks.values():
        if isinstance(blk, B.LinearBlock) or (attention and isinstance(blk, B.MultiheadAttentionBlock)):
            blk.mode = mode
    bs.attach()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    curve = []
    t0 = time.perf_counter()
    for k in range(steps):
        step["k"] = k
        x, y = corpus.batch("train", 32, 64, generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, corpus.vocab_size), y.reshape(-1))
        loss.backward()
        with torch.no_grad():
            bs.update(decompose=k % T_INV == 0, damping=DAMPING, step=k)
            new = bs.precondition(DAMPING)
            if RMS_CLIP is not None:  # the papers' per-layer cap min(1, κ / rms(v))
                new = {p: v * min(1.0, RMS_CLIP / max(float(v.square().mean().sqrt()), 1e-30)) for p, v in new.items()}
            vg = sum(float((v * p.grad).sum()) for p, v in new.items()) * lr**2
            nu = min(1.0, (KL_CLIP / abs(vg)) ** 0.5) if vg and KL_CLIP is not None else 1.0
            for p, v in new.items():
                p.grad.copy_(v * nu)
        opt.step()
        curve.append(float(loss.detach()))
        if not torch.isfinite(loss):
            break
    seconds = time.perf_counter() - t0
    return {"mode": mode, "lr": lr, "seed": seed, "val_loss": _val_loss(model, corpus, val), "seconds": seconds, "train_curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="default 0.1 0.3 1 (K-FAC), 1e-3 3e-3 1e-2 (AdamW)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--attention", action="store_true", help="switch the attention projections' mode too")
    ap.add_argument("--adamw", action="store_true", help="run the AdamW peer instead")
    args = ap.parse_args()
    if args.lrs is None:
        args.lrs = [1e-3, 3e-3, 1e-2] if args.adamw else [0.1, 0.3, 1.0]
    if args.quick:
        args.steps, args.lrs, args.seeds = 60, args.lrs[1:2], [0]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    corpus = load_pydoc_text()
    val = corpus.windows("val", 64, max_windows=64)
    arms = ("adamw",) if args.adamw else ("expand", "reduce")
    runs = [
        run_adamw(lr, s, args.steps, corpus, val) if m == "adamw" else run(m, lr, s, args.steps, corpus, val, args.attention)
        for s in args.seeds for lr in args.lrs for m in arms
    ]
    summary = {}
    for mode in arms:
        mine = [r for r in runs if r["mode"] == mode]
        by_lr = {lr: [r["val_loss"] for r in mine if r["lr"] == lr] for lr in args.lrs}
        best = min(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))
        summary[mode] = {
            "best_lr": best,
            "val_loss_mean": sum(by_lr[best]) / len(by_lr[best]),
            "val_loss_per_seed": by_lr[best],
            "seconds_mean": sum(r["seconds"] for r in mine if r["lr"] == best) / len(by_lr[best]),
        }
    if not args.adamw:
        summary["reduce_over_expand_seconds"] = summary["reduce"]["seconds_mean"] / summary["expand"]["seconds_mean"]
    out = {
        "config": {"steps": args.steps, "attention_mode_switched": args.attention, "lrs": args.lrs, "seeds": args.seeds, "batch": 32, "context": 64,
                   "T_updt": T_UPDT, "T_inv": T_INV, "damping": DAMPING, "kl_clip": KL_CLIP, "rms_clip": RMS_CLIP,
                   "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": 1},
        "summary": summary,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "lm_expand_reduce" + ("_adamw" if args.adamw else "") + ("_attention" if args.attention else "")
    stem += "_quick" if args.quick else ""
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, style in zip(arms, ("-", "--")):
            for r in runs:
                if r["mode"] == mode and r["lr"] == summary[mode]["best_lr"]:
                    ax.plot(r["train_curve"], style, label=f"{mode} lr={r['lr']} seed={r['seed']}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/char)")
        ax.set_title("TinyCausalLM: " + ("AdamW" if args.adamw else "K-FAC, Linear blocks expand vs reduce"))
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    except ImportError:
        logging.warning("matplotlib is not installed: no PNG")
    print(json.dumps(summary, indent=1))  # noqa: T201  (a script's result)


if __name__ == "__main__":
    main()

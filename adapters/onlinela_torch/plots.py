"""The figures of the ``onlinela`` command, computed as data first.

:func:`compare_figure` and :func:`spectrum_figure` are pure: from the
payloads that ``compare.json`` and ``spectrum.json`` hold they return a
:class:`Figure` (panels with titles, axis labels and limits; series with
their styles and legend labels; labelled reference lines; a caption), and
:func:`render` draws one with matplotlib.  Everything a reader needs is in
the figure: each optimizer (or width) has its own colour *and* marker,
curves that coincide say so in the legend, target lines carry their value
and unit, and every panel has a legend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MARKERS",
    "PALETTE",
    "Figure",
    "Panel",
    "RefLine",
    "Series",
    "Style",
    "compare_figure",
    "distinct_styles",
    "metric_label",
    "render",
    "spectrum_figure",
]

#: Line colours, each with a contrast of at least 3:1 against white (no yellow)
#: and at least 28 apart in CIELAB (ΔE*ab); the order keeps neighbours dissimilar.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#d95f02", "#8c564b", "#e7298a",
    "#000000", "#00838f", "#7f7f7f", "#393b79", "#637939", "#a6761d",
)
#: Marker shapes, as many as colours.
MARKERS: tuple[str, ...] = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d")
_FLOAT64_EPS = 2.220446049250313e-16


@dataclass(frozen=True)
class Style:
    """How one series is drawn (matplotlib names)."""

    color: str
    marker: str = ""
    linestyle: str = "-"
    linewidth: float = 1.2
    markersize: float = 4.0
    markevery: int | None = None


@dataclass(frozen=True)
class Series:
    """One line of one panel.

    Attributes
    ----------
    panel : int
        Index into :attr:`Figure.panels`.
    x, y : tuple of float
        The points (finite; empty for a legend-only entry).
    style : Style
        Colour, marker and line.
    label : str or None
        Legend text; None keeps it out of the legend.
    """

    panel: int
    x: tuple[float, ...]
    y: tuple[float, ...]
    style: Style
    label: str | None = None


@dataclass(frozen=True)
class RefLine:
    """A labelled horizontal line (a target, a clipping floor); the label ends at ``label_x`` (axes fraction)."""

    panel: int
    y: float
    label: str
    color: str = "#555555"
    linestyle: str = ":"
    label_x: float = 0.99


@dataclass(frozen=True)
class Panel:
    """Title, axis labels, scales and limits of one axes."""

    title: str
    xlabel: str
    ylabel: str
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    xscale: str = "linear"
    yscale: str = "linear"


@dataclass(frozen=True)
class Figure:
    """Everything :func:`render` draws."""

    title: str
    panels: tuple[Panel, ...]
    series: tuple[Series, ...]
    lines: tuple[RefLine, ...] = ()
    caption: str = ""


def distinct_styles(n: int) -> list[Style]:
    """``n`` styles whose (colour, marker) pairs are all different.

    Up to ``len(PALETTE)`` (13) series, no two share a colour or a marker;
    beyond that the marker sequence shifts by one per round of colours, so
    pairs stay unique up to 13² series.

    Parameters
    ----------
    n : int
        Number of series (non-negative).

    Returns
    -------
    list of Style
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    k = len(PALETTE)
    return [Style(PALETTE[i % k], MARKERS[(i + i // k) % k]) for i in range(n)]


def metric_label(metric: str) -> tuple[str, str]:
    """Axis label and unit of a task metric (``test_accuracy``, ``train_recon_error``, other)."""
    if metric == "test_accuracy":
        return "test accuracy (%)", "%"
    if metric == "train_recon_error":
        return "training reconstruction error (squared error per image, summed over pixels)", "per image"
    return metric.replace("_", " "), ""


def _limits(values: Sequence[float], *, log: bool, margin: float = 0.05) -> tuple[float, float]:
    """Limits enclosing every value with a relative ``margin`` (multiplicative on a log axis)."""
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return (0.1, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        span = math.log10(hi / lo) if hi > lo else 1.0
        f = 10 ** (margin * span)
        return lo / f, hi * f
    pad = margin * (hi - lo) if hi > lo else max(abs(hi), 1.0) * margin
    return lo - pad, hi + pad


def _metric_curve(run: Mapping[str, Any], xkey: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pts = [(float(h[xkey]), float(h["metric"])) for h in run["history"]
           if h.get("metric") is not None and math.isfinite(h["metric"])]
    return tuple(p[0] for p in pts), tuple(p[1] for p in pts)


def _epoch_metrics(result: Mapping[str, Any]) -> list[tuple[float, ...]]:
    return [_metric_curve(run, "epoch")[1] for run in result["runs"]]


def _coincides(a: list[tuple[float, ...]], b: list[tuple[float, ...]], tol: float, log: bool) -> bool | None:
    """True if identical, False if within ``tol`` everywhere (in log10 units on a log axis), None if they differ."""
    if [len(r) for r in a] != [len(r) for r in b]:
        return None
    f = (lambda v: math.log10(v) if v > 0 else -math.inf) if log else (lambda v: v)
    worst = max((abs(f(x) - f(y)) if x != y else 0.0 for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)
    if worst == 0.0:
        return True
    return False if worst <= tol else None


def _legend_facts(result: Mapping[str, Any]) -> str:
    """``lr 0.1, 2 seeds, step 1.8× SGD, Brand 10/16``: the parts that ``result`` holds."""
    n = len(result["runs"])
    facts = [f"lr {result['lr']:g}"] + ([f"{n} seeds"] if n > 1 else [])
    ratio = result.get("step_vs_sgd")
    if ratio is not None and ratio != 1.0:
        facts.append(f"step {ratio:.2g}× SGD")
    if result.get("brand_factors") or result.get("fallback_factors"):
        facts.append(f"Brand {len(result['brand_factors'])}/{result['n_factors']}")
    return ", ".join(facts)


def compare_figure(
    task: str,
    metric: str,
    higher_is_better: bool,
    targets: Sequence[float],
    results: Mapping[str, Mapping[str, Any]],
) -> Figure:
    """The figure of ``onlinela compare``: the metric against training seconds and against epochs.

    Parameters
    ----------
    task : str
        Task name (the title).
    metric : str
        The metric's name (:attr:`~onlinela_torch.experiment.Task.metric_name`).
    higher_is_better : bool
        Direction of the metric; lower-is-better metrics get a log axis.
    targets : sequence of float
        Target levels, drawn as labelled lines.
    results : Mapping
        ``compare.json``'s ``results``: per optimizer ``lr`` and ``runs``
        (each with ``history`` records ``epoch``, ``seconds``, ``metric``);
        optional ``step_vs_sgd`` (the legend gives the step time over SGD's)
        and ``brand_factors``, ``fallback_factors``, ``n_factors`` (a Brand
        method's legend gives its Brand-updated factors out of all).

    Returns
    -------
    Figure
        Two panels sharing the metric's limits, which enclose every finite
        point (epoch 0 included) and every target.  A curve whose per-epoch
        metrics equal an earlier one's (exactly, or within 0.1 % of the axis
        span) is drawn dashed and its legend label says ``identical to X``
        or ``coincides with X``.
    """
    ylabel, unit = metric_label(metric)
    log = not higher_is_better
    all_y = [y for r in results.values() for run in r["runs"] for y in _metric_curve(run, "epoch")[1]]
    ylim = _limits([*all_y, *targets], log=log)
    span = math.log10(ylim[1] / ylim[0]) if log else ylim[1] - ylim[0]
    styles = distinct_styles(len(results))
    names = list(results)
    series: list[Series] = []
    notes: list[str] = []
    xmax = [0.0, 0.0]
    for i, (name, r) in enumerate(results.items()):
        style, note = styles[i], ""
        for j in range(i):
            same = _coincides(_epoch_metrics(r), _epoch_metrics(results[names[j]]), 1e-3 * span, log)
            if same is not None:
                note = f"identical to {names[j]}" if same else f"coincides with {names[j]}"
                style = Style(style.color, style.marker, linestyle="--")
                notes.append(f"{name} {note}")
                break
        label = f"{name} ({_legend_facts(r)})" + (f" – {note}" if note else "")
        for k, run in enumerate(r["runs"]):
            for panel, xkey in enumerate(("seconds", "epoch")):
                x, y = _metric_curve(run, xkey)
                xmax[panel] = max([xmax[panel], *x])
                series.append(Series(panel, x, y, style, label if k == 0 else None))
    arrow = "≥" if higher_is_better else "≤"
    # labels staggered along the line, so that close targets do not print over each other
    lines = tuple(RefLine(p, float(t), f"target {arrow} {t:g} {unit}".rstrip(), label_x=0.99 - 0.16 * (i % 5))
                  for p in (0, 1) for i, t in enumerate(targets))
    panels = tuple(
        Panel(title, xlabel, ylabel, (0.0, max(xmax[p], 1e-9) * 1.04), ylim, yscale="log" if log else "linear")
        for p, (title, xlabel) in enumerate((("metric against training time", "training wall-clock (s)"),
                                             ("metric against epochs", "epoch")))
    )
    caption = ("Each marker is one evaluation; epoch 0 is the initial model (the same for every optimizer of a "
               "seed). Time is training wall-clock, evaluation excluded; each seed is its own line. "
               "Dotted grey lines: targets.")
    if notes:
        caption += " Dashed: " + "; ".join(notes) + "."
    return Figure(f"onlinela compare: {task}", panels, tuple(series), lines, caption)


def _relative_floor(spectra: Sequence[Mapping[str, Any]]) -> float:
    """``1e-4`` times the smallest ``--eps`` level, but not below float64 rounding (``d · ε · λ_1``)."""
    levels = [float(e) for s in spectra for e in s.get("modes_above", {})]
    floor = 1e-4 * min(levels) if levels else 1e-8
    return max(floor, max((s["dim"] for s in spectra), default=1) * _FLOAT64_EPS)


def spectrum_figure(task: str, spectra: Sequence[Mapping[str, Any]], floor: float | None = None) -> Figure:
    """The figure of ``onlinela spectrum``: ``λ_j / λ_1`` of the A and G factors per width, with the bounds.

    Parameters
    ----------
    task : str
        Task name (the title).
    spectra : sequence of Mapping
        ``spectrum.json``'s ``spectra``: ``width``, ``factor``, ``layer``,
        ``dim``, ``eigenvalues`` and, when available, ``bound`` and
        ``stream_bound``.
    floor : float, optional
        Relative clipping floor of the log axis; default ``1e-4`` times the
        smallest ``--eps`` level recorded in ``modes_above``, at least the
        float64 rounding level ``d · 2.2e-16``.  Values below it (zero
        eigenvalues beyond the factor's rank show up as ~1e-16 noise) are
        drawn at the floor; the caption says how many.

    Returns
    -------
    Figure
        One panel per factor; one colour and marker per width (measured:
        solid, Weyl bound: dashed, stream bound: dotted, each explained in
        every panel's legend).
    """
    floor = _relative_floor(spectra) if floor is None else float(floor)
    if not 0 < floor < 1:
        raise ValueError(f"`floor` must lie in (0, 1), got {floor}")
    widths = sorted({s["width"] for s in spectra})
    styles = dict(zip(widths, distinct_styles(len(widths))))
    kinds = (("eigenvalues", "-", "measured (solid)"), ("bound", "--", "Weyl a-priori bound (dashed)"),
             ("stream_bound", ":", "stream bound (dotted)"))
    series: list[Series] = []
    panels: list[Panel] = []
    clipped = total = 0
    for p, key in enumerate(("A", "G")):
        rows = [s for s in spectra if s["factor"] == key]
        ys: list[float] = []
        dmax = max((s["dim"] for s in rows), default=1)
        for s in rows:
            lam1 = s["eigenvalues"][0] or 1.0
            base = styles[s["width"]]
            for field, ls, _ in kinds:
                if field not in s:
                    continue
                rel = [v / lam1 for v in s[field]]
                if field == "eigenvalues":
                    clipped += sum(v < floor for v in rel)
                    total += len(rel)
                y = tuple(max(v, floor) for v in rel)
                ys += y
                style = Style(base.color, base.marker if field == "eigenvalues" else "", ls,
                              linewidth=1.4 if field == "eigenvalues" else 0.9, markersize=3.5,
                              markevery=max(1, s["dim"] // 12))
                label = f"width {s['width']:g} (d={s['dim']})" if field == "eigenvalues" else None
                series.append(Series(p, tuple(float(j) for j in range(1, len(y) + 1)), y, style, label))
        for field, ls, text in kinds:
            if any(field in s for s in rows):
                series.append(Series(p, (), (), Style("#000000", linestyle=ls, linewidth=1.0), text))
        layer = str(rows[0]["layer"]).split(":")[0] if rows else "?"  # the index; sizes vary with the width
        ylim = (floor / 2, max(ys, default=1.0) * 2)
        panels.append(Panel(f"{key}-factor of layer {layer}", "index j (eigenvalues in descending order)",
                            "λ_j / λ_1 (relative eigenvalue)", (0.0, dmax * 1.02), ylim, yscale="log"))
    lines = tuple(RefLine(p, floor, f"floor {floor:.0e}") for p in range(2))
    caption = (f"Values below {floor:.0e}·λ_1 are drawn at that floor ({clipped} of {total} measured eigenvalues: "
               "zero eigenvalues beyond the factor's rank appear as rounding noise near 1e-16). "
               "Bounds from onlinela.ea_eigenvalue_bound (Weyl) and ea_stream_eigenvalue_bound.")
    return Figure(f"onlinela spectrum: {task}", tuple(panels), tuple(series), lines, caption)


def render(figure: Figure, path: str | os.PathLike[str]) -> None:
    """Draw ``figure`` with matplotlib (Agg backend) and save it to ``path`` (PNG at 110 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(figure.panels), figsize=(6.5 * len(figure.panels), 5.2), squeeze=False)
    axes = axes[0]
    for s in figure.series:
        st = s.style
        axes[s.panel].plot(s.x, s.y, color=st.color, marker=st.marker or None, ls=st.linestyle, lw=st.linewidth,
                           ms=st.markersize, markevery=st.markevery, label=s.label)
    for line in figure.lines:
        ax = axes[line.panel]
        ax.axhline(line.y, color=line.color, ls=line.linestyle, lw=0.8)
        ax.annotate(line.label, xy=(line.label_x, line.y), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7, color=line.color)
    for ax, panel in zip(axes, figure.panels):
        ax.set_xscale(panel.xscale)
        ax.set_yscale(panel.yscale)
        ax.set_xlim(*panel.xlim)
        ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    fig.suptitle(figure.title)
    if figure.caption:
        fig.text(0.01, 0.01, figure.caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.07 if figure.caption else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

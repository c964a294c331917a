"""The data of the command's figures (``onlinela_torch.plots``), checked without drawing an image."""

from __future__ import annotations

import math

import pytest

from onlinela_torch import plots

NAMES = ["sgd", "adam", "kfac", "rs-kfac", "sre-kfac", "nystrom-kfac", "b-kfac", "br-kfac", "b-kfac-c",
         "kld-wrm-so", "kld-wrm-q", "kld-wrm-qe"]


def _relative_luminance(hex_color):
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(int(hex_color[i:i + 2], 16)) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_on_white(hex_color):
    """WCAG 2 contrast ratio against white (pure yellow: 1.07, the old spectrum colour #fde725: 1.2)."""
    return 1.05 / (_relative_luminance(hex_color) + 0.05)


def result(curve, lr=0.1, seconds_per_epoch=1.0, seeds=1):
    """A ``compare.json`` result whose runs follow ``curve`` (metric per epoch, epoch 0 first)."""
    runs = [{"history": [{"epoch": e, "seconds": e * seconds_per_epoch * (1 + 0.1 * s), "metric": m}
                         for e, m in enumerate(curve)]} for s in range(seeds)]
    return {"lr": lr, "runs": runs}


def labelled(figure, panel):
    return [s for s in figure.series if s.panel == panel and s.label]


# ------------------------------------------------------------------- styles
def test_styles_are_distinct_in_colour_and_marker():
    for n in range(1, len(plots.PALETTE) + 1):
        styles = plots.distinct_styles(n)
        assert len({s.color for s in styles}) == n and len({s.marker for s in styles}) == n, n
    many = plots.distinct_styles(len(plots.PALETTE) ** 2)
    assert len({(s.color, s.marker) for s in many}) == len(many)  # pairs stay unique far beyond 12
    assert len(plots.MARKERS) == len(plots.PALETTE) >= 13
    with pytest.raises(ValueError, match="`n` must be a non-negative int"):
        plots.distinct_styles(-1)


def test_palette_is_readable_on_white():
    """WCAG's 3:1 minimum for graphics; it excludes yellows and the pale end of viridis."""
    worst = min(plots.PALETTE, key=contrast_on_white)
    assert contrast_on_white(worst) >= 3.0, worst
    assert contrast_on_white("#fde725") < 3.0  # the test can fail: viridis' yellow would


# ------------------------------------------------------------------ compare
def _twelve():
    """Twelve optimizers with distinct curves, except two exact and one near copy."""
    res = {name: result([10.0] + [10.0 + (i + 1) * (e + 1) for e in range(3)], seconds_per_epoch=0.5 + i)
           for i, name in enumerate(NAMES)}
    res["br-kfac"] = result([h["metric"] for h in res["b-kfac"]["runs"][0]["history"]], seconds_per_epoch=7.0)
    near = [h["metric"] for h in res["rs-kfac"]["runs"][0]["history"]]
    res["sre-kfac"] = result([m + 1e-6 for m in near])
    res["kld-wrm-qe"]["runs"][0]["history"].append({"epoch": 4, "seconds": 60.0, "metric": None})  # NaN in JSON
    return res


def test_compare_figure_styles_legends_and_notes():
    res = _twelve()
    fig = plots.compare_figure("digits-mlp", "test_accuracy", True, [90.0, 94.0], res)
    assert len(fig.panels) == 2
    for panel in (0, 1):  # every panel has its own legend entries, one per optimizer
        entries = labelled(fig, panel)
        assert [e.label.split(" ")[0] for e in entries] == NAMES
        assert len({(e.style.color, e.style.marker) for e in entries}) == 12
        assert len({e.style.color for e in entries}) == 12 and len({e.style.marker for e in entries}) == 12
    labels = {e.label.split(" ")[0]: e for e in labelled(fig, 1)}
    assert labels["br-kfac"].label.endswith("identical to b-kfac") and labels["br-kfac"].style.linestyle == "--"
    assert labels["sre-kfac"].label.endswith("coincides with rs-kfac")
    assert "identical" not in labels["b-kfac"].label and labels["b-kfac"].style.linestyle == "-"
    assert "br-kfac identical to b-kfac" in fig.caption and "sre-kfac coincides with rs-kfac" in fig.caption
    assert fig.panels[0].xlabel == "training wall-clock (s)" and fig.panels[1].xlabel == "epoch"
    assert fig.panels[0].ylabel == "test accuracy (%)"


def test_compare_figure_limits_include_every_point_and_target():
    res = _twelve()
    targets = [90.0, 94.0, 99.0]
    fig = plots.compare_figure("digits-mlp", "test_accuracy", True, targets, res)
    for panel in fig.panels:
        lo, hi = panel.ylim
        assert lo < 10.0 < hi  # the epoch-0 points (10 %) are on the axis
        assert all(lo < t < hi for t in targets)
    for s in fig.series:
        p = fig.panels[s.panel]
        assert all(p.ylim[0] < y < p.ylim[1] for y in s.y) and all(p.xlim[0] <= x <= p.xlim[1] for x in s.x)
        assert all(math.isfinite(y) for y in s.y)
    assert any(0.0 in s.x and 10.0 in s.y for s in fig.series if s.panel == 1)
    lines = [(ln.panel, ln.y, ln.label) for ln in fig.lines]
    assert sorted(lines) == sorted((p, t, f"target ≥ {t:g} %") for p in (0, 1) for t in targets)
    assert len({ln.label_x for ln in fig.lines if ln.panel == 0}) == len(targets)  # labels do not overprint


def test_compare_figure_of_a_lower_is_better_metric_is_logarithmic():
    res = {"sgd": result([80.0, 40.0, 30.0]), "kfac": result([80.0, 20.0, 5.0])}
    fig = plots.compare_figure("mnist-autoencoder", "train_recon_error", False, [35.0, 2.0], res)
    for panel in fig.panels:
        assert panel.yscale == "log" and 0 < panel.ylim[0] < 2.0 and panel.ylim[1] > 80.0
        assert "squared error per image" in panel.ylabel
    assert {ln.label for ln in fig.lines} == {"target ≤ 35 per image", "target ≤ 2 per image"}
    assert not any("identical" in (s.label or "") for s in fig.series)  # same start, different curves


# ----------------------------------------------------------------- spectrum
def _spectra(widths=(0.25, 0.5, 1.0, 2.0)):
    out = []
    for w in widths:
        for key, d in (("A", int(40 * w) + 1), ("G", int(20 * w))):
            rank = max(2, d // 2)
            eig = [10.0 * 0.5 ** j if j < rank else 1e-16 * (j % 3) for j in range(d)]  # noise beyond the rank
            out.append({"width": w, "factor": key, "layer": f"1: {d}->{d}", "dim": d, "eigenvalues": eig,
                        "bound": [20.0 * 0.9 ** j for j in range(d)], "stream_bound": [15.0 * 0.8 ** j for j in range(d)],
                        "modes_above": {"0.01": {}, "0.001": {}}})
    return out


def test_spectrum_figure_clips_at_a_stated_relative_floor():
    spectra = _spectra()
    fig = plots.spectrum_figure("mnist-mlp", spectra)
    floor = 1e-4 * 1e-3  # 1e-4 times the smallest --eps level
    below = sum(v / s["eigenvalues"][0] < floor for s in spectra for v in s["eigenvalues"])
    assert below > 0
    assert f"{floor:.0e}" in fig.caption and f"({below} of {sum(s['dim'] for s in spectra)} measured" in fig.caption
    for s in fig.series:
        assert all(y >= floor for y in s.y)
    for panel in fig.panels:
        assert panel.yscale == "log" and panel.ylim[0] < floor and math.log10(panel.ylim[1] / panel.ylim[0]) < 9
    assert {(ln.panel, ln.y) for ln in fig.lines} == {(0, floor), (1, floor)}
    with pytest.raises(ValueError, match="`floor`"):
        plots.spectrum_figure("mnist-mlp", spectra, floor=0.0)


def test_spectrum_figure_legends_and_colours():
    fig = plots.spectrum_figure("mnist-mlp", _spectra())
    for panel in (0, 1):
        entries = labelled(fig, panel)
        widths = [e for e in entries if e.label.startswith("width")]
        assert [e.label.split(" (")[0] for e in widths] == ["width 0.25", "width 0.5", "width 1", "width 2"]
        assert len({(e.style.color, e.style.marker) for e in widths}) == 4
        assert {e.label for e in entries if not e.label.startswith("width")} == {
            "measured (solid)", "Weyl a-priori bound (dashed)", "stream bound (dotted)"}
        for s in (s for s in fig.series if s.panel == panel):
            assert contrast_on_white(s.style.color) >= 3.0, s.style.color  # readable on white: no yellow
        assert fig.panels[panel].title.startswith(("A-factor of layer 1", "G-factor of layer 1"))
    styles = {s.style.linestyle for s in fig.series if s.x}
    assert styles == {"-", "--", ":"}


def test_styles_of_compare_and_spectrum_never_repeat_within_a_figure():
    res = {f"opt{i}": result([float(i), float(i + 1)]) for i in range(14)}
    fig = plots.compare_figure("t", "test_accuracy", True, [], res)
    pairs = [(s.style.color, s.style.marker) for s in labelled(fig, 0)]
    assert len(pairs) == 14 and len(set(pairs)) == 14  # 14 > 13 colours: the marker tells the 14th apart


def test_compare_legend_gives_step_ratio_and_brand_factors_when_recorded():
    res = {"sgd": result([50.0, 40.0, 30.0]), "rs-kfac": result([50.0, 30.0, 20.0]),
           "b-kfac": result([50.0, 25.0, 15.0]), "adam": result([50.0, 35.0, 25.0])}
    res["sgd"].update(step_vs_sgd=1.0, brand_factors=[], fallback_factors=[], n_factors=0)
    res["rs-kfac"].update(step_vs_sgd=2.345, brand_factors=[], fallback_factors=[], n_factors=16)
    res["b-kfac"].update(step_vs_sgd=3.0, brand_factors=["fc1/A", "fc1/G"], fallback_factors=["fc2/A"], n_factors=3)
    labels = {e.label.split(" ")[0]: e.label for e in labelled(
        plots.compare_figure("mnist-autoencoder-brand", "train_recon_error", False, [20.0], res), 0)}
    assert labels["sgd"] == "sgd (lr 0.1)"  # the reference: no ratio of 1
    assert labels["rs-kfac"] == "rs-kfac (lr 0.1, step 2.3× SGD)"  # not a Brand method: no Brand count
    assert labels["b-kfac"] == "b-kfac (lr 0.1, step 3× SGD, Brand 2/3)"
    assert labels["adam"] == "adam (lr 0.1)"  # a result without the fields (an older compare.json)

"""The ``onlinela`` command, run in-process through ``main([...])`` on tiny budgets."""

from __future__ import annotations

import json
import math
import pathlib
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from onlinela_torch import experiment as ex  # noqa: E402
from onlinela_torch.cli import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--task", "digits-mlp", "--max-train", "256", "--batch-size", "32"]


def run(args, capsys):
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------- compare
def test_compare_writes_table_json_and_png(tmp_path, capsys):
    code, out, _ = run(["compare", *TINY, "--epochs", "2", "--optimizers", "sgd,adam", "--seeds", "0,1",
                        "--lr-grid", "0.1,0.01", "--probe-epochs", "0.5", "--targets", "20,99.9",
                        "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "sgd" in out and "adam" in out and "never" in out  # 99.9% is out of reach
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["task"] == "digits-mlp" and payload["config"]["seeds"] == [0, 1]
    assert set(payload["results"]) == {"sgd", "adam"}
    for res in payload["results"].values():
        assert res["lr"] in (0.1, 0.01) and set(res["probe"]) == {"0.1", "0.01"}
        assert len(res["runs"]) == 2
        for r in res["runs"]:
            assert [h["epoch"] for h in r["history"]] == [0, 1, 2]
            seconds = [h["seconds"] for h in r["history"]]
            assert seconds == sorted(seconds) and seconds[0] == 0
            assert r["time_to_target"]["99.9"] is None and r["epochs_to_target"]["20.0"] is not None
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_same_seed_same_initial_model(tmp_path, capsys):
    code, _, _ = run(["compare", *TINY, "--epochs", "1", "--optimizers", "sgd,adam", "--lr", "0.01",
                      "--out", str(tmp_path)], capsys)
    assert code == 0
    res = json.loads((tmp_path / "compare.json").read_text())["results"]
    start = {name: r["runs"][0]["history"][0]["metric"] for name, r in res.items()}
    assert start["sgd"] == start["adam"]  # same seed, same initial weights
    assert res["sgd"]["probe"] == {}  # one learning rate: no probe


def test_demo_runs_compare_with_its_defaults(tmp_path, capsys):
    code, out, _ = run(["demo", *TINY, "--epochs", "1", "--optimizers", "sgd", "--out", str(tmp_path)], capsys)
    assert code == 0 and "sgd" in out
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["config"]["lr_grid"] == [0.1, 0.01, 0.001]


def test_every_available_curvature_optimizer_runs(tmp_path, capsys):
    names = [n for n, s in ex.available_optimizers().items() if s.family != "baseline"]
    if not names:
        pytest.skip("the K-FAC family is not importable in this installation")
    code, out, _ = run(["compare", *TINY, "--epochs", "1", "--optimizers", ",".join(names), "--lr", "0.01",
                        "--kfac-opt", "factor_update_freq=2", "--kfac-opt", "inv_update_freq=4",
                        "--out", str(tmp_path)], capsys)
    assert code == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["failed"] == {}, payload["failed"]
    for name in names:
        assert math.isfinite(payload["results"][name]["final_metric_mean"]), name


# --------------------------------------------------------------------- train
def final_params(path):
    return torch.load(path, weights_only=True)["model"]


def test_train_checkpoint_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    args = ["train", "--task", "digits-cnn", "--max-train", "128", "--batch-size", "32", "--optimizer", "sgd",
            "--lr", "0.05", "--seed", "3"]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    assert run([*args, "--epochs", "2", "--checkpoint", str(straight), "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run([*args, "--epochs", "1", "--checkpoint", str(split), "--out", str(tmp_path / "b")], capsys)[0] == 0
    code, out, _ = run([*args, "--epochs", "2", "--checkpoint", str(split), "--resume",
                        "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and "epoch 2" in out
    a, b = final_params(straight), final_params(split)
    assert a.keys() == b.keys()
    for key in a:  # dropout masks and minibatch order are replayed exactly
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    history = json.loads((tmp_path / "b" / "train.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]


@pytest.mark.parametrize("optimizer", ["rs-kfac", "b-kfac", "kld-wrm-q"])
def test_resume_restores_the_curvature_state(tmp_path, capsys, optimizer):
    if optimizer not in ex.available_optimizers():
        pytest.skip(f"{optimizer} is not importable in this installation")
    args = ["train", *TINY, "--max-train", "96", "--optimizer", optimizer, "--lr", "0.05", "--seed", "1",
            "--kfac-opt", "factor_update_freq=2", "--kfac-opt", "inv_update_freq=3", "--kfac-opt", "rank=8"]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    assert run([*args, "--epochs", "2", "--checkpoint", str(straight), "--out", str(tmp_path)], capsys)[0] == 0
    assert run([*args, "--epochs", "1", "--checkpoint", str(split), "--out", str(tmp_path)], capsys)[0] == 0
    assert run([*args, "--epochs", "2", "--checkpoint", str(split), "--resume", "--out", str(tmp_path)], capsys)[0] == 0
    a, b = final_params(straight), final_params(split)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_train_resume_errors(tmp_path, capsys):
    code, _, err = run(["train", *TINY, "--resume"], capsys)
    assert code == 2 and "--resume needs --checkpoint" in err
    code, _, err = run(["train", *TINY, "--resume", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and "no checkpoint" in err
    ckpt = tmp_path / "c.pt"
    assert run(["train", *TINY, "--epochs", "1", "--checkpoint", str(ckpt), "--out", str(tmp_path)], capsys)[0] == 0
    code, _, err = run(["train", *TINY, "--epochs", "2", "--lr", "0.5", "--checkpoint", str(ckpt), "--resume",
                        "--out", str(tmp_path)], capsys)
    assert code == 2 and "different settings" in err and "lr" in err


# ------------------------------------------------------------------ spectrum
def test_spectrum_records_factors_and_respects_the_bound(tmp_path, capsys):
    code, out, _ = run(["spectrum", "--task", "digits-autoencoder", "--max-train", "256", "--batch-size", "16",
                        "--widths", "0.25,0.5", "--epochs", "1", "--out", str(tmp_path)], capsys)
    assert code == 0 and "width" in out
    payload = json.loads((tmp_path / "spectrum.json").read_text())
    assert [(s["width"], s["factor"]) for s in payload["spectra"]] == [(0.25, "A"), (0.25, "G"), (0.5, "A"), (0.5, "G")]
    dims = {(s["width"], s["factor"]): s["dim"] for s in payload["spectra"]}
    assert dims == {(0.25, "A"): 251, (0.25, "G"): 125, (0.5, "A"): 501, (0.5, "G"): 250}
    for s in payload["spectra"]:
        eig = s["eigenvalues"]
        assert eig == sorted(eig, reverse=True) and eig[-1] >= 0
        assert s["increment_rank"] == 16 and s["steps"] == 256 // 16 == len(s["increments"]["norms"])
        assert eig[0] <= s["increment_norm"] * (1 + 1e-9)  # an EA of increments of norm <= K
        # the EA decay theorems hold on real factors (when onlinela provides them)
        for field in ("bound", "stream_bound"):
            if field in s:
                assert all(e <= b * (1 + 1e-9) + 1e-12 for e, b in zip(eig, s[field])), field
        assert s["modes_above"]["0.01"]["measured"] <= s["modes_above"]["0.01"].get("stream_bound", s["dim"])
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--task", "imagenet"], "invalid choice: 'imagenet'"),
        (["compare", "--epochs", "-3"], "expected a positive integer, got -3"),
        (["compare", "--seeds", "a,b"], "expected a non-negative integer"),
        (["compare", "--lr-grid", "0.1,-1"], "expected a positive number"),
        (["compare", "--kfac-opt", "damping"], "expected KEY=VALUE"),
        (["train", "--width", "0"], "expected a positive number"),
        (["compare", "--momentum", "nan"], "expected a finite number"),
        (["compare", "--kfac-momentum", "1.5"], "expected a momentum in [0, 1)"),
        (["train", "--weight-decay", "-1"], "expected a non-negative number"),
        (["spectrum", "--decay", "1.5"], "expected a number in (0, 1)"),
        (["compare", "--targets", "90,inf"], "expected a finite number"),
    ],
)
def test_bad_arguments_fail_in_the_parser(args, message, capsys):
    code, _, err = run(args, capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", *TINY, "--optimizers", "sgd,lbfgs"], "unknown optimizer(s) lbfgs"),
        (["train", *TINY, "--optimizer", "nope"], "available: sgd, adam"),
        (["compare", "--task", "mnist-mlp", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist does not exist"),
        (["compare", "--task", "cifar10-vgg16"], "needs --data-dir"),
        (["train", *TINY, "--device", "cuda:7" if not torch.cuda.is_available() else "bogus"], "--device"),
    ],
)
def test_bad_arguments_give_a_clear_message(args, message, capsys):
    code, out, err = run(args, capsys)
    assert code == 2 and message in err and out == ""


def test_unreadable_data_files_name_what_was_expected(tmp_path, capsys):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"junk")
    code, _, err = run(["compare", "--task", "mnist-mlp", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "train-labels-idx1-ubyte" in err


def test_kfac_option_unknown_to_the_preconditioner(tmp_path, capsys):
    if "kfac" not in ex.available_optimizers():
        pytest.skip("the K-FAC family is not importable in this installation")
    code, _, err = run(["train", *TINY, "--optimizer", "kfac", "--kfac-opt", "no_such_option=1",
                        "--out", str(tmp_path)], capsys)
    assert code == 2 and "no_such_option" in err


# -------------------------------------------------------------- the library
def test_phase_seconds_reads_the_preconditioner_stats():
    layers = {
        "fc1": {"A": {"rank": 8}, "seconds": {"statistics": 1.0, "decomposition": 2.0, "preconditioning": 0.5}},
        "fc2": {"A": {"rank": 4}, "seconds": {"statistics": 0.25, "decomposition": 1.0}},
    }
    assert ex.phase_seconds({"layers": layers}) == {"statistics": 1.25, "decomposition": 3.0, "preconditioning": 0.5}
    totals = {"statistics": 2.0, "decomposition": 4.0, "preconditioning": 1.0}
    assert ex.phase_seconds({"seconds": totals, "layers": layers}) == totals  # run totals win, no double count
    assert ex.phase_seconds(None) == dict.fromkeys(totals, 0.0)


def test_registry_and_build_errors():
    specs = ex.available_optimizers()
    assert list(specs)[:2] == ["sgd", "adam"]
    with pytest.raises(KeyError, match="unknown optimizer"):
        ex.build_stepper("nope", torch.nn.Linear(2, 2), lr=0.1)


def test_adamw_is_a_baseline_with_its_own_weight_decay_default():
    specs = ex.available_optimizers()
    assert list(specs)[:3] == ["sgd", "adam", "adamw"] and specs["adamw"].family == "baseline"
    model = torch.nn.Linear(3, 2)
    opt = ex.build_stepper("adamw", model, lr=0.01).optimizer
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.01 == specs["adamw"].weight_decay
    assert ex.build_stepper("adamw", model, lr=0.01, weight_decay=0.0).optimizer.param_groups[0]["weight_decay"] == 0
    for name in ("sgd", "adam"):  # the other baselines keep no weight decay by default
        assert ex.build_stepper(name, model, lr=0.01).optimizer.param_groups[0]["weight_decay"] == 0


def test_weight_decay_option_reaches_adamw(tmp_path, capsys):
    base = ["compare", *TINY, "--max-train", "64", "--epochs", "1", "--optimizers", "adamw", "--lr", "0.01"]
    for extra, expected in (([], 0.01), (["--weight-decay", "0.2"], 0.2)):
        code, out, _ = run([*base, *extra, "--out", str(tmp_path)], capsys)
        assert code == 0 and "adamw" in out
        run_ = json.loads((tmp_path / "compare.json").read_text())["results"]["adamw"]["runs"][0]
        assert run_["hyperparameters"]["weight_decay"] == expected


def test_quiet_and_verbose_anywhere():
    from onlinela_torch.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-q", "compare"]).quiet and parser.parse_args(["compare", "--quiet"]).quiet
    assert not parser.parse_args(["compare"]).quiet
    assert parser.parse_args(["train", "-v"]).verbose


def test_console_entry_point():
    res = subprocess.run([sys.executable, "-m", "onlinela_torch", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0
    for cmd in ("compare", "train", "spectrum", "demo"):
        assert cmd in res.stdout
    assert "onlinela_torch.data" in res.stdout  # the :mod: role's text survives, the markup does not
    _assert_no_markup(res.stdout)


RST_MARKUP = re.compile(r"``|:[a-z]+:`|`[^`]+`_?")


def _assert_no_markup(text):
    found = RST_MARKUP.findall(text)
    assert not found, found


def test_help_of_every_subcommand_is_plain_text():
    from onlinela_torch.cli import build_parser

    parser = build_parser()
    _assert_no_markup(parser.format_help())
    subparsers = next(a for a in parser._actions if a.choices and "compare" in a.choices)
    assert set(subparsers.choices) == {"compare", "demo", "train", "spectrum"}
    for name, sub in subparsers.choices.items():
        _assert_no_markup(sub.format_help())


@pytest.mark.parametrize(
    "args",
    [["compare", "--epoch", "2"], ["demo", "--optim", "sgd"], ["train", "--epoch", "2"], ["train", "--check", "x.pt"],
     ["spectrum", "--lay", "0"], ["--qui", "compare"]],
)
def test_option_prefixes_are_not_accepted(args, capsys):
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert "unrecognized arguments" in err or "invalid choice" in err or "required" in err, err


# ------------------------------------------------------- --kfac-opt and failures
def one_line_error(code, out, err, status=2):
    assert code == status, (code, err)
    assert out == "" and "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training starts (checks that an error comes up front)."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were validated")

    monkeypatch.setattr(ex, "train", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--optimizers", "kfac", "--kfac-opt", "rank=abc"], "kfac: `rank` must be a positive int"),
        (["compare", "--optimizers", "sgd,kfac", "--kfac-opt", "damping=-1"], "damping"),
        (["train", "--optimizer", "kfac", "--kfac-opt", "rank=abc"], "kfac: `rank` must be a positive int"),
        (["compare", "--optimizers", "rs-kfac", "--kfac-opt", "method=kfac"],
         "method='kfac' contradicts the requested optimizer(s) rs-kfac"),
        (["compare", "--optimizers", "kfac,kld-wrm-q", "--kfac-opt", "method=kfac"], "requested optimizer(s) kld-wrm-q"),
        (["train", "--optimizer", "b-kfac", "--kfac-opt", "method=rs-kfac"], "contradicts"),
        (["compare", "--optimizers", "kfac", "--kfac-opt", "lr=0.3"], "set it with --lr"),
        (["compare", "--optimizers", "sgd,adam", "--kfac-opt", "damping=0.1"], "none of sgd, adam is one"),
        (["spectrum", "--kfac-opt", "damping=0.1"], "none of sgd is one"),
    ],
)
def test_bad_kfac_options_fail_before_any_training(tmp_path, capsys, no_training, args, message):
    needed = {"kfac", "rs-kfac", "b-kfac", "kld-wrm-q"} & set(" ".join(args).replace(",", " ").split())
    if not needed <= set(ex.available_optimizers()):
        pytest.skip(f"{needed} not importable in this installation")
    out_dir = tmp_path / "out"
    code, out, err = run([args[0], *TINY, *args[1:], "--out", str(out_dir)], capsys)
    assert message in one_line_error(code, out, err)
    assert not out_dir.exists()  # nothing written, no empty PNG


def test_a_consistent_method_option_is_accepted(tmp_path, capsys):
    if "rs-kfac" not in ex.available_optimizers():
        pytest.skip("rs-kfac is not importable in this installation")
    code, _, err = run(["compare", *TINY, "--max-train", "64", "--epochs", "1", "--optimizers", "rs-kfac", "--lr",
                        "0.01", "--kfac-opt", "method=rs-kfac", "--out", str(tmp_path)], capsys)
    assert code == 0, err


@pytest.fixture
def adam_breaks(monkeypatch):
    """Make every Adam run raise inside training (a broken optimizer that passes validation)."""
    real = ex.train

    def train(task, data, model, stepper, **kwargs):
        if isinstance(stepper.optimizer, torch.optim.Adam):
            raise RuntimeError("adam broke\nat step 3")
        return real(task, data, model, stepper, **kwargs)

    monkeypatch.setattr(ex, "train", train)


def test_a_failed_optimizer_stops_compare_with_exit_1(tmp_path, capsys, adam_breaks):
    code, out, err = run(["compare", *TINY, "--max-train", "64", "--epochs", "1", "--optimizers", "adam,sgd",
                          "--lr", "0.01", "--out", str(tmp_path)], capsys)
    err = one_line_error(code, out, err, status=1)
    assert "adam failed: RuntimeError: adam broke at step 3" in err and "--keep-going" in err
    assert not (tmp_path / "compare.png").exists()


def test_keep_going_leaves_the_failed_optimizer_out(tmp_path, capsys, adam_breaks):
    code, out, _ = run(["compare", *TINY, "--max-train", "64", "--epochs", "1", "--optimizers", "adam,sgd",
                        "--lr", "0.01", "--keep-going", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "adam: failed, left out (RuntimeError: adam broke at step 3)" in out
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["results"]) == {"sgd"} and set(payload["failed"]) == {"adam"}
    # when every requested optimizer fails there is nothing to compare: exit 1, no figure
    code, out, err = run(["compare", *TINY, "--max-train", "64", "--epochs", "1", "--optimizers", "adam",
                          "--lr", "0.01", "--keep-going", "--out", str(tmp_path / "all")], capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    warning, error = err.splitlines()  # the --keep-going warning, then the error
    assert "adam failed and is left out" in warning and "every requested optimizer failed: adam" in error
    assert not (tmp_path / "all" / "compare.png").exists()


def _pixels_dataset(n=48, side=8, seed=0):
    from onlinela_torch.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=g)
    y = torch.zeros(n, dtype=torch.int64)
    return Dataset("synthetic", "generated", x, y, x[:8], y[:8])


def test_training_loop_feeds_the_sampled_bernoulli_fisher_to_the_autoencoder():
    task = ex.TASKS["mnist-autoencoder"]
    assert task.likelihood == "bernoulli" and task.kfac["fisher"] == "true" and task.kfac_momentum == 0.9
    assert ex.TASKS["mnist-mlp"].likelihood == "categorical"
    data = _pixels_dataset()
    torch.manual_seed(0)
    model = task.build_model(data)
    stepper = ex.build_stepper("kfac", model, lr=0.1, task=task, kfac_options={"factor_update_freq": 1})
    assert stepper.optimizer.param_groups[0]["momentum"] == 0.9  # the task's default
    ex.train(task, data, model, stepper, epochs=1, batch_size=16, seed=0)
    pre = stepper.optimizer.preconditioner
    stats = pre.stats()
    assert stats["step"] == 3
    for name, layer in stats["layers"].items():
        assert layer["counters"]["missing_fisher"] == 0, name
    assert float(pre.layers["decoder.6"].G.dense().diagonal().min()) > 0  # sampled p - y rows reached G

    # without the training loop's before_backward hook, the sampled-Fisher statistics go missing
    torch.manual_seed(0)
    model = task.build_model(data)
    stepper = ex.build_stepper("kfac", model, lr=0.1, task=task, kfac_options={"factor_update_freq": 1})
    x = data.x_train[:16]
    task.loss(model(x), x, None).backward()
    stepper.step()
    counters = stepper.optimizer.preconditioner.stats()["layers"]["decoder.6"]["counters"]
    assert counters["missing_fisher"] == 1


def test_compare_records_the_task_defaults(tmp_path, capsys):
    code, _, _ = run(["compare", "--task", "digits-autoencoder", "--max-train", "64", "--batch-size", "32",
                      "--epochs", "1", "--optimizers", "sgd", "--lr", "0.1", "--out", str(tmp_path)], capsys)
    assert code == 0
    config = json.loads((tmp_path / "compare.json").read_text())["config"]
    assert config["kfac_momentum"] == ex.TASKS["digits-autoencoder"].kfac_momentum
    code, _, _ = run(["compare", "--task", "digits-autoencoder", "--max-train", "64", "--batch-size", "32",
                      "--epochs", "1", "--optimizers", "sgd", "--lr", "0.1", "--kfac-momentum", "0.5",
                      "--out", str(tmp_path)], capsys)
    assert json.loads((tmp_path / "compare.json").read_text())["config"]["kfac_momentum"] == 0.5


def test_resume_compares_the_resolved_weight_decay(tmp_path, capsys):
    args = ["train", *TINY, "--max-train", "64", "--optimizer", "adamw", "--lr", "0.01"]
    ckpt = tmp_path / "c.pt"
    assert run([*args, "--epochs", "1", "--checkpoint", str(ckpt), "--out", str(tmp_path)], capsys)[0] == 0
    assert torch.load(ckpt, weights_only=True)["config"]["weight_decay"] == 0.01  # adamw's default, spelled out
    code, _, err = run([*args, "--epochs", "2", "--weight-decay", "0.01", "--checkpoint", str(ckpt), "--resume",
                        "--out", str(tmp_path)], capsys)
    assert code == 0, err  # the same decay, given explicitly
    code, _, err = run([*args, "--epochs", "3", "--weight-decay", "0", "--checkpoint", str(ckpt), "--resume",
                        "--out", str(tmp_path)], capsys)
    assert code == 2 and "weight_decay=0.01 (now 0.0)" in err


# ------------------------------------------------ step ratios and Brand factors
def test_factor_report_reads_layers_and_nested_blocks():
    summary = lambda kind, dim, rank: {"kind": kind, "dim": dim, "rank": rank, "error": 0.1, "skipped": {}}  # noqa: E731
    stats = {
        "layers": {"fc1": {"A": summary("brand", 785, 64), "G": summary("randomized", 30, 30), "seconds": {}},
                   "fc2": {"A": None, "G": None, "seconds": {}}},  # no batch seen yet: no factors
        "blocks": {"attn": {"kind": "attention", "dims": [8], "factors": {"in_proj": {"A": summary("dense", 9, 9),
                                                                                      "G": summary("dense", 24, 24)}}},
                   "emb": {"kind": "embedding", "factors": {"A": {"kind": "diagonal", "dim": 50}}}},
    }
    report = ex.factor_report(stats)
    assert list(report) == ["fc1/A", "fc1/G", "attn/in_proj/A", "attn/in_proj/G", "emb/A"]
    assert report["fc1/A"] == {"kind": "brand", "dim": 785, "rank": 64}
    assert report["emb/A"] == {"kind": "diagonal", "dim": 50, "rank": None}
    assert ex.factor_report(None) == {}


def test_brand_showcase_task_runs_brand_updates_and_reports_step_ratios(tmp_path, capsys):
    """The showcase task at tiny sizes: b-kfac Brand-updates some factors, the JSON and table say which."""
    if "b-kfac" not in ex.available_optimizers():
        pytest.skip("the K-FAC family is not importable in this installation")
    batch = 16
    code, out, _ = run(["compare", "--task", "mnist-autoencoder-brand", "--max-train", "32", "--batch-size",
                        str(batch), "--epochs", "1", "--optimizers", "sgd,rs-kfac,b-kfac", "--out", str(tmp_path)],
                       capsys)
    assert code == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["config"]["step_clock"] == "cpu"
    res = payload["results"]
    task = ex.TASKS["mnist-autoencoder-brand"]
    for name, r in res.items():  # the task's preset learning rates, no probe
        assert r["lr_source"] == "task" and r["lr"] == task.lrs[name] and r["probe"] == {}, name
    rank = task.kfac["rank"]
    factors = res["b-kfac"]["runs"][0]["factors"]
    assert len(factors) == res["b-kfac"]["n_factors"] == 16  # 8 Linear layers, A and G each
    brand, fallback = res["b-kfac"]["brand_factors"], res["b-kfac"]["fallback_factors"]
    assert brand and set(brand).isdisjoint(fallback) and set(brand) | set(fallback) == set(factors)
    for name in brand:  # b-kfac decomposes only through Brand updates: a rank means they ran
        assert factors[name]["kind"] == "brand" and factors[name]["rank"] > 0, name
    for name, f in factors.items():  # where rank + rows >= d no Brand update is possible
        if rank + batch >= f["dim"]:
            assert name in fallback and f["kind"] == "randomized", name
    assert res["rs-kfac"]["brand_factors"] == res["rs-kfac"]["fallback_factors"] == []
    assert res["sgd"]["n_factors"] == 0
    assert res["sgd"]["step_vs_sgd"] == 1.0  # its own reference
    for name, r in res.items():
        assert r["step_vs_sgd"] > 0 and math.isfinite(r["step_vs_sgd"]), name
        assert r["step_cpu_seconds"] > 0 and r["step_seconds"] > 0, name
        cpu = [h["cpu_seconds"] for h in r["runs"][0]["history"]]
        assert cpu[0] == 0 and cpu == sorted(cpu) and cpu[-1] > 0, name
        assert r["runs"][0]["cpu_time_to_target"].keys() == r["runs"][0]["time_to_target"].keys()
    head = out.splitlines()[0].split()
    assert "step/SGD" in head and head[-1] == "Brand"
    b_row = next(line for line in out.splitlines() if line.startswith("b-kfac "))
    assert b_row.split()[-1] == f"{len(brand)}/16"
    assert f"b-kfac: Brand updates on {brand[0]}" in out and "RS-KFAC fallback on" in out


def test_no_step_ratio_without_sgd_and_a_brand_method_without_eligible_factors(tmp_path, capsys):
    if "b-kfac" not in ex.available_optimizers():
        pytest.skip("the K-FAC family is not importable in this installation")
    # digits-mlp at width 0.25 has factors of at most 129 rows: rank 100 + 32 batch rows leaves none eligible
    code, out, _ = run(["compare", *TINY, "--epochs", "1", "--optimizers", "adam,b-kfac", "--lr", "0.01",
                        "--kfac-opt", "rank=100", "--out", str(tmp_path)], capsys)
    assert code == 0
    res = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert res["adam"]["step_vs_sgd"] is None and res["b-kfac"]["step_vs_sgd"] is None
    assert res["b-kfac"]["brand_factors"] == [] and len(res["b-kfac"]["fallback_factors"]) == res["b-kfac"]["n_factors"]
    assert "needs sgd among --optimizers" in out
    assert "b-kfac: no factor is Brand-eligible: every factor ran as RS-KFAC" in out


def test_a_showcase_task_names_its_optimizers_and_the_grid_overrides_its_learning_rates(tmp_path, capsys):
    from onlinela_torch.cli import _optimizer_names

    task = ex.TASKS["mnist-autoencoder-brand"]
    specs = ex.available_optimizers()
    assert _optimizer_names(None, task) == [n for n in task.optimizers if n in specs]
    assert _optimizer_names(["all"], task) == [n for n, s in specs.items() if not s.classification_only]
    code, _, _ = run(["compare", "--task", task.name, "--max-train", "32", "--batch-size", "16", "--epochs", "1",
                      "--optimizers", "sgd", "--lr-grid", "0.1,0.01", "--probe-epochs", "0.5",
                      "--out", str(tmp_path)], capsys)
    assert code == 0
    sgd = json.loads((tmp_path / "compare.json").read_text())["results"]["sgd"]
    assert sgd["lr_source"] == "probe" and set(sgd["probe"]) == {"0.1", "0.01"}

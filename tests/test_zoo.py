"""A fast slice of the task zoo (benchmarks/zoo.py): JSON structure, scoring and divergence detection.

No timing is asserted: budgets are tiny CPU-time slices and only the structure,
the bookkeeping and the divergence rules are checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

ZOO_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo", ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast_json(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "zoo_fast.json"
    assert zoo.main(["--fast", "--budget", "0.15", "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_fast_slice_json_structure(zoo, fast_json):
    doc, out = fast_json
    assert out.with_suffix(".png").stat().st_size > 0
    assert "process_time" in doc["environment"]["clock"] and doc["environment"]["torch_threads"] == 1
    assert doc["environment"]["git"]
    runs = doc["runs"]
    # --fast: 2 tasks x 2 methods (sgd, kfac) x 2 lrs x 1 seed
    assert {(r["task"], r["method"], r["lr"]) for r in runs} == {
        (t, m, lr) for t in ("reg-s1", "digits-mlp-sum") for m in ("sgd", "kfac") for lr in (0.01, 0.1)
    }
    for r in runs:
        curve = r["curve"]
        assert curve[0]["fraction"] == 0.0 and curve[0]["steps"] == 0
        assert 2 <= len(curve) <= zoo.CHECKPOINTS + 1
        if not r["stopped_early"]:
            assert len(curve) == zoo.CHECKPOINTS + 1 and curve[-1]["fraction"] == 1.0
            assert curve[-1]["used"] >= 0.15  # the budget is consumed before the last checkpoint
            assert r["score"] == curve[-1]["test_loss"]
        steps = [c["steps"] for c in curve]
        assert steps == sorted(steps) and r["steps"] == steps[-1] > 0
        assert r["seconds_per_step"] > 0 and isinstance(r["diverged"], bool)
        acc = r["final_test_acc"]
        assert (acc is not None) == (r["task"] == "digits-mlp-sum")
    per_method = doc["summary"]["per_method"]
    assert set(per_method) == {"sgd", "kfac"}
    assert per_method["sgd"]["meets_bar"] is None and isinstance(per_method["kfac"]["meets_bar"], bool)
    for task in ("reg-s1", "digits-mlp-sum"):
        kfac = doc["summary"]["per_task"][task]["methods"]["kfac"]
        assert set(kfac["lrs"]) == {"0.01", "0.1"}
        assert kfac["step_time_vs_sgd"] > 0


def _run(task, method, lr, score, diverged, initial=1.0, sps=0.01):
    return dict(task=task, method=method, lr=lr, seed=0, score=score, diverged=diverged,
                seconds_per_step=sps, final_test_acc=None, initial_loss=initial)  # fmt: skip


def test_summary_scores_ratios_and_failures(zoo):
    runs = [
        _run("a", "sgd", 0.01, 0.5, False), _run("a", "sgd", 0.1, 0.4, False),
        _run("a", "adam", 0.01, 0.8, False), _run("a", "adam", 0.1, math.inf, True),
        _run("a", "kfac", 0.01, 0.2, False, sps=0.03), _run("a", "kfac", 0.1, 0.1, True, sps=0.03),
        _run("a", "rs-kfac", 0.01, 2.0, True), _run("a", "rs-kfac", 0.1, math.inf, True),
        _run("b", "sgd", 0.01, 1.0, False), _run("b", "adam", 0.01, 2.0, False),
        _run("b", "kfac", 0.01, 1.4, False, sps=0.02), _run("b", "rs-kfac", 0.01, 0.9, False),
    ]  # fmt: skip
    s = zoo.summarize(runs)
    a = s["per_task"]["a"]
    assert a["first_order_best"] == 0.4  # min over lrs of SGD (0.4) and Adam (0.8; its inf run diverged)
    # a diverged run never wins the lr choice, even with the lowest score
    assert a["methods"]["kfac"]["best_lr"] == 0.01 and a["methods"]["kfac"]["ratio"] == pytest.approx(0.5)
    assert a["methods"]["kfac"]["beats_first_order"] and a["methods"]["kfac"]["step_time_vs_sgd"] == pytest.approx(3)
    assert a["methods"]["rs-kfac"]["failed"] and a["methods"]["rs-kfac"]["ratio"] is None
    assert not a["methods"]["rs-kfac"]["beats_first_order"]
    b = s["per_task"]["b"]["methods"]
    assert b["kfac"]["ratio"] == pytest.approx(1.4) and not b["kfac"]["beats_first_order"]
    assert b["rs-kfac"]["beats_first_order"]
    kfac, rs = s["per_method"]["kfac"], s["per_method"]["rs-kfac"]
    assert (kfac["wins"], kfac["failed"], kfac["worst_task"]) == (1, 0, "b")
    assert kfac["worst_ratio"] == pytest.approx(1.4) and kfac["meets_bar"]  # one loss allowed, within 1.5x
    assert (rs["wins"], rs["failed"], rs["worst_ratio"]) == (1, 1, None) and not rs["meets_bar"]
    # at equal steps (KLD-WRM) the bar allows no loss
    assert not zoo.summarize(runs, "steps")["per_method"]["kfac"]["meets_bar"]


def test_divergence_detection(zoo):
    blow = zoo.run_one(zoo.RunSpec("reg-s1", "sgd", 50.0, 0, 0.2))
    assert blow["diverged"] and blow["stopped_early"] and not math.isfinite(blow["score"])
    assert blow["error"] is None
    fine = zoo.run_one(zoo.RunSpec("reg-s1", "adam", 0.01, 0, 0.2))
    assert not fine["diverged"] and fine["score"] < fine["initial_loss"]
    assert fine["score"] == fine["curve"][-1]["test_loss"]
    # a library failure is recorded as a diverged run with its error, not raised
    bad = zoo.run_one(zoo.RunSpec("reg-s1", "kfac", 0.01, 0, 0.2, kw=(("damping", -1.0),)))
    assert bad["diverged"] and bad["error"] and "damping" in bad["error"]


def test_summed_loss_is_reported_per_sample(zoo):
    task = zoo.task_by_name("reg-s100-sum")
    torch.manual_seed(0)
    out, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    total = zoo.loss_fn(task, out, y)
    # float64 sums of 40 terms: agreement to a few ulps of the total
    assert float(total) == pytest.approx(float(((out - y) ** 2).sum()), rel=1e-12)
    model = torch.nn.Identity()
    loss, acc = zoo.evaluate(task, model, out, y)
    assert acc is None and loss == pytest.approx(float(total) / 8, rel=1e-12)


def test_unknown_names_are_rejected(zoo):
    with pytest.raises(ValueError, match="--tasks"):
        zoo.task_by_name("nope")
    with pytest.raises(SystemExit, match="--methods"):
        zoo.specs(zoo.parser().parse_args(["--methods", "sgd,nope"]))
    with pytest.raises(SystemExit, match="--kw"):
        zoo.specs(zoo.parser().parse_args(["--kw", "damping"]))


def test_steps_mode_runs_named_tasks_and_defaults_to_classification(zoo):
    default = {spec.task for spec in zoo.specs(zoo.parser().parse_args(["--mode", "steps", "--methods", "sgd"]))}
    kinds = {zoo.task_by_name(t).kind for t in default}
    assert kinds == {"classification"} and len(default) == sum(t.kind == "classification" for t in zoo.TASKS)
    named = zoo.specs(zoo.parser().parse_args(["--mode", "steps", "--tasks", "reg-s10", "--methods", "sgd", "--budget", "7"]))
    assert {s.task for s in named} == {"reg-s10"} and {s.mode for s in named} == {"steps"}
    assert {s.budget for s in named} == {7}


def test_peers_muon_gets_only_hidden_matrices(zoo):
    spec = importlib.util.spec_from_file_location("peers", ZOO_PATH.with_name("peers.py"))
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    model = zoo.cnn_maxpool("relu")
    opt = peers.muon(model, 0.01)
    muon, adam = opt.opts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.Adam)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # the hidden FC weight only: convolutions, biases and the output layer stay with Adam
    assert in_muon == {id(linears[0].weight)}
    in_adam = {id(p) for g in adam.param_groups for p in g["params"]}
    assert in_adam | in_muon == {id(p) for p in model.parameters()} and not in_adam & in_muon


def test_report_merges_runs_later_file_wins(zoo, fast_json, tmp_path, capsys):
    doc, out = fast_json
    later = json.loads(out.read_text())
    # the later file re-runs kfac at lr 0.01 on reg-s1 with a score below every other run of that task
    rerun = next(r for r in later["runs"] if (r["task"], r["method"], r["lr"]) == ("reg-s1", "kfac", 0.01))
    rerun.update(score=1e-9, diverged=False)
    later["runs"] = [rerun]
    second = tmp_path / "later.json"
    second.write_text(json.dumps(later))
    merged = tmp_path / "merged.json"
    args = zoo.parser().parse_args(["--report", str(out), str(second), "--methods", "sgd,kfac", "--out", str(merged)])
    assert zoo.report(args) == 0
    m = json.loads(merged.read_text())
    assert len(m["runs"]) == len(doc["runs"])  # replaced, not appended
    cell = m["summary"]["per_task"]["reg-s1"]["methods"]["kfac"]
    assert cell["best_lr"] == 0.01 and cell["score"] == 1e-9 and cell["beats_first_order"] is False  # no adam run
    assert "beats SGD and Adam" in capsys.readouterr().out


def test_merge_runs_keeps_seeds_and_later_file_wins(zoo, tmp_path):
    def run(seed, lr, score):
        return {"task": "mnist-cnn", "method": "adam", "lr": lr, "seed": seed, "score": score, "diverged": score is None}

    first = tmp_path / "seed0.json"
    second = tmp_path / "seed1.json"
    first.write_text(json.dumps({"runs": [run(0, 0.01, 1.0), run(0, 0.1, None)]}))
    # seed 1 adds two runs and re-runs (seed 0, lr 0.01): that later record replaces the earlier one
    second.write_text(json.dumps({"runs": [run(1, 0.01, 3.0), run(1, 0.1, 2.0), run(0, 0.01, 5.0)]}))
    runs = zoo.merge_runs([json.loads(f.read_text()) for f in (first, second)])  # what peers.py --report reads
    by = {(r["seed"], r["lr"]): r["score"] for r in runs}
    assert by == {(0, 0.01): 5.0, (0, 0.1): math.inf, (1, 0.01): 3.0, (1, 0.1): 2.0}  # null read back as inf

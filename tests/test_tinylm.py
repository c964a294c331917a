"""The ``tiny-lm`` task: a character-level causal transformer on CPython's pydoc topics, tiny budgets."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest

torch = pytest.importorskip("torch")

from onlinela_torch import experiment as ex  # noqa: E402
from onlinela_torch.cli import main  # noqa: E402
from onlinela_torch.data import TextCorpus, load_pydoc_text  # noqa: E402
from torch.nn import functional as F  # noqa: E402

TASK = ex.TASKS["tiny-lm"]
# d_model 64 * 0.25 = 16 with 4 heads, batches of 4 windows: an epoch (25 steps) takes well under a second
SMALL = ["--task", "tiny-lm", "--width", "0.25", "--batch-size", "4"]


def run(args, capsys):
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus():
    return load_pydoc_text()


def small_task(**text):
    spec = dataclasses.replace(TASK.text, context=16, d_model=8, n_layers=1, n_heads=2, steps_per_epoch=3,
                               val_windows=10, **text)
    return dataclasses.replace(TASK, text=spec)


def test_the_task_is_next_token_prediction_with_library_defaults():
    assert TASK.is_text and not TASK.is_classifier and not TASK.is_autoencoder
    assert TASK.metric_name == "val_loss" and not TASK.higher_is_better and TASK.likelihood == "categorical"
    assert dict(TASK.kfac) == {} and TASK.kfac_momentum is None  # the K-FAC family runs on the library's defaults
    assert list(TASK.targets) == sorted(TASK.targets, reverse=True)  # successively lower validation losses
    spec = TASK.text
    assert (spec.context, spec.d_model, spec.n_layers) == (64, 64, 2) and TASK.batch_size == 32
    assert TASK.epochs * spec.steps_per_epoch <= 500  # the default budget stays short


def test_batches_are_seeded_next_character_windows(corpus):
    task = small_task()
    one = list(task.batches(corpus, 2, 5, seed=7))
    assert len(one) == task.text.steps_per_epoch == task.steps_per_epoch(corpus, 5)
    for x, y in one:
        assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
    again = list(task.batches(corpus, 2, 5, seed=7))
    for (x1, _), (x2, _) in zip(one, again):
        assert torch.equal(x1, x2)  # a function of (seed, epoch): resuming repeats it
    other = next(iter(task.batches(corpus, 3, 5, seed=7)))[0]
    assert not torch.equal(other, one[0][0])


def test_loss_and_validation_metric_are_next_token_cross_entropy(corpus):
    task = small_task()
    torch.manual_seed(0)
    model = task.build_model(corpus)
    assert model.tok.num_embeddings == corpus.vocab_size and model.context == 16
    x, y = next(iter(task.batches(corpus, 1, 3, seed=0)))
    with torch.no_grad():
        out = model(x)
    assert task.fisher_outputs(out).shape == (3 * 16, corpus.vocab_size)  # one row per averaged term of the loss
    by_hand = -torch.log_softmax(out, -1).gather(-1, y[..., None]).mean()
    assert float(task.loss(out, x, y)) == pytest.approx(float(by_hand), rel=1e-5)  # float32 means of 48 terms
    model.train()
    metric = task.evaluate(model, corpus, batch_size=3)  # several forward passes, a partial last one
    assert model.training  # mode restored
    xv, yv = corpus.windows("val", 16, max_windows=10)
    model.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(model(xv).flatten(0, 1), yv.flatten()))
    assert metric == pytest.approx(expected, rel=1e-5)  # float32 sums of 160 terms, split differently


def test_train_records_validation_loss_per_epoch(corpus):
    task = small_task()
    torch.manual_seed(0)
    model = task.build_model(corpus)
    stepper = ex.build_stepper("adamw", model, lr=0.01, task=task)
    res = ex.train(task, corpus, model, stepper, epochs=3, batch_size=4, seed=0)
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert not res.diverged and res.history[-1]["metric"] < res.history[0]["metric"]
    assert stepper.optimizer.state[model.head.weight]["step"] == 9  # 3 epochs of 3 steps
    assert res.hyperparameters["weight_decay"] == 0.01


def test_compare_tiny_lm_with_adamw_and_kfac_writes_the_validation_loss_history(tmp_path, capsys):
    kfac = next((n for n in ("kfac", "rs-kfac", "b-kfac") if n in ex.available_optimizers()), None)
    names = ["adamw", kfac] if kfac else ["adamw"]
    code, out, err = run(["compare", *SMALL, "--epochs", "2", "--optimizers", ",".join(names), "--lr", "0.01",
                          "--targets", "4.2,0.1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "val_loss" in out and "never" in out and "25 training steps between two evaluations" in out
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["task"] == "tiny-lm" and payload["metric"] == "val_loss" and payload["higher_is_better"] is False
    assert payload["data"]["vocab_size"] == 97 and payload["data"]["context"] == 64
    assert payload["data"]["steps_per_epoch"] == 25 and payload["config"]["kfac_options"] == {}
    initial = {}
    for name in names:
        run_ = payload["results"][name]["runs"][0]
        hist = run_["history"]
        assert [h["epoch"] for h in hist] == [0, 1, 2]
        losses = [h["metric"] for h in hist]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (name, losses)
        initial[name] = losses[0]
        assert run_["time_to_target"]["0.1"] is None  # far below what 50 steps reach
    assert len(set(initial.values())) == 1  # same seed, same initial model
    assert payload["results"]["adamw"]["runs"][0]["hyperparameters"]["weight_decay"] == 0.01
    if kfac:
        cls = type(ex.build_stepper(kfac, torch.nn.Linear(2, 2), lr=0.1).optimizer)
        default = inspect.signature(cls.__init__).parameters["momentum"].default
        assert payload["results"][kfac]["runs"][0]["hyperparameters"]["momentum"] == default  # the class's own
        factors = payload["results"][kfac]["runs"][0]["factors"]  # the curvature blocks' factors are reported too
        assert factors["head/G"]["dim"] == 97 and factors["tok/A"]["kind"] == "diagonal"
        assert any(name.startswith("layers.0.self_attn/") for name in factors), sorted(factors)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_train_tiny_lm_resumes_exactly(tmp_path, capsys):
    args = ["train", *SMALL, "--optimizer", "adamw", "--lr", "0.01", "--seed", "2"]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    assert run([*args, "--epochs", "2", "--checkpoint", str(straight), "--out", str(tmp_path)], capsys)[0] == 0
    assert run([*args, "--epochs", "1", "--checkpoint", str(split), "--out", str(tmp_path)], capsys)[0] == 0
    code, out, _ = run([*args, "--epochs", "2", "--checkpoint", str(split), "--resume", "--out", str(tmp_path)],
                       capsys)
    assert code == 0 and "val_loss" in out
    a = torch.load(straight, weights_only=True)["model"]
    b = torch.load(split, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:  # window offsets and RNG states are replayed exactly
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "kld-wrm-q"], "is a language model"),
        (["--max-train", "10"], "--max-train: `max_train` must be at least context + 2 = 66"),
    ],
)
def test_tiny_lm_refuses_what_does_not_fit(args, message, capsys, tmp_path):
    if "kld-wrm-q" in args and "kld-wrm-q" not in ex.available_optimizers():
        pytest.skip("KLD-WRM is not importable in this installation")
    code, out, err = run(["compare", *SMALL, *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and out == "" and message in err, err
    assert not (tmp_path / "out").exists()


def test_max_train_keeps_the_start_of_the_training_text(corpus):
    data = ex.load_task_data(TASK, max_train=1000)
    assert isinstance(data, TextCorpus) and ex.data_device(data) == torch.device("cpu")
    assert torch.equal(data.train, corpus.train[:1000]) and torch.equal(data.val, corpus.val)


def test_spectrum_records_a_feed_forward_layer_and_refuses_one_whose_hooks_never_run(tmp_path, capsys):
    args = ["spectrum", *SMALL, "--widths", "0.25", "--epochs", "1"]
    code, _, err = run([*args, "--layer", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    spectra = json.loads((tmp_path / "spectrum.json").read_text())["spectra"]
    # layers.0.linear1 of d_model 16: A over [a, 1] (17), G over the 4 d_model = 64 outputs; rows are tokens
    assert [(s["factor"], s["dim"], s["steps"]) for s in spectra] == [("A", 17, 25), ("G", 64, 25)]
    assert all(s["increment_rank"] == min(4 * 64, s["dim"]) for s in spectra)
    code, out, err = run([*args, "--layer", "0", "--out", str(tmp_path / "out0")], capsys)  # self_attn.out_proj
    assert code == 2 and out == "" and "hooks never ran" in err

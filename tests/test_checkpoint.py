"""Checkpoint integrity: fault injection into the files ``onlinela train --checkpoint`` writes.

Every corruption must be refused before any state is loaded: through the
library as :class:`~onlinela_torch.experiment.CheckpointError`, through the
command as one line on stderr and exit status 2 (no traceback).  The digest
is a SHA-256 of the whole ``torch.save`` payload, so the tests flip bytes
everywhere (the zip headers, the pickled metadata, tensor data, the trailer),
not only where a value would change.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from onlinela_torch import experiment as ex  # noqa: E402
from onlinela_torch.cli import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["train", "--task", "digits-mlp", "--max-train", "96", "--batch-size", "32", "--seed", "1"]


def run(args, capsys):
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *needles):
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    for needle in needles:
        assert needle in err, (needle, err)


def tiny_checkpoint(path, out_features=3):
    """A checkpoint of a 4 -> out_features Linear model trained one SGD step (a few KB)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, out_features)
    stepper = ex.build_stepper("sgd", model, lr=0.1)
    model(torch.randn(8, 4)).square().mean().backward()
    stepper.step()
    history = [{"epoch": 0, "seconds": 0.0, "train_loss": float("nan"), "metric": 10.0},
               {"epoch": 1, "seconds": 0.5, "train_loss": 1.0, "metric": 20.0}]
    ex.save_checkpoint(path, model=model, stepper=stepper, history=history, config={"optimizer": "sgd", "lr": 0.1})
    return model, stepper


@pytest.fixture(scope="module")
def kfac_checkpoint(tmp_path_factory):
    """A 1-epoch rs-kfac checkpoint written by the command (preconditioner state included)."""
    if "rs-kfac" not in ex.available_optimizers():
        pytest.skip("rs-kfac is not importable in this installation")
    path = tmp_path_factory.mktemp("ckpt") / "run.pt"
    args = [*TRAIN, "--optimizer", "rs-kfac", "--kfac-opt", "factor_update_freq=1", "--kfac-opt", "inv_update_freq=2",
            "--kfac-opt", "rank=8", "--epochs", "1", "--checkpoint", str(path), "--out", str(path.parent)]
    assert main(["-q", *args]) == 0
    return path, args


# ---------------------------------------------------------------- the format
def test_a_saved_checkpoint_verifies_and_stays_readable_by_torch_load(tmp_path):
    path = tmp_path / "c.pt"
    model, _ = tiny_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left
    blob = path.read_bytes()
    n = ex.verify_checkpoint(io.BytesIO(blob))
    # the trailer: "\n", the format tag, " sha256=", 64 hex digits, "\n"
    assert len(blob) - n == 1 + len(ex.CHECKPOINT_FORMAT) + 8 + 64 + 1
    assert blob[n:].startswith(b"\n" + ex.CHECKPOINT_FORMAT + b" sha256=")
    assert blob[n + 1 + len(ex.CHECKPOINT_FORMAT) + 8:-1].decode() == hashlib.sha256(blob[:n]).hexdigest()
    plain = torch.load(path, weights_only=True)  # tools that know nothing of the trailer still read it
    torch.testing.assert_close(plain["model"]["weight"], model.weight.detach(), rtol=0, atol=0)
    state = ex.read_checkpoint(path)
    assert state["epoch"] == 1 and state["config"] == {"optimizer": "sgd", "lr": 0.1}


def test_every_single_flipped_byte_is_detected(tmp_path):
    """Exhaustive: each offset of the file, XOR with a random non-zero byte (seeded), must fail the check."""
    path = tmp_path / "c.pt"
    tiny_checkpoint(path)
    blob = path.read_bytes()
    rng = random.Random(0)
    undetected = []
    for offset in range(len(blob)):
        bad = bytearray(blob)
        bad[offset] ^= rng.randrange(1, 256)
        try:
            ex.verify_checkpoint(io.BytesIO(bytes(bad)))
        except ex.CheckpointError:
            continue
        undetected.append(offset)
    assert len(blob) > 1000 and undetected == []


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda b: b"", "is empty"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:-74 - len(ex.CHECKPOINT_FORMAT)], "truncated"),  # exactly the trailer cut off
        (lambda b: random.Random(1).randbytes(4096), "not an onlinela checkpoint"),
        (lambda b: b + b"x", "not an onlinela checkpoint"),
    ],
    ids=["empty", "half", "last-byte", "no-trailer", "garbage", "appended"],
)
def test_damaged_files_raise_one_line_checkpoint_errors(tmp_path, corrupt, needle):
    path = tmp_path / "c.pt"
    tiny_checkpoint(path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ex.CheckpointError, match=needle) as info:
        ex.read_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_digest_valid_file_without_the_entries_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"model": {}}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = tmp_path / "c.pt"
    path.write_bytes(payload + b"\n" + ex.CHECKPOINT_FORMAT + b" sha256=" + digest + b"\n")
    with pytest.raises(ex.CheckpointError, match="lacks stepper, rng, history, epoch, config"):
        ex.read_checkpoint(path)


def test_settings_are_compared_before_any_state_is_loaded(tmp_path):
    path = tmp_path / "c.pt"
    tiny_checkpoint(path, out_features=3)
    torch.manual_seed(1)
    other = torch.nn.Linear(4, 5)  # a state of the wrong shape would fail in load_state_dict
    before = {k: v.clone() for k, v in other.state_dict().items()}
    stepper = ex.build_stepper("adam", other, lr=0.1)
    with pytest.raises(ex.CheckpointError, match=r"different settings: optimizer='sgd' \(now 'adam'\)"):
        ex.load_checkpoint(path, model=other, stepper=stepper, config={"optimizer": "adam", "lr": 0.1})
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key  # untouched
    # with matching settings the shape mismatch is reported, on one line, naming the parameter
    with pytest.raises(ex.CheckpointError, match="does not fit") as info:
        ex.load_checkpoint(path, model=other, stepper=stepper)
    assert "\n" not in str(info.value) and "weight" in str(info.value)


def test_a_stale_temporary_file_is_replaced_by_the_next_save(tmp_path):
    path = tmp_path / "c.pt"
    (tmp_path / "c.pt.tmp").write_bytes(b"half a checkpoint from a killed writer")
    tiny_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert ex.read_checkpoint(path)["epoch"] == 1
    assert ex.discard_partial_checkpoint(path) is False  # nothing left to remove


# ----------------------------------------------------------------- the command
def test_flipped_bytes_anywhere_make_resume_exit_2(kfac_checkpoint, tmp_path, capsys):
    """The first bytes (zip header), the middle, the last bytes (trailer) and random offsets (seeded)."""
    path, args = kfac_checkpoint
    blob = path.read_bytes()
    n = len(blob)
    rng = random.Random(2)
    offsets = sorted({0, 1, 4, 30, n // 4, n // 2, 3 * n // 4, n - 80, n - 40, n - 2, n - 1,
                      *(rng.randrange(n) for _ in range(13))})
    bad_path = tmp_path / "bad.pt"
    resume = [a if a != str(path) else str(bad_path) for a in args]
    resume[resume.index("--epochs") + 1] = "2"
    for offset in offsets:
        bad = bytearray(blob)
        bad[offset] ^= rng.randrange(1, 256)
        bad_path.write_bytes(bytes(bad))
        code, out, err = run([*resume, "--resume"], capsys)
        assert_one_line_error(code, out, err, "--resume", str(bad_path))
        assert bad_path.read_bytes() == bytes(bad), offset  # refused, not overwritten
    bad_path.write_bytes(blob)  # the intact copy resumes
    code, out, _ = run([*resume, "--resume"], capsys)
    assert code == 0 and "epoch 2" in out


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "is empty"), (b"PK\x03\x04" + bytes(600), "not an onlinela checkpoint"),
     (bytes(range(256)) * 8, "not an onlinela checkpoint")],
    ids=["empty", "zip-magic-then-zeros", "garbage"],
)
def test_resume_from_garbage_or_empty_files(tmp_path, capsys, content, needle):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    for resume in (["--resume"], ["--resume", "auto"]):  # auto: refused too, never silently restarted from 0
        code, out, err = run([*TRAIN, "--epochs", "1", "--checkpoint", str(path), *resume], capsys)
        assert_one_line_error(code, out, err, needle)
        assert path.read_bytes() == content


def test_resume_from_a_truncated_file(kfac_checkpoint, tmp_path, capsys):
    path, args = kfac_checkpoint
    blob = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for length in (1, 100, len(blob) // 2, len(blob) - 1):
        cut.write_bytes(blob[:length])
        resume = [a if a != str(path) else str(cut) for a in args]
        code, out, err = run([*resume, "--resume"], capsys)
        assert_one_line_error(code, out, err, "truncated")


@pytest.mark.parametrize(
    ("change", "needle"),
    [(["--optimizer", "b-kfac"], "optimizer='rs-kfac' (now 'b-kfac')"),
     (["--kfac-opt", "damping=0.5"], "kfac_options="),
     (["--seed", "5"], "seed=1 (now 5)")],
    ids=["method", "kfac-option", "seed"],
)
def test_resume_with_different_settings_is_refused_in_one_line(kfac_checkpoint, capsys, change, needle):
    path, args = kfac_checkpoint
    if "b-kfac" not in ex.available_optimizers():
        pytest.skip("b-kfac is not importable in this installation")
    before = path.read_bytes()
    code, out, err = run([*args, *change, "--resume"], capsys)
    assert_one_line_error(code, out, err, "different settings", needle)
    assert path.read_bytes() == before


_WRITER = r"""
import os, sys, time, pathlib
import torch
from onlinela_torch import experiment as ex

path, marker = sys.argv[1], pathlib.Path(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
stepper = ex.build_stepper("sgd", model, lr=0.1)
real_fsync = os.fsync

def stall(fd):  # the temporary file is written; announce it and wait to be killed before the rename
    real_fsync(fd)
    marker.touch()
    time.sleep(120)

os.fsync = stall
history = [{"epoch": 0, "seconds": 0.0, "train_loss": 0.0, "metric": 0.0},
           {"epoch": 2, "seconds": 0.0, "train_loss": 0.0, "metric": 0.0}]
ex.save_checkpoint(path, model=model, stepper=stepper, history=history, config={})
"""


def test_a_writer_killed_mid_save_leaves_the_old_checkpoint_and_no_litter(tmp_path, capsys):
    """SIGKILL between the write and the rename: the previous checkpoint resumes; the temporary file is removed."""
    path = tmp_path / "run.pt"
    args = [*TRAIN, "--optimizer", "sgd", "--lr", "0.05", "--checkpoint", str(path), "--out", str(tmp_path / "out")]
    assert run([*args, "--epochs", "1"], capsys)[0] == 0
    intact = path.read_bytes()
    marker = tmp_path / "written"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "adapters"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the writer never reached its fsync"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    tmp = tmp_path / "run.pt.tmp"
    assert tmp.stat().st_size > 16_000  # the killed writer's 64x64 model is in the temporary file
    assert path.read_bytes() == intact  # the rename never happened: the old checkpoint is whole
    code, out, _ = run([*args, "--epochs", "2", "--resume"], capsys)
    assert code == 0 and "epoch 2" in out
    assert not tmp.exists()
    assert ex.read_checkpoint(path)["epoch"] == 2


def test_an_unwritable_checkpoint_path_fails_before_training(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before --checkpoint was checked")

    monkeypatch.setattr(ex, "train", refuse)
    code, out, err = run([*TRAIN, "--epochs", "1", "--checkpoint", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err, "is a directory")
    (tmp_path / "file").write_text("")
    code, out, err = run([*TRAIN, "--epochs", "1", "--checkpoint", str(tmp_path / "file" / "c.pt")], capsys)
    assert_one_line_error(code, out, err, "cannot create its directory")

"""benchmarks/gpu.py: its CPU dry run works (CI has no GPU), and the CUDA paths it runs on a GPU.

The dry run executes every section of the one-shot GPU script at tiny sizes
on the CPU (pytest only collects; NumPy stands in for an absent CuPy).  The
``gpu``-marked tests below need a CUDA device and are skipped without one;
``benchmarks/gpu.py`` runs them (``pytest -m gpu``) on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onlinela  # noqa: E402
from onlinela_torch import KFACPreconditioner  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.py runs it on one)")


def _script():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--repeats", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_runs_every_section_on_the_cpu(dry_run):
    assert dry_run["dry_run"] is True and dry_run["environment"]["device"] == "cpu"
    assert set(dry_run["section_seconds"]) == {"tests", "eigh", "brand", "kfac_step"}
    assert not any("error" in dry_run[name] for name in dry_run["section_seconds"])


def test_dry_run_collects_the_gpu_test_subset(dry_run):
    gpu = dry_run["tests"]["gpu_marker"]
    assert gpu["returncode"] == 0 and "-m gpu" in gpu["command"]
    assert re.search(r"\b5(/\d+)? tests collected", gpu["summary"]), gpu["summary"]  # the 5 CUDA tests of this file


def test_dry_run_eigh_results_carry_their_accuracy(dry_run):
    sizes = dry_run["sizes"]
    labels = {f"d={d}" for d in sizes["eigh_dims"]} | {f"stack={sizes['stack'][0]}x{sizes['stack'][1]}^2"}
    torch_cpu = dry_run["eigh"]["torch-cpu"]
    assert set(torch_cpu) == labels and len(dry_run["eigh"]) == 2  # torch and CuPy (or its NumPy stand-in)
    for backend in dry_run["eigh"].values():
        for case in backend.values():
            # the exact eigh reaches the optimal error λ_{r+1}: the estimate agrees up to float32 round-off
            # (d·eps ≈ 1e-5 here) and the block-Lanczos estimate's own accuracy, far inside 1e-3
            assert case["exact_eigh"]["error_ratio"] == pytest.approx(1.0, abs=1e-3)
            for name, entry in case.items():
                if isinstance(entry, dict):
                    assert entry["seconds"] > 0 and math.isfinite(entry["error_ratio"]) and entry["error_ratio"] >= 0.999
    assert {"svd_lowrank_niter1", "svd_lowrank_niter2", "randomized_eigh_default"} <= set(torch_cpu["d=96"])


def test_dry_run_brand_and_step_times(dry_run):
    sizes = dry_run["sizes"]
    for d in sizes["brand_dims"]:
        assert dry_run["brand"][f"d={d}"]["rank"] == sizes["rank"] and dry_run["brand"][f"d={d}"]["seconds"] > 0
    assert dry_run["brand"]["dense_eigh"]["speedup_of_brand"] > 0
    for task in dry_run["kfac_step"].values():
        assert set(task) == {"sgd", *sizes["methods"]}
        assert task["sgd"]["ratio_to_sgd"] == 1.0
        for method in sizes["methods"]:
            assert task[method]["seconds_per_step"] > 0 and sum(task[method]["factor_kinds"].values()) > 0


def test_full_run_refuses_a_machine_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full run would start")
    with pytest.raises(SystemExit, match="no CUDA device"):
        _script().main(["--out", "/dev/null"])


# ------------------------------------------------------------------ CUDA paths (run by benchmarks/gpu.py)
@pytest.mark.gpu
@cuda
def test_randomized_eigh_on_cuda_matches_the_cpu():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((512, 300)) * np.arange(1, 301) ** -1.0
    A = Y @ Y.T
    ref = onlinela.randomized_eigh(A, 20, rng=0)
    out = onlinela.randomized_eigh(torch.from_numpy(A).cuda(), 20, rng=0)
    assert out.eigvecs.device.type == "cuda"
    # float64 on both devices; eigenvalues agree to the decomposition's own accuracy, relative to λ_1
    np.testing.assert_allclose(out.eigvals.cpu().numpy(), ref.eigvals, rtol=0, atol=1e-6 * float(ref.eigvals[0]))


@pytest.mark.gpu
@cuda
def test_brand_update_on_cuda_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    X1, X2 = torch.randn(400, 16, generator=g, dtype=torch.float64), torch.randn(400, 16, generator=g, dtype=torch.float64)
    outs = []
    for device in ("cpu", "cuda"):
        approx = onlinela.empty_lowrank(400, like=X1.to(device))
        for X in (X1, X2):
            approx = onlinela.brand_update(approx, X.to(device), decay=0.9, rank=24)
        outs.append(approx)
    torch.testing.assert_close(outs[1].eigvals.cpu(), outs[0].eigvals, rtol=1e-10, atol=0)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["kfac", "rs-kfac", "b-kfac"])
def test_kfac_steps_on_cuda_match_the_cpu(method):
    params = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).double().to(device)
        precond = KFACPreconditioner(model, method=method, rank=8, factor_dtype=torch.float64, inv_dtype=torch.float64,
                                     inv_update_freq=1, kl_clip=None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(16, 40, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
            precond.step()
            opt.step()
        params.append(torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]))
    # float64; different BLAS/LAPACK kernels per device: agreement to ~1e-12 after 4 steps, asserted at 1e-8
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=1e-8)

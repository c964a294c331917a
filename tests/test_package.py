"""Package-level contracts: import isolation and the API page covering ``__all__``."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_onlinela_loads_no_framework():
    code = (
        "import sys, onlinela, onlinela.testing; "
        "bad = [m for m in ('torch', 'cupy', 'hypothesis') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"`import onlinela` loaded: {res.stdout.strip()} {res.stderr[-500:]}"


@pytest.mark.parametrize("module", ["onlinela", "onlinela.testing", "onlinela_torch"])
def test_api_page_lists_every_public_name(module):
    mod = importlib.import_module(module)
    page = (ROOT / "docs" / "api.rst").read_text()
    missing = [name for name in mod.__all__ if name not in page]
    assert not missing, f"docs/api.rst lacks {module}: {missing}"
    for name in mod.__all__:
        assert getattr(mod, name).__doc__, f"{module}.{name} has no docstring"

"""The codebase is ruff-clean (configured in pyproject.toml)."""

import subprocess
import sys

import pytest
from conftest import ROOT


def test_ruff_clean():
    pytest.importorskip("ruff", reason="ruff is in the test extra")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "diffjax", "experiments",
                           "tests"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_library_never_imports_absl():
    # The library stays flag-free: absl belongs to experiments/ only (STYLE.md).
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "diffjax").rglob("*.py")
                 if "import absl" in p.read_text() or "from absl" in p.read_text()]
    assert not offenders, offenders
    assert sys.version_info >= (3, 11)

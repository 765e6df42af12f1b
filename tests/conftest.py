"""Shared test setup: JAX on the CPU, the reference data directory, small helpers."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared/reference beside the checkout (CI has it there); never copied into the repo.
REFERENCE_DIR = pathlib.Path(
    os.environ.get("DIFFJAX_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir():
    """The converters' reference data; skips the test when it is not beside the checkout."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (set DIFFJAX_REFERENCE_DIR)")
    return REFERENCE_DIR

"""Shared test setup: JAX on the CPU, the reference data directory, small helpers."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole session, shared by the xdist workers
# and the scripts the tests start as subprocesses (they inherit the environment): most of
# the suite's time is XLA compiling the same purifier programs again in another process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

# ../shared/reference beside the checkout (CI has it there); never copied into the repo.
REFERENCE_DIR = pathlib.Path(
    os.environ.get("DIFFJAX_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir():
    """The converters' reference data; skips the test when it is not beside the checkout."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (set DIFFJAX_REFERENCE_DIR)")
    return REFERENCE_DIR

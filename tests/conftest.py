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

# The suite's cost is XLA compiling purifier programs whose run time is negligible at test
# sizes: cheaper LLVM optimisation cuts compile time ~40% (measured: an APGD program through
# the tiny U-Net, 16.5 s -> 9.6 s). Numerics are those of the same operations (tolerances in
# the tests are ~1e-5); benchmarks and the main job run with XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


# As the study scripts do (`experiments.common.keep_freed_memory_on_cpu`): malloc keeps
# freed memory for reuse, so XLA:CPU's per-run temporaries are not mapped and page-faulted
# afresh on every program run. Allocation does not change what is computed.
from experiments import common as _common  # noqa: E402

_common.keep_freed_memory_on_cpu()


def xla_flags(extra: str) -> str:
    """The suite's XLA flags plus `extra` (e.g. a simulated device count), for subprocesses."""
    return f"{os.environ['XLA_FLAGS']} {extra}"

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


# The files that cost most, first (longest first), each on one worker: pyproject's addopts
# give whole files to the xdist workers (`--dist=loadfile`, so a module's fixture is never
# computed on both workers) in this order (`--no-loadscope-reorder`), and the two paper
# configs, 3-5 minutes each, run side by side from the start instead of ending the suite.
HEAVY_FIRST = ("test_paper_config_cifar10.py", "test_paper_config_imagenet.py",
               "test_study.py", "test_notebooks.py", "test_purifier.py", "test_benchmarks.py",
               "test_train.py", "test_beyond.py", "test_multihost.py", "test_scripts.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise


# --------------------------------------------------------------------- shared helpers

TINY_UNET = {"resolution": 8, "in_channels": 1, "out_channels": 1, "ch": 8, "ch_mult": [1],
             "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
             "resamp_with_conv": True, "num_groups": 4, "dtype": "float32"}
LINEAR_SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                   "beta_end": 2e-2}


def make_tiny_ddpm(path):
    """A tiny random DDPM U-Net for 8x8x1 digits, as a model directory (compiles fast)."""
    import jax

    from diffjax import models, pretrained

    _, variables = models.init("ddpm_unet", TINY_UNET, jax.random.key(0))
    return pretrained.save(path, kind="ddpm_unet", config=TINY_UNET, variables=variables,
                           schedule=LINEAR_SCHEDULE)


def tiny_study_config(diffusion, **overrides):
    """The quick study, shrunk so that a whole run (every part, the audit) takes seconds:
    2 purifiers, 8 examples in batches of 4, 2 reverse steps, APGD-CE + APGD-T."""
    from experiments.configs import reproduce

    c = reproduce.get_config("quick")
    c.diffusion = str(diffusion)
    c.methods = "ddpm,ddim"
    c.num_examples = 8
    c.batch_size = 4  # two batches: repacking, per-batch keys and resume are exercised
    c.eval_draws = 2
    c.purifier.num_steps = 2
    c.attack.cascade = "apgd-ce,apgd-t"
    c.attack.steps = 2
    c.attack.targets = 2
    c.attack.chunk = 1
    c.attack.eot = 2
    c.attack_undefended.steps = 4
    c.attack_undefended.chunk = 2
    c.attack_undefended.targets = 2
    c.correlation.eot = 2
    c.correlation.num_examples = 8
    c.randomness.num_images = 2
    c.randomness.num_points = 4
    c.compression.methods = "ddpm"
    c.compression.t_stars = "10,100"
    c.compression.num_examples = 2
    c.compression.num_attack_examples = 4
    c.audit.num_examples = 4
    c.audit.step_multipliers = "1,2"
    c.audit.eps = "0.4"
    c.audit.square_queries = 3
    c.fid_reference_examples = 64
    # The concurrent start stays exercised (the default is one part at a time): the
    # 8-device test compares this run with one computed sequentially.
    c.concurrent_parts = 2
    for k, v in overrides.items():
        config_set(c, k, v)
    return c


def config_get(config, key: str):
    """`config["a"]["b"]` for the dotted key "a.b"."""
    for part in key.split("."):
        config = config[part]
    return config


def config_set(config, key: str, value) -> None:
    """Sets the dotted key "a.b" of `config` to `value`."""
    *path, last = key.split(".")
    for part in path:
        config = config[part]
    config[last] = value


def config_flags(config, keys, variant: str = "reproduce.py:quick") -> list[str]:
    """The command line that gives a script `config`'s values of `keys`: the config file
    `experiments/configs/<variant>` and one `--config.<key>=<value>` per key."""
    return [f"--config=experiments/configs/{variant}",
            *(f"--config.{k}={config_get(config, k)}" for k in keys)]


def quiet(_msg):
    """A log function that prints nothing."""


def run_module(name, *args, env=None, check=True, timeout=600):
    """Runs `python -m experiments.<name> args...` from the repo root (JAX on the CPU)."""
    import subprocess
    import sys

    env = dict(env or {})
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = xla_flags(env["XLA_FLAGS"])
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc

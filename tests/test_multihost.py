"""Scale-out: 8 simulated devices, and 2 processes on localhost, give the 1-device results.

Every per-example key comes from the example id, so the scripts' results must not depend
on how the batch is split. Three runs of the same evaluation (6 digits test images, a tiny
random DDPM purifier, PGD under the `fixed` protocol, plus the compression rate of 3
images) are compared example by example:

- one CPU device (batches of 4: two batches, the second half padding);
- 8 simulated CPU devices in a subprocess (`--xla_force_host_platform_device_count=8`; the
  batch is rounded up to 8: one batch with 2 masked rows);
- 2 processes with 2 devices each, joined through `jax.distributed` on localhost
  (`--distributed`, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID): each
  process reads its own rows; each gets its own --workdir so that we can see that only
  process 0 wrote anything.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from test_scripts import make_tiny_ddpm, records, run_script, small_flags

BOOL_FIELDS = ("label", "clean_correct", "adv_correct", "adv_correct_worst", "success")
FLOAT_FIELDS = ("adv_correct_mean", "linf", "l2")
COMPRESSION = ("--config.compression.t_stars=10", "--config.compression.num_examples=3")


def assert_same_records(a, b):
    assert [r["id"] for r in a] == [r["id"] for r in b] == list(range(6))
    for ra, rb in zip(a, b, strict=True):
        for k in BOOL_FIELDS:
            assert ra[k] == rb[k], (k, ra, rb)
        for k in FLOAT_FIELDS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (k, ra, rb)


def compression_rates(workdir):
    points = json.loads((workdir / "compression" / "summary.json").read_text())
    rates = []
    for f in sorted((workdir / "compression" / "ddpm_t10").glob("batch_*.npz")):
        with np.load(f) as z:
            rates.append(z["rate"])
    return points, np.concatenate(rates)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    ddpm = make_tiny_ddpm(root / "tiny_ddpm")
    one = root / "one_device"
    run_script("eval_robustness", *small_flags(ddpm, one))
    run_script("compression", *small_flags(ddpm, one, *COMPRESSION))
    return ddpm, one


def test_eight_simulated_devices_match_one(reference, tmp_path):
    ddpm, one = reference
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = run_script("eval_robustness", *small_flags(ddpm, tmp_path), env=env)
    assert "on 8 cpu device(s)" in proc.stdout
    run_script("compression", *small_flags(ddpm, tmp_path, *COMPRESSION), env=env)
    _, ref = records(one / "robustness" / "ddpm_fixed.jsonl")
    meta, got = records(tmp_path / "robustness" / "ddpm_fixed.jsonl")
    assert meta["protocol"] == "fixed"
    assert_same_records(got, ref)
    assert len(list((tmp_path / "robustness" / "ddpm_fixed").glob("*.npz"))) == 1  # 1 batch
    (p8, r8), (p1, r1) = compression_rates(tmp_path), compression_rates(one)
    np.testing.assert_allclose(r8, r1, rtol=1e-5)
    assert p8[0]["compression_rate"] == pytest.approx(p1[0]["compression_rate"], rel=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_match_one(reference, tmp_path):
    ddpm, one = reference
    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid)}
        cmd = [sys.executable, "-m", "experiments.eval_robustness",
               *small_flags(ddpm, tmp_path / f"process_{pid}"), "--distributed"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "4 cpu device(s), 2 process(es)" in outs[0][0]
    # Process 1 computed its half of every batch but wrote nothing.
    assert not (tmp_path / "process_1").exists()
    _, ref = records(one / "robustness" / "ddpm_fixed.jsonl")
    _, got = records(tmp_path / "process_0" / "robustness" / "ddpm_fixed.jsonl")
    assert_same_records(got, ref)
    summary = json.loads((tmp_path / "process_0" / "robustness" / "summary.json").read_text())
    assert summary["ddpm"]["fixed"]["n"] == 6

"""Two processes on localhost (2 CPU devices each, joined by `jax.distributed`) run a study
script and give the single-process numbers; process 0 decides what is finished.

The single-process reference is `experiments.eval_robustness` on a tiny DDPM purifier
(fixed and transfer: one attack part per method; the undefended classifier). The
2-process run gets a separate work directory per process, as hosts with their own disks:
process 0's directory already holds the undefended attack part (copied from the reference),
process 1's holds nothing. Both must LOAD that part (process 0's view is the truth: had each
process decided from its own disk, process 1 would have started an attack that process 0
never joins, and hung), compute the rest on their own shares of the examples, and process 0
alone writes. Each process reads only its own rows of the test set.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, make_tiny_ddpm, run_module, tiny_study_config, xla_flags
from test_scripts import flags_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_and_resume_a_part_only_process_0_had(tmp_path):
    ddpm = make_tiny_ddpm(tmp_path / "ddpm")
    config = tiny_study_config(ddpm, methods="ddpm", num_examples=6,
                               **{"protocols": "fixed,transfer"})
    flags = [*flags_of(config), "--config.num_examples=6", "--config.protocols=fixed,transfer"]
    one = tmp_path / "one"
    run_module("eval_robustness", f"--workdir={one}", *flags)
    ref = json.loads((one / "robustness" / "summary.json").read_text())

    # Process 0's disk has the undefended part finished; process 1's disk is empty.
    (tmp_path / "p0" / "parts").mkdir(parents=True)
    shutil.copy(one / "parts" / "attack_undefended.npz", tmp_path / "p0" / "parts")
    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
               "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid)}
        cmd = [sys.executable, "-m", "experiments.eval_robustness", *flags,
               f"--workdir={tmp_path / f'p{pid}'}", "--distributed"]
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
    assert "[attack_undefended] loaded from" in outs[0][0]
    assert "[attack_undefended] loaded from" in outs[1][0]  # from process 0's disk
    assert "[attack_ddpm_t100_realization] computing" in outs[1][0]
    assert "process 0 reads its share of test: examples 0..2 of 6" in outs[0][0]
    assert "process 1 reads its share of test: examples 3..5 of 6" in outs[1][0]
    # Process 1 computed its share of every batch but wrote nothing.
    assert not (tmp_path / "p1").exists() or not any((tmp_path / "p1").rglob("*.*"))
    got = json.loads((tmp_path / "p0" / "robustness" / "summary.json").read_text())
    assert got.keys() == ref.keys()
    for m in ref:
        for p in ref[m]:
            for k, v in ref[m][p].items():
                assert got[m][p][k] == pytest.approx(v, abs=1e-6), (m, p, k)

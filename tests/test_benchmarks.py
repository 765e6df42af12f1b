"""Smoke test of the benchmark harness (experiments/bench) at a tiny size.

Checks that the peer (diffusers + a Python loop) and diffjax compute the same things from
the same converted weights and the same JAX-drawn noise, and that the JSON/Markdown outputs
follow the documented schema. No timing assertions: speed belongs in the benchmarks.
"""

import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from experiments.bench import cases, models, peer, report  # noqa: E402

pytestmark = pytest.mark.torch

SIZE = models.UNetSize(resolution=4, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                       attn_levels=(1,), num_groups=4, channels=3)
# The compiled peer runs in the "purify" and "grad" cases on torch.compile's "eager" backend
# (TorchDynamo's graph capture and guards without code generation, which takes minutes).
SETTINGS = cases.Settings(name="tiny", size=SIZE, repeats=1, t_star=6, num_probes=8,
                          jac_chunk=48, rss=False, noremat=False,
                          compiled_peer=("purify", "grad"), compile_backend="eager")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    # One torch thread: nothing is timed here, and on a loaded 2-core machine two OpenMP
    # threads spin at every barrier (10x slower per op).
    torch.set_num_threads(1)
    return cases.Bench(SETTINGS, log=lambda s: None,
                       workdir=str(tmp_path_factory.mktemp("bench")))


def test_converted_weights_agree_with_diffusers(bench):
    pair = bench.pair(SIZE)
    assert pair.config["resolution"] == SIZE.resolution
    assert pair.config["ch_mult"] == list(SIZE.ch_mult)
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    t = np.array([3, 999], np.int32)
    eps_j = np.asarray(pair.eps_fn(x, t))
    with torch.no_grad():
        eps_t = peer.to_nhwc(pair.torch_model(peer.to_nchw(x), torch.from_numpy(t).long()).sample)
    assert np.abs(eps_j).max() > 0.1  # random weights give a non-trivial output
    np.testing.assert_allclose(eps_t, eps_j, atol=1e-4 * np.abs(eps_j).max())


def test_a_u_net_compiled_per_block_computes_the_eager_gradient(bench):
    """`compiled_model(per_block=True)`: each down, mid and up block its own graph (here on
    torch.compile's quick "eager" backend), the glue eager; the U-Net's output and input
    gradient are the eager model's, and the original model is left as it was."""
    m = bench.pair(SIZE).torch_model
    dev, _ = peer.compiled_model(m, mode=None, backend="eager", per_block=True)
    blocks = (*dev.model.down_blocks, dev.model.mid_block, *dev.model.up_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert m.down_blocks[0]._compiled_call_impl is None
    x = torch.randn(2, 3, SIZE.resolution, SIZE.resolution)
    t = torch.full((2,), 3, dtype=torch.long)

    def grad(f):
        xg = x.clone().requires_grad_(True)
        out = f(xg, t).sample
        return out.detach(), torch.autograd.grad((out * out).sum(), xg)[0]

    (o_e, g_e), (o_c, g_c) = grad(m), grad(dev)
    assert float(g_e.abs().max()) > 1e-3
    torch.testing.assert_close(o_c, o_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


def test_cases_agree_and_follow_schema(bench, tmp_path):
    bench.purify_case("purify", SIZE, batch=2, steps=3)
    bench.grad_case("grad", SIZE, batch=2, steps=6)
    bench.compression_cases(SIZE, steps=2)
    res = bench.results
    assert set(res) == {"purify", "grad", "jacobian_exact",
                        "compression_matrix_free"}
    for name, r in res.items():
        for field in report.REQUIRED_FIELDS:
            assert field in r, (name, field)
        assert r["diffjax_s"] > 0 and r["peer_s"] > 0
        assert r["ratio"] == pytest.approx(r["peer_s"] / r["diffjax_s"])
        # The two implementations compute the same numbers (float32 error only).
        assert r["max_abs_diff"] < 1e-4, (name, r["max_abs_diff"])
    # The compiled peer runs the same loop, checked against diffjax before it is timed.
    for name in ("purify", "grad"):
        r = res[name]
        assert "peer_compiled_error" not in r, r.get("peer_compiled_error")
        assert r["peer_compiled_max_abs_diff"] < 1e-4
        assert r["peer_compiled_agrees"] is True
        assert r["peer_compiled_s"] > 0 and r["peer_compiled_first_call_s"] > 0
        assert r["ratio_compiled"] == pytest.approx(r["peer_compiled_s"] / r["diffjax_s"])
        assert "torch.compile" in r["peer_compiled_mode"]
    assert "peer_compiled_s" not in res["jacobian_exact"]
    # A case with the compiled peer also times remat="save_conv" in the same rounds: the
    # same gradient, with its ratios against both peers.
    g = res["grad"]
    assert g["diffjax_save_conv_max_abs_diff"] < 1e-6 * max(1.0, g["max_abs_diff"] * 1e4)
    assert g["diffjax_save_conv_s"] > 0 and g["diffjax_save_conv_peak_mb"] > 0
    assert g["ratio_save_conv"] == pytest.approx(g["peer_s"] / g["diffjax_save_conv_s"])
    assert g["ratio_compiled_save_conv"] == pytest.approx(
        g["peer_compiled_s"] / g["diffjax_save_conv_s"])
    assert "diffjax_noremat_s" not in g  # Settings.noremat is off
    # Purified images live in [0, 1]; the diffjax program's memory is known to XLA.
    assert res["purify"]["diffjax_peak_mb"] > 0
    # Without checkpointing the peer saves activations for every step; with it, about one
    # image batch per step: many times less, at 6 steps.
    g = res["grad"]
    assert g["peer_saved_mb"] > g["peer_ckpt_saved_mb"] * 3
    c = res["compression_matrix_free"]
    assert c["rate_exact"] == pytest.approx(res["jacobian_exact"]["rate"])
    assert 0 < c["rate"] and c["rel_error"] == pytest.approx(
        abs(c["rate"] - c["rate_exact"]) / c["rate_exact"])

    jpath, mpath = report.write(tmp_path, res, {"command": "test", "loadavg_before": [0.0]})
    data = json.loads(jpath.read_text())
    assert data["_meta"]["command"] == "test"
    assert set(report.cases_of(data)) == set(res)
    table = mpath.read_text()
    for name in res:
        assert f"`{name}`" in table
    assert 'diffjax with remat="save_conv"' in table


def test_eot_gradient_is_the_mean_of_single_draw_gradients(bench):
    s = cases.Settings(name="tiny", size=SIZE, repeats=1, t_star=6, eot=3, eot_batch=1,
                       eot_steps=2)
    b = cases.Bench(s, log=lambda s: None, workdir=bench.workdir)
    b._pairs = bench._pairs  # reuse the converted model
    r = b.eot_case("eot3")
    assert r["max_abs_diff"] < 1e-4
    assert r["eot"] == 3


def test_quick_suite_has_the_32x32_cases(monkeypatch):
    """``--quick`` runs ``purify_32`` and ``grad_32`` at 32x32x3 on the CIFAR-10
    architecture (quarter width), with the compiled peer."""
    s = cases.quick_settings()
    size = s.res32_size
    assert (size.resolution, size.channels, size.ch_mult, size.num_res_blocks) == (
        32, 3, (1, 2, 2, 2), 2)
    assert {"purify_32", "grad_32"} <= set(s.compiled_peer)
    called = {}

    def fake_case(self, name, size, batch, steps, **kw):
        called[name] = (size, batch, steps)
        self.results[name] = {}

    monkeypatch.setattr(cases.Bench, "purify_case", fake_case)
    monkeypatch.setattr(cases.Bench, "grad_case", fake_case)
    for method in ("eot_case", "compression_cases"):
        monkeypatch.setattr(cases.Bench, method, lambda self, *a, **k: None)
    monkeypatch.setattr(cases.Bench, "pair", lambda self, size: types.SimpleNamespace(
        eps_fn=None, num_params=0))
    monkeypatch.setattr(cases.timing, "unet_flops", lambda *a: 0.0)
    cases.run_all(s, log=lambda m: None)
    assert called["purify_32"] == (size, s.res32_purify_batch, s.res32_steps)
    assert called["grad_32"] == (size, s.res32_grad_batch, s.res32_steps)


def test_projection_is_linear_in_images_and_inverse_in_the_fraction():
    from experiments.bench import profile

    p = profile.projection(1e9, 2e9, iterations=10, eot=2, steps=5, images=(1, 4),
                           fractions=(0.25, 0.5))
    # per image: steps * ((fwd + grad) * eot * iterations + fwd * eot)
    assert p["flops_per_image"] == pytest.approx(5 * (3e9 * 2 * 10 + 1e9 * 2))
    days = p["gpu_days"]["H100 bf16 tensor"]
    assert days["25%"]["4"] == pytest.approx(4 * days["25%"]["1"])
    assert days["25%"]["1"] == pytest.approx(2 * days["50%"]["1"])
    assert days["50%"]["1"] == pytest.approx(
        p["flops_per_image"] / (profile.GPU_PEAKS["H100 bf16 tensor"] * 0.5) / 86400)


# ------------------------------------------------------------------ the GPU suite, on CPU


def test_gpu_suite_smoke(tmp_path):
    """The GPU suite's case functions at tiny sizes (smaller than ``--settings=gpu_smoke``,
    to keep this under ~30 s): the peer agrees, bf16 really is bf16, the achieved FLOP/s
    and the projection follow from the measured times, the outputs follow the schema."""
    import dataclasses
    import math

    from experiments.bench import gpu

    torch.set_num_threads(1)
    s = dataclasses.replace(
        gpu.gpu_smoke_settings(), t_star=4, steps=2, eot=2,
        ddpm=models.UNetSize(resolution=4, ch=8, ch_mult=(1,), attn_levels=(), num_groups=4),
        ddpmpp=(("nf", 8), ("ch_mult", [1]), ("num_res_blocks", 1), ("attn_resolutions", []),
                ("image_size", 4), ("dropout", 0.0)), remat="save_conv")
    b = gpu.GpuBench(s, tmp_path, log=lambda m: None)
    b.run("probe", b.probe)
    b.run("setup_ddpm", b.setup_ddpm)
    b.run("check", b.check, "ddpm")
    b.run("purify_fp32", b.purify_case, "ddpm", "fp32", s.purify_batch)
    b.run("purify_bf16", b.purify_case, "ddpm", "bf16", s.purify_batch)
    b.run("setup_ddpmpp", b.setup_ddpmpp)
    b.run("pp_purify_bf16", b.purify_case, "ddpmpp", "bf16", s.pp_purify_batch)
    b.run("pp_eot_bf16", b.eot_case, "ddpmpp", "bf16", s.pp_eot_batch)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    cases = report.cases_of(data)
    st, n, e = s.steps, s.purify_batch, s.eot
    checks = {f"check_ddpm_purify_t{st}", f"check_ddpm_grad_t{st}"}
    timed = {f"ddpm_purify_t{st}_b{n}_fp32", f"ddpm_purify_t{st}_b{n}_bf16",
             f"ddpmpp_purify_t{st}_b{s.pp_purify_batch}_bf16",
             f"ddpmpp_eot{e}_grad_b{s.pp_eot_batch}_bf16"}
    assert set(cases) == checks | timed, {k: r.get("error") for k, r in cases.items()}
    # --gpu_remat=save_conv reaches the gradient cases (here the EOT one), named in the record.
    assert cases[f"ddpmpp_eot{e}_grad_b{s.pp_eot_batch}_bf16"]["remat"] == "save_conv"
    assert data["_meta"]["precision"]["jax_matmul_rel_err_highest"] < 1e-5
    for name, r in cases.items():
        for field in report.REQUIRED_FIELDS:
            assert field in r, (name, field)
        if name.startswith(("check", "ddpm_")):  # agreement before timing, float32 error
            assert r["max_abs_diff"] < 1e-4, name
    flops = data["_flops"]
    for name in timed:
        r = cases[name]
        assert math.isfinite(r["diffjax_s"]) and r["diffjax_s"] > 0, name
        fl = flops[r["model"]]
        # A gradient step: forward + input-gradient, + the forward that remat="steps"
        # recomputes ("save_conv", run here, recomputes no convolution).
        per_step = fl["forward_flops"] if "purify" in name else \
            (fl["forward_flops"] * (r["remat"] == "steps") + fl["grad_flops"]) * r["eot"]
        assert r["flops_per_image"] == pytest.approx(per_step * st)
        assert r["diffjax_tflops"] == pytest.approx(per_step * st / r["diffjax_s"] / 1e12)
        if r["model"] == "ddpm":  # the peers ran the same case
            assert r["peer_s"] > 0 and r["ratio"] == pytest.approx(r["peer_s"] / r["diffjax_s"])
            # The compiled peer (torch.compile; here the eager backend) computes what
            # the eager peer does, and is timed beside it.
            assert "peer_compiled_error" not in r, r.get("peer_compiled_error")
            assert r["peer_compiled_max_abs_diff"] < 1e-5, name
            assert r["ratio_compiled"] == pytest.approx(r["peer_compiled_s"] / r["diffjax_s"])
            assert "torch.compile" in r["peer_compiled_mode"]
    for fl in flops.values():
        # A remat gradient step costs about three forward passes.
        assert 2.0 < (fl["forward_flops"] + fl["grad_flops"]) / fl["forward_flops"] < 4.5
        # The bf16 wrapper puts every convolution and matmul on bf16 operands.
        assert set(fl["op_dtypes"]["bf16"]["conv_general_dilated"]) == {"bfloat16"}
        assert set(fl["op_dtypes"]["bf16"]["dot_general"]) == {"bfloat16"}
        assert set(fl["op_dtypes"]["fp32"]["conv_general_dilated"]) == {"float32"}
    # bf16 changes the purified images, a little, on both sides.
    r16 = cases[f"ddpm_purify_t{st}_b{n}_bf16"]
    assert 0 < r16["bf16_vs_fp32_max_abs_diff"] < 0.5
    assert 0 < r16["peer_bf16_vs_fp32_max_abs_diff"] < 0.5
    # The projection: PGD iterations x the measured EOT gradient + EOT purifications.
    pr = data["_projection"]["by_model"]["ddpmpp_bf16_diffjax"]
    assert pr["eot_source"] == f"measured ddpmpp_eot{e}_grad"
    assert pr["s_per_image"] == pytest.approx(
        s.iterations * cases[f"ddpmpp_eot{e}_grad_b{s.pp_eot_batch}_bf16"]["diffjax_s"]
        + e * cases[f"ddpmpp_purify_t{st}_b{s.pp_purify_batch}_bf16"]["diffjax_s"])
    assert pr["days"]["1000"] == pytest.approx(1000 * pr["s_per_image"] / 86400)
    table = (tmp_path / "benchmarks.md").read_text()
    for name in cases:
        assert f"`{name}`" in table


def test_gpu_projection_and_time_budget(tmp_path):
    """The projection prefers a measured EOT gradient and the largest purification batch;
    a spent time budget skips cases (recorded) without running them."""
    from experiments.bench import gpu

    s = gpu.gpu_smoke_settings()
    results = {"ddpmpp_purify_t3_b2_bf16": {"batch": 2, "diffjax_s": 4.0},
               "ddpmpp_purify_t3_b8_bf16": {"batch": 8, "diffjax_s": 1.0},
               "ddpmpp_grad_t3_b2_bf16": {"batch": 2, "diffjax_s": 3.0},
               "ddpmpp_eot2_grad_b1_bf16": {"batch": 1, "diffjax_s": 5.0},
               "ddpmpp_purify_t3_b2_fp32": {"batch": 2, "diffjax_s": 2.0},
               "ddpmpp_grad_t3_b2_fp32": {"what": "failed", "error": "x"}}
    p = gpu.projection(results, s)["by_model"]
    r = p["ddpmpp_bf16_diffjax"]
    assert r["eot_source"] == "measured ddpmpp_eot2_grad"
    assert r["s_per_image"] == pytest.approx(s.iterations * 5.0 + s.eot * 1.0)
    assert r["days"]["10000"] == pytest.approx(10 * r["days"]["1000"])
    assert r["vs_paper_10_days"]["512"] == pytest.approx(r["days"]["512"] / 10.0)
    assert "ddpmpp_fp32_diffjax" not in p  # its gradient failed: nothing to project from

    b = gpu.GpuBench(s, tmp_path, log=lambda m: None, time_budget_s=0.0)
    called = []
    b.run("late_case", lambda: called.append(1))
    assert not called and b.meta["skipped"] == ["late_case"]
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["_meta"]["skipped"] == ["late_case"]


def test_a_compiled_peer_that_computes_something_else_gets_no_ratio():
    """The agreement gate: torch 2.13.0's inductor gave `grad_32`'s whole U-Net a gradient
    20% off (BENCHMARKS.md). Such a peer is compiled again block by block; if that copy
    agrees it is the one timed, else the peer is shown but no speed ratio is taken."""
    ref = np.linspace(-1.0, 1.0, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 3)
    good = torch.from_numpy(ref).permute(0, 3, 1, 2).contiguous()
    wrong = good * 1.2
    asked = []

    def get(model, bf16, mode="unset", per_block=False):
        asked.append(per_block)
        return ("block" if per_block else "whole"), "default"

    fake = peer.CompiledPeers(mode=None, backend="b")
    fake.get = get  # no torch.compile: the "compiled" model is a name `run` reads
    runs = {"same": lambda dev: good + 1e-6,  # right as one graph
            "fixed_per_block": lambda dev: wrong if dev == "whole" else good,
            "wrong": lambda dev: wrong}  # wrong either way
    got = {}
    for name, run in runs.items():
        asked.clear()
        got[name] = fake.measure(None, False, run, ref, 2, repeats=1, warmup=0,
                                 rtol=cases.COMPILED_RTOL)
        assert asked == ([False] if name == "same" else [False, True]), name
    assert got["same"]["peer_compiled_agrees"] is True
    assert got["same"]["peer_compiled_rel_diff"] == pytest.approx(1e-6, rel=0.1)
    assert "peer_compiled_whole_rel_diff" not in got["same"]
    fixed = got["fixed_per_block"]
    assert fixed["peer_compiled_agrees"] is True and fixed["peer_compiled_rel_diff"] == 0
    assert fixed["peer_compiled_whole_rel_diff"] == pytest.approx(0.2)
    assert fixed["peer_compiled_mode"].endswith(", per block")
    assert got["wrong"]["peer_compiled_agrees"] is False
    assert got["wrong"]["peer_compiled_rel_diff"] == pytest.approx(0.2)
    assert any("disagrees" in e["error"] for e in fake.errors)
    b = types.SimpleNamespace(results={}, log=lambda s: None)
    for name, rec in got.items():
        cases.Bench.record(b, name, "a case", diffjax_s=0.5, peer_s=1.0, **rec)
    for name in ("same", "fixed_per_block"):
        assert b.results[name]["ratio_compiled"] == pytest.approx(
            got[name]["peer_compiled_s"] / 0.5)
    assert "ratio_compiled" not in b.results["wrong"]
    rows = {line.split("`")[1]: line for line in report.markdown_table(b.results).splitlines()
            if line.startswith("| `")}
    assert "WRONG" in rows["wrong"] and "20% of the output's max" in rows["wrong"]
    assert "compiled per block" in rows["fixed_per_block"] and "WRONG" not in rows["same"]


@pytest.mark.parametrize("out,needle", [("", "--out: expected a directory"),
                                        ("FILE", "--out: cannot create the directory")])
def test_benchmarks_with_a_bad_out_stop_at_once_in_one_line(out, needle, tmp_path):
    """An empty or unusable --out ends before any case runs (not after minutes of them)."""
    from conftest import run_module

    if out == "FILE":
        (tmp_path / "a_file").write_text("x")
        out = str(tmp_path / "a_file" / "run")
    proc = run_module("benchmarks", "--quick", f"--out={out}", check=False, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], proc.stderr
    assert "benchmarks (quick)" not in proc.stdout  # no case started


@pytest.mark.parametrize("args, hide_torch, message", [
    (["--out=/nonexistent/dir/p.json"], False, "its directory does not exist"),
    (["--peer"], True, "--peer needs PyTorch: pip install torch==2.13.0"),
])
def test_unet_profile_bad_input_is_one_line_before_any_work(args, hide_torch, message):
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import runpy, sys\n"
            + ("sys.modules['torch'] = None  # as if PyTorch were not installed\n"
               if hide_torch else "")
            + f"sys.argv = ['unet_cpu_profile', *{args!r}]\n"
            "runpy.run_module('experiments.bench.unet_cpu_profile', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "U-Net input-gradient" not in proc.stdout


def test_unet_profile_groups_the_eager_peers_ops_into_the_same_kinds():
    torch = pytest.importorskip("torch")
    from experiments.bench import unet_cpu_profile as prof

    threads = torch.get_num_threads()
    assert prof._peer_kind("aten::mkldnn_convolution") == "convolution"
    assert prof._peer_kind("aten::convolution_backward") == "convolution"
    assert prof._peer_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert prof._peer_kind("aten::bmm") == "attention"
    assert prof._peer_kind("aten::native_group_norm_backward") == "group norm"
    assert prof._peer_kind("aten::silu_backward") == "silu"
    assert prof._peer_kind("aten::addmm") == "other"
    r = prof.peer_profile("tiny", batch=1, calls=1, threads=1)
    assert set(r["ms_per_call"]) == set(prof.KINDS) and r["ms_per_call"]["convolution"] > 0
    assert r["torch_threads"] == 1 and r["wall_ms"] > 0
    assert torch.get_num_threads() == threads  # restored


def test_unet_profile_attributes_ops_to_layers_and_never_counts_time_twice():
    from experiments.bench import unet_cpu_profile as prof

    assert prof._union([(0, 2), (1, 3), (5, 6)]) == 4.0  # overlapping pieces count once
    assert prof._union([]) == 0.0
    assert prof._kind("jvp(UNet)/up_1_attn_0/bqk,bkc->bqc/dot_general") == "attention"
    assert prof._kind("transpose(jvp(UNet))/down_0_block_0/conv1/cond/rev") == "convolution"
    assert prof._kind("jvp(UNet)/up_0_block_1/jit(silu)/div") == "silu"
    assert prof._kind("jvp(UNet)/mid_block_1/norm2/sub") == "group norm"
    assert prof._kind("jvp(UNet)/temb_dense0/dot_general") == "other"
    # A synthetic trace: one call; a convolution whose event ends at 2 while its work runs
    # until the next op starts at 7; two overlapping SiLU events; the executor's wait.
    def ev(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur}

    kinds = {"conv": "convolution", "silu": "silu", "gn": "group norm"}
    events = [ev("conv", 0, 2), ev("silu", 7, 3), ev("silu", 8, 3), ev("gn", 11, 1),
              ev(prof._WAIT, 1, 14), ev("ThunkExecutor::Execute", 0, 15),
              ev("end: x", 3, 0)]
    a = prof.attribute(events, kinds.get)
    us = 1e-3  # the trace's microseconds, reported in ms
    assert a["calls"] == 1 and a["traced_ms"] == pytest.approx(15 * us)
    assert a["ms_per_call"]["silu"] == pytest.approx(4 * us)  # overlap counted once
    assert a["after_ms_per_call"]["convolution"] == pytest.approx(5 * us)  # 2 .. 7
    assert a["after_ms_per_call"]["group norm"] == pytest.approx(3 * us)  # 12 .. 15
    assert a["between_ops_ms"] == pytest.approx(8 * us)
    assert sum(a["total_ms_per_call"].values()) == pytest.approx(a["traced_ms"])
    with pytest.raises(ValueError, match="JAX_PLATFORMS=cpu"):
        prof.attribute([ev("conv", 0, 2)], kinds.get)
    r = prof.profile("tiny", batch=1, calls=1)
    parts = r["total_ms_per_call"]
    assert set(parts) == set(prof.KINDS) and parts["convolution"] > 0
    assert r["covered_ms"] + r["between_ops_ms"] == pytest.approx(r["traced_ms"])
    # Independent ops of two kinds may run at once (two threads): never less than the call.
    assert sum(parts.values()) >= r["traced_ms"] - 1e-6
    from absl import flags

    assert "batch" not in flags.FLAGS  # importing the tool defines no flags (shared workers)


def test_group_norm_before_and_after_compute_the_same_gradient_and_restore_the_layer():
    import jax
    import jax.numpy as jnp

    from diffjax.models import layers
    from experiments.bench import group_norm_ab

    library = layers.group_norm
    r = group_norm_ab.compare("tiny", batch=1, repeats=1)
    assert layers.group_norm is library  # the patch used to build "before" is undone
    assert r["max_abs_grad"] > 0 and r["max_abs_diff"] <= 1e-5 * r["max_abs_grad"]
    assert len(r["before_times_ms"]) == len(r["after_times_ms"]) == 1
    assert r["forward_max_abs_diff"] <= 1e-4 and r["forward_before_ms"] > 0
    assert r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"])
    # The two formulations, directly, on off-centre inputs (flax's fast variance in both).
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    scale, bias = 1.0 + jnp.arange(16.0) / 16, jnp.arange(16.0) / 8
    np.testing.assert_allclose(library(x, scale, bias, 4, 1e-6),
                               group_norm_ab.group_norm_before(x, scale, bias, 4, 1e-6),
                               atol=2e-5)


def test_xla_options_ab_checks_which_library_runs_and_agrees_with_the_default():
    from experiments.bench import xla_options_ab

    r = xla_options_ab.compare("tiny", batch=1, repeats=1)
    res = r["results"]
    assert set(res) == set(xla_options_ab.OPTIONS)
    assert res["default"]["grad_calls"]["onednn"] == 0 and res["default"]["ratio"] == 1.0
    # The options reach the compiled program: oneDNN takes the dots when asked, and
    # YNNPACK is gone where it is switched off.
    assert res["onednn_dot"]["grad_calls"]["onednn"] > 0
    assert res["onednn_dot_no_ynn"]["grad_calls"]["ynn"] == 0
    assert r["lone_conv"]["default"]["ynn"] > 0 and r["lone_conv"]["onednn_conv"]["ynn"] == 0
    for v in res.values():  # the same function whichever library computes it
        assert v["grad_max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_grad"])
        assert v["forward_max_abs_diff"] <= 1e-4 and v["grad_ms"] > 0


def test_conv_cpu_matmul_formulations_are_the_convolution():
    import jax
    from jax import lax

    from experiments.bench import conv_cpu

    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    g = jax.random.normal(jax.random.key(2), (2, 6, 5, 4))
    plain = lambda x: lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want, back = jax.vjp(plain, x)
    for form in (conv_cpu.im2col_conv, conv_cpu.shifted_conv):
        got, back_f = jax.vjp(lambda x, form=form: form(x, k), x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(back_f(g)[0], back(g)[0], rtol=1e-5, atol=1e-5)


def test_interleaved_medians_alternate_the_calls_and_rotate_their_order():
    from experiments.bench import timing

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    r = timing.interleaved_medians(fns, repeats=4, warmup=1, sync=lambda out: out)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    rounds = [calls[3 + 3 * i: 6 + 3 * i] for i in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert set(r) == set(fns)
    for median, times in r.values():
        assert len(times) == 4 and min(times) <= median <= max(times)


@pytest.mark.parametrize("module", ["group_norm_ab", "xla_options_ab"])
@pytest.mark.parametrize("args, message", [
    (["--out=/nonexistent/dir/ab.json"], "its directory does not exist"),
    (["--batch=0"], "flag --batch=0: 0 is not a positive integer"),
])
def test_ab_scripts_bad_input_is_one_line_before_any_work(module, args, message):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", f"experiments.bench.{module}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "U-Net" not in proc.stdout


def test_unet_profile_times_both_gradients_in_alternation():
    from experiments.bench import unet_cpu_profile as prof

    threads = torch.get_num_threads()
    a = prof.alternating_walls("tiny", batch=1, repeats=2, threads=1)
    assert a["repeats"] == 2 and a["diffjax_ms"] > 0 and a["peer_ms"] > 0
    assert a["ratio"] == pytest.approx(a["peer_ms"] / a["diffjax_ms"])
    assert torch.get_num_threads() == threads  # restored


def test_shared_oracle_bench_compares_like_with_like(tmp_path):
    """`experiments.bench.shared_oracle`: both sides on the shipped digits purifier, the same
    successes (checked inside), adversarial examples equal to float32 rounding, and the
    shared side's EOT-2 run compiling no second gradient program."""
    from experiments.bench import shared_oracle

    out = tmp_path / "oracle.json"
    got = shared_oracle.main(["shared_oracle", "--rounds=1", f"--out={out}"])
    assert json.loads(out.read_text()) == got
    cases = got["cases"]
    assert set(cases) == {"in_program_fixed", "in_program_eot2", "shared_fixed",
                          "shared_eot2"}
    for c in cases.values():
        assert c["run_s"] > 0 and len(c["run_s_all"]) == 1
        assert c["max_abs_diff"] < 1e-3
    # EOT-2 in one program compiles a gradient program of its own; on the oracle it does not.
    assert cases["shared_eot2"]["compile_s"] < cases["in_program_eot2"]["compile_s"] / 2

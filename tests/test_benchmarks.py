"""Smoke test of the benchmark harness (experiments/bench) at a tiny size.

Checks that the peer (diffusers + a Python loop) and diffjax compute the same things from
the same converted weights and the same JAX-drawn noise, and that the JSON/Markdown outputs
follow the documented schema. No timing assertions: speed belongs in the benchmarks.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from experiments.bench import cases, models, peer, report  # noqa: E402

pytestmark = pytest.mark.torch

SIZE = models.UNetSize(resolution=4, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                       attn_levels=(1,), num_groups=4, channels=3)
SETTINGS = cases.Settings(name="tiny", size=SIZE, repeats=1, t_star=6, num_probes=8,
                          jac_chunk=48, rss=False, noremat=False)


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


def test_eot_gradient_is_the_mean_of_single_draw_gradients(bench):
    s = cases.Settings(name="tiny", size=SIZE, repeats=1, t_star=6, eot=3, eot_batch=1,
                       eot_steps=2)
    b = cases.Bench(s, log=lambda s: None, workdir=bench.workdir)
    b._pairs = bench._pairs  # reuse the converted model
    r = b.eot_case("eot3")
    assert r["max_abs_diff"] < 1e-4
    assert r["eot"] == 3


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

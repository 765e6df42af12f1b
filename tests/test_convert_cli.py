"""`python -m experiments.convert_checkpoint`: conversions that load back, one-line errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from diffjax import pretrained
from experiments import convert_checkpoint as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args):
    """Runs the script's main in-process with these flags."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["convert_checkpoint", *args])
    cc.main(["convert_checkpoint"])


def test_wrn_cli_and_pretrained_load(reference_dir, tmp_path, capsys):
    src = reference_dir / "robustbench_wrn_small.pt"
    out = tmp_path / "wrn"
    run_cli(["--format=robustbench-wrn", f"--src={src}", f"--out={out}",
             f"--model_config={reference_dir / 'robustbench_wrn_small_config.json'}",
             "--name=wrn_small"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "kind wrn (classifier), 303,706 parameters" in printed
    assert f"sha256 {pretrained.sha256_file(src)}" in printed
    model = pretrained.load(out)
    assert model.name == "wrn_small" and model.kind == "wrn"
    assert model.meta["source"]["sha256"] == pretrained.sha256_file(src)
    d = np.load(reference_dir / "robustbench_wrn_small_io.npz")
    logits = np.asarray(jax.jit(lambda f, x: f(x))(
        model.logits_fn, jnp.asarray(d["x_nchw"].transpose(0, 2, 3, 1))))
    assert np.abs(logits - d["logits"]).max() <= 2e-5 * np.abs(d["logits"]).max()


def test_ddpm_cli_and_pretrained_load(reference_dir, tmp_path, capsys):
    src = reference_dir / "ddpm_pytorch_diffusion_small.ckpt"
    out = tmp_path / "ddpm"
    run_cli(["--format=ddpm-pytorch-diffusion", f"--src={src}", f"--out={out}",
             f"--model_config={reference_dir / 'ddpm_pytorch_diffusion_small_config.json'}"])
    assert "kind ddpm_unet (diffusion)" in capsys.readouterr().out
    model = pretrained.load(out)
    assert model.schedule().betas.shape == (1000,)
    d = np.load(reference_dir / "ddpm_pytorch_diffusion_small_io.npz")
    eps = np.asarray(jax.jit(lambda f, x, t: f(x, t))(
        model.eps_fn, jnp.asarray(d["x_nchw"].transpose(0, 2, 3, 1)),
        jnp.asarray(d["t"], jnp.int32)))
    ref = d["out_nchw"].transpose(0, 2, 3, 1)
    assert np.abs(eps - ref).max() <= 2e-5 * np.abs(ref).max()


@pytest.mark.parametrize("args, match", [
    (["--format=nope", "--src=x"], "error: --format: expected one of"),
    (["--format=ddpm-diffusers"], "error: --src: required"),
    (["--format=robustbench-wrn", "--src=/nonexistent/Standard.pt"], "does not exist"),
])
def test_bad_flags_exit_1_with_one_line(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        run_cli(args + [f"--out={tmp_path / 'out'}"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_html_file_via_subprocess(tmp_path):
    """The real command line: an HTML page saved as the checkpoint gives one line, status 1."""
    page = tmp_path / "Standard.pt"
    page.write_text("<!DOCTYPE html><html><body>Quota exceeded</body></html>")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.convert_checkpoint", "--format=robustbench-wrn",
         f"--src={page}", f"--out={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HTML page" in lines[0]
    assert not (tmp_path / "out").exists()


def test_smoke_input_shapes():
    assert cc.smoke_input_shape("ddpm_unet", {"resolution": 32, "in_channels": 3}) == (32, 32, 3)
    assert cc.smoke_input_shape("ncsnpp", {"image_size": 32, "num_channels": 3}) == (32, 32, 3)
    assert cc.smoke_input_shape("guided_unet", {"image_size": 256, "num_channels": 256}) == \
        (256, 256, 3)
    json.dumps(cc.smoke_input_shape("wrn", {"resolution": 32, "in_channels": 3}))

"""Ho et al.'s DDPM converters (diffusers and pytorch_diffusion layouts) vs their references."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import convert, models
from diffjax.convert import ddpm
from diffjax.models import unet

torch = pytest.importorskip("torch")

# One jitted caller: traced once per (architecture, input shape).
call = jax.jit(lambda fn, *args: fn(*args))


def _eps(converted, x_nhwc, t):
    fn = models.make_fn(converted.kind, converted.config, converted.variables)
    return np.asarray(call(fn, jnp.asarray(x_nhwc), jnp.asarray(t, jnp.int32)))


def _assert_close(out, ref, rel=2e-5):
    err = np.abs(out - ref).max()
    assert err <= rel * np.abs(ref).max(), f"max abs error {err}, scale {np.abs(ref).max()}"


def _io(reference_dir, name):
    d = np.load(reference_dir / name)
    return d["x_nchw"].transpose(0, 2, 3, 1), d["t"], d["out_nchw"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("folder", ["ddpm_diffusers_small", "ddpm_diffusers_small_legacy"])
def test_diffusers_reference_output(reference_dir, folder):
    c = ddpm.convert_diffusers(str(reference_dir / folder))
    assert c.kind == "ddpm_unet"
    assert c.config["ch"] == 32 and c.config["ch_mult"] == [1, 2, 2, 2]
    assert c.config["attn_resolutions"] == [16] and c.config["num_res_blocks"] == 1
    assert c.schedule == ddpm.DDPM_SCHEDULE
    assert c.meta["attention_names"] == ("diffusers_legacy" if "legacy" in folder
                                         else "diffusers")
    x, t, ref = _io(reference_dir, "ddpm_diffusers_small_io.npz")
    _assert_close(_eps(c, x, t), ref)


def test_diffusers_weights_file_as_src(reference_dir):
    c = ddpm.convert_diffusers(
        str(reference_dir / "ddpm_diffusers_small" / "diffusion_pytorch_model.safetensors"))
    assert c.config["ch"] == 32


def test_pytorch_diffusion_reference_output(reference_dir):
    cfg = json.loads((reference_dir / "ddpm_pytorch_diffusion_small_config.json").read_text())
    c = ddpm.convert_pytorch_diffusion(str(reference_dir / "ddpm_pytorch_diffusion_small.ckpt"),
                                       cfg)
    assert c.config["ch"] == 32 and c.config["num_res_blocks"] == 1
    assert c.schedule["num_timesteps"] == 1000
    x, t, ref = _io(reference_dir, "ddpm_pytorch_diffusion_small_io.npz")
    _assert_close(_eps(c, x, t), ref)
    # The flat (pytorch_diffusion Model arguments) form of the config gives the same model.
    flat = dict(cfg["model"], resolution=32)
    for k in ("type", "var_type", "ema_rate", "ema"):
        flat.pop(k)
    assert ddpm.config_from_pytorch_diffusion(flat)[0] == c.config


def test_pytorch_diffusion_full_size_manifest(reference_dir):
    manifest = json.loads((reference_dir / "ddpm_cifar10_pytorch_diffusion_manifest.json")
                          .read_text())
    official = {name: tuple(shape) for name, shape in manifest["state_dict"]}
    config, _ = ddpm.config_from_pytorch_diffusion(None)
    assert config == unet.resolve_config(unet.cifar10_config())
    assert ddpm.config_from_pytorch_diffusion(manifest["config"])[0] == config
    ours = ddpm.source_shapes(config, "pytorch_diffusion")
    assert ours == official
    assert sum(math.prod(s) for s in ours.values()) == manifest["num_params"] == 35_746_307


def _google_config():
    # google/ddpm-cifar10-32's config.json (diffusers 0.x): the 35.7M model.
    return {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
            "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                 "DownBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
            "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
            "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
            "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def test_diffusers_full_size_layout_matches_diffusers():
    """Our name map for google/ddpm-cifar10-32 equals diffusers' own state_dict layout."""
    diffusers = pytest.importorskip("diffusers")
    dcfg = _google_config()
    config = ddpm.config_from_diffusers(dcfg)
    assert config == dict(unet.resolve_config(unet.cifar10_config()), dropout=0.0)
    assert config["attn_head_dim"] is None  # one head, as Ho et al.
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**{k: v for k, v in dcfg.items() if k != "_class_name"})
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ddpm.source_shapes(config, "diffusers") == theirs
    assert sum(math.prod(s) for s in theirs.values()) == 35_746_307


@pytest.mark.parametrize("safe, head_dim", [(True, 8), (False, None)])
def test_fresh_diffusers_model_other_size(tmp_path, safe, head_dim):
    """A freshly built diffusers UNet2DModel of another size converts exactly.

    diffusers' default `attention_head_dim=8` (multi-head), saved as safetensors, and one
    head (`None`, as google/ddpm-cifar10-32) saved as a `.bin` pickle.
    """
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(16, 32), norm_num_groups=8, norm_eps=1e-6,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), freq_shift=1,
        flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=head_dim).eval()
    with torch.no_grad():  # random norms and biases, so every tensor matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.03,
         "beta_schedule": "linear"}))
    c = ddpm.convert_diffusers(str(tmp_path))  # a pipeline directory: unet/ + scheduler/
    assert c.config["attn_resolutions"] == [16] and c.config["num_groups"] == 8
    assert c.config["attn_head_dim"] == head_dim
    assert c.schedule == {"name": "linear", "num_timesteps": 500, "beta_start": 2e-4,
                          "beta_end": 0.03}
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32)
    t = np.array([0, 17, 499])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    _assert_close(_eps(c, x.transpose(0, 2, 3, 1), t), ref.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- errors


def test_another_architecture_is_listed(reference_dir, tmp_path):
    # pytorch_diffusion's file with the default CIFAR-10 architecture: shapes differ.
    with pytest.raises(ValueError) as e:
        ddpm.convert_pytorch_diffusion(str(reference_dir / "ddpm_pytorch_diffusion_small.ckpt"))
    msg = str(e.value)
    assert "does not match the ddpm-pytorch-diffusion architecture" in msg
    assert "missing" in msg and "shape mismatch" in msg and "conv_in.weight" in msg
    assert "--model_config" in msg
    # pytorch_diffusion's file read as diffusers: every name is wrong.
    d = tmp_path / "wrong"
    d.mkdir()
    shutil.copy(reference_dir / "ddpm_diffusers_small" / "config.json", d)
    shutil.copy(reference_dir / "ddpm_pytorch_diffusion_small.ckpt",
                d / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\d+ missing .*\d+ unexpected \(e\.g\. temb\.dense"):
        ddpm.convert_diffusers(str(d))


def _copy_diffusers(reference_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(reference_dir / "ddpm_diffusers_small", d)
    return d, d / "diffusion_pytorch_model.safetensors"


def test_truncated_file(reference_dir, tmp_path):
    d, weights = _copy_diffusers(reference_dir, tmp_path)
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ddpm.convert_diffusers(str(d))
    ckpt = tmp_path / "model-790000.ckpt"
    ckpt.write_bytes((reference_dir / "ddpm_pytorch_diffusion_small.ckpt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ddpm.convert_pytorch_diffusion(str(ckpt))


def test_html_page_and_lfs_pointer(reference_dir, tmp_path):
    d, weights = _copy_diffusers(reference_dir, tmp_path)
    weights.write_text("<!DOCTYPE html>\n<html><body>Hugging Face</body></html>")
    with pytest.raises(ValueError, match="HTML page, not a checkpoint"):
        convert.convert("ddpm-diffusers", d)
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(ValueError, match="Git-LFS pointer"):
        convert.convert("ddpm-diffusers", d)


def test_wrong_format_and_missing_files(reference_dir, tmp_path):
    with pytest.raises(ValueError, match="format: expected one of"):
        convert.convert("ddpm", reference_dir / "ddpm_pytorch_diffusion_small.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.convert("ddpm-diffusers", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        ddpm.convert_diffusers(str(tmp_path))
    # A diffusers-format file of another model class is refused by its config.
    d, _ = _copy_diffusers(reference_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ValueError, match="_class_name"):
        ddpm.config_from_diffusers(dict(cfg, _class_name="UNet2DConditionModel"))


@pytest.mark.parametrize("change, match", [
    ({"attention_head_dim": 96}, "does not divide"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"norm_eps": 1e-5}, "norm_eps"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "mirror"),
])
def test_unsupported_diffusers_configs(change, match):
    with pytest.raises(ValueError, match=match):
        ddpm.config_from_diffusers(dict(_google_config(), **change))

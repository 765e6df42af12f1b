r"""Converts a public pretrained checkpoint into a diffjax model directory.

    python -m experiments.convert_checkpoint --format=ddpm-diffusers \
        --src=ddpm-cifar10-32/ --out=~/.cache/diffjax/checkpoints/ddpm_cifar10
    python -m experiments.convert_checkpoint --format=robustbench-wrn \
        --src=Standard.pt --out=~/.cache/diffjax/checkpoints/wrn_28_10_standard

Formats: ddpm-diffusers, ddpm-pytorch-diffusion, score-sde-pytorch, score-sde-flax,
guided-diffusion, robustbench-wrn, torchvision-resnet50, fid-inception
(`diffjax.convert.FORMATS`).
`--model_config=FILE.json` gives another architecture in the reference implementation's
own terms. The written directory loads with `diffjax.pretrained.load(DIR)`; this script
loads it back and runs one forward pass on zeros before reporting success. It prints the
directory, the model kind, the parameter count and the SHA-256 of the source file. Bad
input (a wrong format, a missing/truncated/HTML file, a checkpoint of another
architecture) ends with one line `error: ...` and exit status 1.
"""

from absl import app, flags, logging

_FORMAT = flags.DEFINE_string("format", None, "Source layout (see diffjax.convert.FORMATS).")
_SRC = flags.DEFINE_string("src", None, "The downloaded checkpoint file (or diffusers dir).")
_OUT = flags.DEFINE_string("out", None, "The model directory to write (replaced if present).")
_MODEL_CONFIG = flags.DEFINE_string(
    "model_config", None, "JSON file with another architecture, in the reference's terms.")
_NAME = flags.DEFINE_string("name", None, "Model name (default: the --out directory's name).")
_SMOKE = flags.DEFINE_bool("smoke_check", True,
                           "Load the written directory back and run one forward pass.")


def smoke_input_shape(kind: str, config: dict) -> tuple[int, int, int]:
    """`(H, W, C)` of one input image for a model kind's config (for the smoke check)."""
    size = next((config[k] for k in ("resolution", "image_size", "sample_size")
                 if k in config), 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    if kind == "ncsnpp":
        channels = config.get("num_channels", 3)
    else:  # guided-diffusion's `num_channels` is its width, not the image's channels
        channels = config.get("in_channels", 3)
    return size, size, int(channels)


def smoke_check(out_dir) -> float:
    """Loads `out_dir` with `diffjax.pretrained.load` and runs one forward pass on zeros.

    Returns:
      The largest absolute output value (finite, or a ValueError is raised).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffjax import pretrained

    model = pretrained.load(out_dir)
    h, w, c = smoke_input_shape(model.kind, model.config)
    x = jnp.zeros((1, h, w, c), jnp.float32)
    if model.role == "diffusion":  # jit: one compile beats hundreds of eager dispatches
        y = jax.jit(lambda f, x, t: f(x, t))(model.eps_fn, x, jnp.zeros((1,), jnp.int32))
    else:
        y = jax.jit(lambda f, x: f(x))(model.fn, x)  # logits_fn, or features_fn
    y = np.asarray(y)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{out_dir}: the converted model's output on zeros is not finite")
    return float(np.abs(y).max())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from experiments import common

    logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
    with common.one_line_errors():
        import json

        from diffjax import convert, models
        from diffjax.convert import common as convert_common

        for flag, value in (("--format", _FORMAT.value), ("--src", _SRC.value),
                            ("--out", _OUT.value)):
            if not value:
                raise ValueError(f"{flag}: required; e.g. python -m experiments.convert_checkpoint"
                                 " --format=ddpm-diffusers --src=ddpm-cifar10-32/ --out=DIR")
        if _FORMAT.value not in convert.FORMATS:
            raise ValueError(f"--format: expected one of {', '.join(convert.FORMATS)}; got "
                             f"{_FORMAT.value!r}")
        model_config = (convert_common.read_json(_MODEL_CONFIG.value)
                        if _MODEL_CONFIG.value else None)
        common.log(f"converting {_SRC.value} ({_FORMAT.value})")
        out = convert.convert_to_dir(_FORMAT.value, _SRC.value, _OUT.value,
                                     model_config=model_config, name=_NAME.value)
        info = json.loads((out / "model.json").read_text())
        n = models.param_count(_restore_shapes(out))
        if _SMOKE.value:
            peak = smoke_check(out)
            common.log(f"smoke check: loaded back, forward pass on zeros, max |out| {peak:.4g}")
        print(f"wrote {out}")
        print(f"kind {info['kind']} ({info['role']}), {n:,} parameters")
        print(f"source {info['source']['file']} sha256 {info['source']['sha256']}")


def _restore_shapes(out):
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(out / "params")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {"params": tree["params"]}


if __name__ == "__main__":
    app.run(main)

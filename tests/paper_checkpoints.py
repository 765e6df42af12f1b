"""Small random-weight checkpoints of the paper's models, in their public formats, converted
by `experiments.convert_checkpoint` (for tests/paper_configs.py and README's commands).

- CIFAR-10: score_sde_pytorch's DDPM++ (`score_sde_ddpmpp_small_checkpoint.pth`, the official
  `checkpoint_8.pth` layout) and RobustBench's WRN (`robustbench_wrn_small.pt`) from
  `../shared/reference/`, converted with `--model_config` (their reference configs).
- ImageNet: guided-diffusion's `UNetModel` with the 256x256-uncond flags at image size 32
  (`guided_diffusion_small.pt`, the reference), purified at 32x32 inside the study's
  purifier (224 -> 32 -> 224 resize in and out; `config.purifier.resolution` = the model's
  `image_size`); and a torchvision-layout ResNet (`layers=[1,1,1,1]`, width 8, 1,000
  classes) written by a PyTorch re-statement of torchvision's ResNet
  (tests/test_convert_resnet.py), converted with `--format=torchvision-resnet50
  --model_config`.

Why not a 256x256 guided model: the smallest U-Net in the 256x256 model's layout
(`num_channels=32`, `num_res_blocks=1`, `channel_mult=1,1,2,2,4,4`, attention at 32,16,8)
costs 25.7 GFLOP per image per forward pass (XLA's cost analysis), 39x the 32x32
reference's 0.66 GFLOP; the toy study makes ~10^3 purifier passes per image (attacks, EOT,
evaluation draws, Jacobian products), hours on 2 CPU cores. The study's code path is the
same at both sizes (resize in and out, matrix-free Jacobian estimates on the 224x224x3
input, d = 150,528); only the U-Net's inner resolution differs.

The ResNet's last layer is fitted (ridge regression on its random features) so that it
classifies the first `fit_examples` synthetic validation images correctly: a random
1,000-class classifier is right on none, and every attack would stop at its first
iteration. Everything else is random (weights and BatchNorm statistics).

Run as a script to write all four into a directory (what README's commands use):

    python tests/paper_checkpoints.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE_DIR = pathlib.Path(
    os.environ.get("DIFFJAX_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))

RESNET_SMALL = {"layers": [1, 1, 1, 1], "width": 8, "num_classes": 1000}


def convert(fmt: str, src, out, model_config=None) -> pathlib.Path:
    """`python -m experiments.convert_checkpoint` (its main, in this process)."""
    from absl import flags

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from experiments import convert_checkpoint as cc

    args = [f"--format={fmt}", f"--src={src}", f"--out={out}", "--nosmoke_check"]
    if model_config is not None:
        args.append(f"--model_config={model_config}")
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["convert_checkpoint", *args])
    cc.main(["convert_checkpoint"])
    flags.FLAGS.unparse_flags()
    return pathlib.Path(out)


def cifar10(out, reference_dir=REFERENCE_DIR) -> tuple[pathlib.Path, pathlib.Path]:
    """(DDPM++ small, WRN small) model directories under `out`."""
    out, ref = pathlib.Path(out), pathlib.Path(reference_dir)
    ddpm = convert("score-sde-pytorch", ref / "score_sde_ddpmpp_small_checkpoint.pth",
                   out / "ddpmpp_small", ref / "score_sde_ddpmpp_small_config.json")
    wrn = convert("robustbench-wrn", ref / "robustbench_wrn_small.pt", out / "wrn_small",
                  ref / "robustbench_wrn_small_config.json")
    return ddpm, wrn


def resnet_state_dict(fit_examples: int = 8, seed: int = 0) -> dict:
    """A torchvision-layout state dict (PyTorch tensors) of the small ResNet (module doc)."""
    import torch
    from test_convert_resnet import _torch_reference

    from diffjax import data
    from diffjax.models import resnet

    cfg = {**resnet.resnet50_config(), **RESNET_SMALL}
    model = _torch_reference(torch, cfg)  # random weights and BatchNorm statistics, eval
    val = data.load_arrays("imagenet2012", "validation", num_examples=fit_examples,
                           synthetic=True, seed=seed)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(val.images.transpose(0, 3, 1, 2).copy()) - mean) / std
    feats = []
    hook = model.fc.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    f = feats[0].double().numpy()
    mu = f.mean(0)
    fc = f - mu
    # Ridge regression onto one-hot targets (margin 4 between the label and the rest).
    target = np.zeros((len(f), cfg["num_classes"]))
    target[np.arange(len(f)), val.labels] = 4.0
    lam = 1e-3 * np.trace(fc @ fc.T) / len(f)
    w = fc.T @ np.linalg.solve(fc @ fc.T + lam * np.eye(len(f)), target)  # [C, classes]
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
        model.fc.bias.copy_(torch.from_numpy((-mu @ w).astype(np.float32)))
        pred = model(x).argmax(-1).numpy()
    if not np.array_equal(pred, val.labels):
        raise AssertionError(f"the fitted ResNet misclassifies {np.sum(pred != val.labels)} "
                             f"of {len(pred)} examples it was fitted to")
    return model.state_dict()


def imagenet(out, reference_dir=REFERENCE_DIR, fit_examples: int = 8
             ) -> tuple[pathlib.Path, pathlib.Path]:
    """(guided-diffusion small, ResNet small) model directories under `out`."""
    import torch

    out, ref = pathlib.Path(out), pathlib.Path(reference_dir)
    out.mkdir(parents=True, exist_ok=True)
    guided = convert("guided-diffusion", ref / "guided_diffusion_small.pt",
                     out / "guided_small", ref / "guided_diffusion_small_config.json")
    pth = out / "resnet_small.pth"
    torch.save(resnet_state_dict(fit_examples), pth)  # torchvision's plain state_dict pickle
    cfg = out / "resnet_small_config.json"
    cfg.write_text(json.dumps(RESNET_SMALL))
    resnet = convert("torchvision-resnet50", pth, out / "resnet_small", cfg)
    return guided, resnet


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/paper_checkpoints.py OUT_DIR")
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for path in (*cifar10(sys.argv[1]), *imagenet(sys.argv[1])):
        print(path)

"""torchvision ResNet-50: Flax model and converter.

torchvision is not installable here, so equivalence with torchvision itself is NOT tested.
What is tested: the full-size layout (names and shapes derived independently below from
torchvision's published architecture; the well-known 25,557,032 parameters and 320
state_dict entries), and numerical agreement with a small PyTorch re-statement of
torchvision's ``Bottleneck``/``ResNet`` forward (eval mode) written in this file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import convert, models, pretrained
from diffjax.convert import resnet as cr
from diffjax.models import resnet


def _torchvision_resnet50_table(layers=(3, 4, 6, 3), width=64, num_classes=1000):
    """torchvision's ResNet state_dict names/shapes, from its architecture description."""
    table = {}

    def conv(name, cout, cin, k):
        table[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            table[f"{name}.{leaf}"] = (c,)
        table[f"{name}.num_batches_tracked"] = ()

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for s, n in enumerate(layers):
        planes = width * 2 ** s
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", 4 * planes, planes, 1)
            bn(f"{p}.bn3", 4 * planes)
            if i == 0:  # stride 2 or inplanes != 4 * planes: true for every first block
                conv(f"{p}.downsample.0", 4 * planes, inplanes, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    table["fc.weight"] = (num_classes, inplanes)
    table["fc.bias"] = (num_classes,)
    return table


def test_full_size_layout_and_parameter_count():
    want = _torchvision_resnet50_table()
    assert len(want) == 320  # len(torchvision.models.resnet50().state_dict())
    got = cr.source_shapes()
    assert got == {k: v for k, v in want.items() if not k.endswith("num_batches_tracked")}
    module = resnet.build(resnet.resnet50_config())
    shapes = jax.eval_shape(lambda k: resnet.init(module, resnet.resnet50_config(), k),
                            jax.random.key(0))
    assert models.param_count(shapes) == 25_557_032


def _torch_reference(torch, cfg):
    """A PyTorch re-statement of torchvision's ResNet with Bottleneck blocks (eval mode)."""
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * planes)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or inplanes != 4 * planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
                    nn.BatchNorm2d(4 * planes))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, layers, width, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes = width
            for s, n in enumerate(layers):
                blocks = []
                for i in range(n):
                    stride = 2 if (s > 0 and i == 0) else 1
                    blocks.append(Bottleneck(inplanes, width * 2 ** s, stride))
                    inplanes = 4 * width * 2 ** s
                setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(inplanes, num_classes)
            self.n = len(layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for s in range(self.n):
                x = getattr(self, f"layer{s + 1}")(x)
            return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))

    torch.manual_seed(0)
    model = ResNet(cfg["layers"], cfg["width"], cfg["num_classes"])
    with torch.no_grad():  # random BatchNorm statistics, so inference mode matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    torch = pytest.importorskip("torch")
    cfg = resnet.tiny_config()
    model = _torch_reference(torch, cfg)
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((torch.from_numpy(x) - mean) / std).numpy()
    path = tmp_path_factory.mktemp("resnet") / "tiny.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    return {"cfg": cfg, "path": path, "x_nhwc": x.transpose(0, 2, 3, 1), "logits": logits,
            "names": set(model.state_dict())}


def test_registry_init_tiny():
    cfg = resnet.tiny_config()
    module, variables = models.init("resnet50", cfg, jax.random.key(0))
    assert set(variables) == {"params", "batch_stats"}
    shapes = {k: v for k, v in cr.source_shapes(cfg).items()
              if not k.endswith(("running_mean", "running_var"))}
    assert models.param_count(variables) == sum(int(np.prod(s)) for s in shapes.values())
    logits = models.make_fn("resnet50", cfg, variables, module)(jnp.full((1, 32, 32, 3), 0.5))
    assert logits.shape == (1, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_tiny_reference_names_match_the_table(tiny_pt):
    cfg = tiny_pt["cfg"]
    assert tiny_pt["names"] == set(_torchvision_resnet50_table(cfg["layers"], cfg["width"],
                                                              cfg["num_classes"]))


def test_converted_logits_match_pytorch(tiny_pt, tmp_path):
    cfg = {k: tiny_pt["cfg"][k] for k in ("layers", "num_classes", "width", "resolution")}
    out = convert.convert_to_dir("torchvision-resnet50", tiny_pt["path"], tmp_path / "r",
                                 cfg)
    loaded = pretrained.load(out)
    assert loaded.role == "classifier" and set(loaded.params) == {"params", "batch_stats"}
    logits = loaded.logits_fn(jnp.asarray(tiny_pt["x_nhwc"]))
    err = np.max(np.abs(np.asarray(logits) - tiny_pt["logits"])) / np.max(
        np.abs(tiny_pt["logits"]))
    assert err < 1e-5
    with pytest.raises(ValueError, match="channels-first"):
        loaded.logits_fn(jnp.asarray(tiny_pt["x_nhwc"].transpose(0, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        loaded.logits_fn(jnp.asarray(tiny_pt["x_nhwc"]) * 255)


def test_wrong_architecture_and_bad_files(tiny_pt, tmp_path, reference_dir):
    # The tiny file against the full ResNet-50: shape mismatches and missing blocks listed.
    with pytest.raises(ValueError, match=r"torchvision ResNet.*missing .*shape mismatch"):
        cr.convert(str(tiny_pt["path"]))
    # Another model's file (RobustBench's WRN).
    with pytest.raises(ValueError, match=r"missing.*unexpected \(e\.g\. block1"):
        cr.convert(str(reference_dir / "robustbench_wrn_small.pt"))
    html = tmp_path / "resnet50-0676ba61.pth"
    html.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ValueError, match="HTML page"):
        cr.convert(str(html))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_pt["path"].read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        cr.convert(str(cut), tiny_pt["cfg"])
    with pytest.raises(ValueError, match="unknown"):
        cr.convert(str(tiny_pt["path"]), {"depth": 50})

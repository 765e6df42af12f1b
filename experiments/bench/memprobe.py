"""Subprocess: the peak-RSS growth of one peer gradient (see `timing.rss_probe`).

``python -m experiments.bench.memprobe MODEL_DIR ARRAYS.npz T_STAR NUM_STEPS CKPT`` loads
the diffusers U-Net and the arrays, runs one no-grad forward as a baseline (allocator and
thread pools warmed), resets the peak RSS (``/proc/self/clear_refs``), then runs one full
gradient and prints ``{"rss_delta_mb": ...}``: the peak RSS during the gradient minus the
RSS before it (``ru_maxrss`` growth where the reset is unavailable, which the imports'
high-water mark can hide). Imports neither JAX nor diffjax, so nothing
else lives in the process.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import torch


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); False if unavailable.

    Without it the high-water mark of the imports and the model load hides the gradient.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> None:
    """Runs the probe described in the module docstring."""
    from diffusers import UNet2DModel

    from experiments.bench.peer import PeerPurifier, to_nchw

    model_dir, path, t_star, num_steps, ckpt = argv
    torch.set_num_threads(2)
    a = np.load(path)
    model = UNet2DModel.from_pretrained(model_dir).eval().requires_grad_(False)
    taus = a["taus"]
    pur = PeerPurifier(model, a["alphas_cumprod"], int(t_star), taus)
    assert len(taus) == int(num_steps)
    x = to_nchw(a["x"])
    noises = torch.stack([to_nchw(n) for n in a["noises"]])
    w = torch.from_numpy(a["w"])
    labels = torch.from_numpy(a["labels"]).long()
    with torch.no_grad():
        pur(x, noises)
    if _reset_peak() and _status_mb("VmHWM") is not None:
        base = _status_mb("VmRSS")
        pur.grad(x, noises, w, labels, checkpoint=bool(int(ckpt)))
        peak, method = _status_mb("VmHWM"), "VmHWM after clear_refs"
    else:
        base = _maxrss_mb()
        pur.grad(x, noises, w, labels, checkpoint=bool(int(ckpt)))
        peak, method = _maxrss_mb(), "ru_maxrss"
    print(json.dumps({"rss_delta_mb": peak - base, "baseline_mb": base, "method": method}))


if __name__ == "__main__":
    main(sys.argv[1:])

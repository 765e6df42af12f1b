"""Is the compiled peer's gradient right? One U-Net call's input gradient, eager vs compiled.

``python -m experiments.bench.compiled_grad_check [--out=FILE]`` prints (and writes) JSON:
for the U-Nets of the CPU suite (`cases.Settings().size`, the 8x8 one, and the 32x32
quarter-width CIFAR-10 one), the largest difference between the eager diffusers U-Net's
input gradient ``d sum(eps * r) / dx`` and the same under ``torch.compile`` with each
backend: "aot_eager_decomp_partition" (TorchDynamo + AOTAutograd's decompositions and
partitioner, no code generation) and "inductor" (generated C++, what the suite's compiled
peer uses), and the U-Net compiled block by block with inductor
(`peer.compiled_model(per_block=True)`, the suite's fallback). Also each down block and
the mid block of the 32x32 U-Net compiled alone with inductor.

Why: the quick suite's ``grad_32`` compiled peer differed from diffjax and from the eager
peer by 20% of the gradient's largest value while its forward agreed to 4e-7
(BENCHMARKS.md). This check says where: inductor's code for the whole U-Net's backward.
"""

from __future__ import annotations

import json
import sys


def _grad_diff(fn, compiled, x, r) -> dict:
    import torch

    def grad(f):
        xg = x.clone().requires_grad_(True)
        out = f(xg)
        return torch.autograd.grad((out * r).sum(), xg)[0]

    ge, gc = grad(fn), grad(compiled)
    diff = float((ge - gc).abs().max())
    scale = float(ge.abs().max())
    return {"max_abs_grad": scale, "max_abs_diff": diff, "rel_diff": diff / scale}


def main(argv) -> dict:
    import torch

    from experiments.bench import cases, peer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    s = cases.Settings(name="check")
    b = cases.Bench(s, log=lambda m: None)
    out = {"torch": torch.__version__, "models": {}}

    def compiled(m, backend, per_block=False):  # the suite's own compile of a fresh copy
        torch._dynamo.reset()
        return peer.compiled_model(m, mode=None, backend=backend, per_block=per_block)[0]

    for label, size in (("8x8", s.size), ("32x32", s.res32_size)):
        m = b.pair(size).torch_model
        x = torch.randn(2, size.channels, size.resolution, size.resolution)
        r = torch.randn_like(x)
        t = torch.full((2,), 90, dtype=torch.long)
        row = {}
        for name, backend, per_block in (
                ("aot_eager_decomp_partition", "aot_eager_decomp_partition", False),
                ("inductor", "inductor", False), ("inductor_per_block", "inductor", True)):
            dev = compiled(m, backend, per_block)
            row[name] = _grad_diff(lambda v, m=m, t=t: m(v, t).sample,
                                   lambda v, dev=dev, t=t: dev(v, t).sample, x, r)
        dev = compiled(m, "inductor")
        with torch.no_grad():
            row["inductor_forward_max_abs_diff"] = float(
                (m(x, t).sample - dev(x, t).sample).abs().max())
        out["models"][label] = row
    # The 32x32 U-Net's down blocks and mid block, each compiled alone with inductor.
    m = b.pair(s.res32_size).torch_model
    temb = torch.randn(2, m.time_embedding.linear_2.out_features)
    res = s.res32_size.resolution
    blocks = {}

    def check_block(name, f, channels, size):
        x = torch.randn(2, channels, size, size)
        torch._dynamo.reset()
        blocks[name] = _grad_diff(f, torch.compile(f, backend="inductor"), x,
                                  torch.randn_like(f(x)))

    for i, blk in enumerate(m.down_blocks):
        check_block(f"down_blocks.{i}", lambda v, blk=blk: blk(v, temb)[0],
                    blk.resnets[0].in_channels, res >> i)
    check_block("mid_block", lambda v: m.mid_block(v, temb),
                m.mid_block.resnets[0].in_channels, res >> (len(m.down_blocks) - 1))
    out["blocks_32x32_inductor"] = blocks
    text = json.dumps(out, indent=1)
    print(text)
    for a in argv[1:]:
        if a.startswith("--out="):
            with open(a.split("=", 1)[1], "w") as fh:
                fh.write(text + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv)
    sys.exit(0)

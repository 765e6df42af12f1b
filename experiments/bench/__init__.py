"""The benchmark suite of issue 8: diffjax against the PyTorch way (diffusers + a loop).

`experiments/benchmarks.py` is the absl entry point; the logic lives here so a notebook or
a test can call it:

- `models`: one U-Net with random weights on both sides: a diffusers ``UNet2DModel`` saved
  with ``save_pretrained`` and converted with diffjax's ``ddpm-diffusers`` converter.
- `peer`: the PyTorch peer (a Python loop over the steps, ``torch.autograd``,
  ``torch.utils.checkpoint``, ``torch.autograd.functional.jacobian``).
- `timing`: medians after a warm-up, XLA compile time / memory / FLOPs, peer memory.
- `cases`: the named cases (``purify_t100``, ``grad_t10`` ...) and their sizes.
- `report`: the JSON and the Markdown table.
"""

"""Writes colab/quickstart.ipynb and colab/reproduction.ipynb (outputs empty).

    python colab/make_notebooks.py

The notebooks are generated so that their code stays reviewable as plain Python here;
tests/test_notebooks.py executes both top to bottom. Each reads two environment variables
so that the test can run them small: DIFFJAX_NOTEBOOK_QUICK=1 shrinks the sizes, and
DIFFJAX_NOTEBOOK_DDPM names another diffusion model (a directory) than the shipped one.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
REPO = "https://github.com/diffjax/diffjax"  # the project's repository

INSTALL = f'''\
# In Colab, install diffjax from its repository first (a CPU runtime is enough here).
import sys

if "google.colab" in sys.modules:
    !pip install -q "diffjax @ git+{REPO}"'''

SETTINGS = '''\
import os

# DIFFJAX_NOTEBOOK_QUICK=1 (set by the tests) shrinks every size; unset, the notebook runs
# the sizes described in the text. DIFFJAX_NOTEBOOK_DDPM: another diffusion model directory.
QUICK = os.environ.get("DIFFJAX_NOTEBOOK_QUICK") == "1"
DDPM = os.environ.get("DIFFJAX_NOTEBOOK_DDPM", "digits_ddpm")'''


def quickstart():
    cells = [
        new_markdown_cell(
            "# diffjax quick start: purify, attack, measure compression\n\n"
            "*How Do Diffusion Models Improve Adversarial Robustness?* (arXiv 2505.22839) in "
            "a few minutes on a CPU, on the embedded default: scikit-learn's 8x8 digits, a "
            "small DDPM U-Net and a CNN classifier shipped with the package.\n\n"
            "1. purify images with a diffusion purifier whose randomness comes only from "
            "per-example keys;\n"
            "2. attack the purifier + classifier under **independent** randomness (PGD-EOT, "
            "what earlier reports did) and under **fixed** randomness (the paper's "
            "protocol), and see the robust accuracy fall;\n"
            "3. measure the purifier's **compression rate** (the RMS singular value of its "
            "Jacobian at clean images, randomness fixed)."),
        new_code_cell(INSTALL),
        new_code_cell(SETTINGS + '''

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from diffjax import attacks, data, metrics, pretrained, protocols, randomness
from diffjax.defense import Defense, undefended
from diffjax.diffusion import make_purifier

print("jax", jax.__version__, "on", jax.devices()[0].platform)
print("checkpoints:", pretrained.available())'''),
        new_markdown_cell(
            "## Models and data\n\nThe diffusion model is used through `eps_fn(x_t, t)` and "
            "the classifier through `logits_fn(x)` on [0, 1] images; images are NHWC "
            "float32."),
        new_code_cell('''\
ddpm = pretrained.load(DDPM)
classifier = pretrained.load("digits_classifier")
schedule = ddpm.schedule()

n = 8 if QUICK else 64
test = data.load_arrays("digits", "test", num_examples=n)
x, y, ids = jnp.asarray(test.images), jnp.asarray(test.labels), test.ids
keys = randomness.example_keys(jax.random.key(0), ids)  # one key per example, from its id
print(x.shape, x.dtype, "labels", np.asarray(y)[:8])'''),
        new_markdown_cell(
            "## 1. Purify\n\nDiffPure with a discrete sampler: diffuse to `t_star = 100` of "
            "1000 steps, then run the reverse chain (here 10 respaced steps). The same key "
            "gives the same purified image, bit for bit."),
        new_code_cell('''\
num_steps = 2 if QUICK else 10
purifier = make_purifier(ddpm.eps_fn, schedule=schedule, t_star=100, method="ddpm",
                         num_steps=num_steps)
purified = purifier(x, keys)
again = purifier(x, keys)
other = purifier(x, randomness.example_keys(jax.random.key(1), ids))
print("same keys, same result:", bool(jnp.all(purified == again)))
print("l2 to clean, mean:", float(metrics.l2_distance(purified, x).mean()))
print("l2 between two randomness draws, mean:", float(metrics.l2_distance(purified, other).mean()))

fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for i in range(8):
    axes[0, i].imshow(np.asarray(x[i, ..., 0]), cmap="gray", vmin=0, vmax=1)
    axes[1, i].imshow(np.asarray(purified[i, ..., 0]), cmap="gray", vmin=0, vmax=1)
for a in axes.ravel():
    a.axis("off")
axes[0, 0].set_title("clean", loc="left", fontsize=8)
axes[1, 0].set_title("purified", loc="left", fontsize=8)
plt.show()'''),
        new_markdown_cell(
            "## 2. Attack under fixed vs independent randomness\n\n"
            "A randomness protocol (`diffjax.protocols`) says which purifier randomness the "
            "attack and the test draw; it owns every key derivation:\n\n"
            "- `Independent(eot=K, eval_draws=M)`: each attack step draws fresh purifier "
            "randomness (EOT averages K draws) and the test draws again: the stochastic "
            "defence as usually reported;\n"
            "- `Fixed()`: the attack and the test share the example's ONE realization "
            "(`protocols.realization(keys)`);\n"
            "- `Transfer(eval_draws=M)`: the attack of `Fixed`, tested under other draws. "
            "One attack serves `Fixed` and `Transfer`.\n\n"
            "APGD (l_inf eps 0.1, full gradients through every reverse step) under each. "
            "The paper's claim: most of the apparent robustness comes from the randomness "
            "mismatch, so `fixed` is lower than `independent` and `transfer`."),
        new_code_cell('''\
defense = Defense(purifier, classifier.logits_fn)
steps, eot = (2, 2) if QUICK else (10, 4)
apgd = attacks.APGDConfig(norm="linf", eps=0.1, steps=steps)

# One attack on the realization, evaluated under Fixed and Transfer.
out = attacks.attack_and_evaluate(defense, x, y, keys, config=apgd, protocol=protocols.Fixed(),
                                  also=(protocols.Transfer(eval_draws=4),))
ind = attacks.attack_and_evaluate(defense, x, y, keys, config=apgd,
                                  protocol=protocols.Independent(eot=eot, eval_draws=4))
plain = attacks.attack_and_evaluate(undefended(classifier.logits_fn), x, y, keys, config=apgd)
print(f"undefended : robust {float(plain['adv_correct'].mean()):.2f}")
print(f"clean accuracy under the realization: {float(out['clean_correct_fixed'].mean()):.2f}")
for name, res in (("fixed", out["protocols"]["fixed"]),
                  ("transfer", out["protocols"]["transfer"]),
                  ("independent", ind["protocols"]["independent"])):
    print(f"{name:>11}: robust {float(res['adv_correct'].mean()):.2f}")'''),
        new_markdown_cell(
            "## 3. Compression rate\n\n"
            "Under its realization the purifier is a deterministic map `f`. Its "
            "compression rate at a clean image is the RMS singular value of the Jacobian, "
            "`||J||_F / sqrt(d)` (exact here: `d = 64`). A rate below 1 means the "
            "purifier shrinks neighbourhoods of the clean image; the paper relates the "
            "robustness left under fixed randomness to this number. One call over the batch, "
            "each example under the realization the fixed attack used:"),
        new_code_cell('''\
m = 2 if QUICK else 8
real = protocols.realization(keys[:m])
rates = metrics.compression_rate(defense.purify_fn, x[:m], keys=real, ad_mode="reverse")
spectra = np.asarray(metrics.jacobian_singular_values(defense.purify_fn, x[:m], keys=real,
                                                      ad_mode="reverse"))
print("compression rate per image:", np.round(np.asarray(rates), 3))
print("fraction of singular values below 0.25:", float(np.mean(spectra < 0.25)))
plt.figure(figsize=(4, 2.5))
plt.semilogy(spectra.T, alpha=0.6)
plt.xlabel("index")
plt.ylabel("singular value")
plt.title("Jacobian spectrum of the purifier (its realization)")
plt.show()'''),
        new_markdown_cell(
            "Next: `colab/reproduction.ipynb` runs the whole study (every claim, four "
            "samplers, the sweep over `t_star`), and `experiments/` has the command-line "
            "scripts for CIFAR-10 and ImageNet with converted public checkpoints."),
    ]
    return cells


def reproduction():
    cells = [
        new_markdown_cell(
            "# Reproducing arXiv 2505.22839 on the embedded default\n\n"
            "This notebook runs the study of `diffjax.study` (the library behind `python -m "
            "experiments.reproduce`) with its `quick` configuration (about a minute on a "
            "CPU), then shows the report and the figures. Every part is saved in the work "
            "directory as it finishes: running the study cell again loads them instead of "
            "recomputing. For the full default run (about 10 minutes on 2 CPU cores) use "
            "`get_config()` instead of `get_config(\"quick\")`."),
        new_code_cell(INSTALL),
        new_code_cell(SETTINGS + '''
import pathlib
import tempfile

from IPython.display import Image, Markdown, display

from diffjax.study import Workdir, report, run_study
from experiments.configs.reproduce import get_config

config = get_config("quick")
config.diffusion = DDPM
if QUICK:  # the test's sizes: one method, a two-point sweep, no audit
    config.num_examples = 8
    config.batch_size = 8
    config.methods = "ddpm"
    config.purifier.num_steps = 2
    config.attack.steps = 2
    config.attack_undefended.steps = 4
    config.correlation.num_examples = 8
    config.compression.methods = "ddpm"
    config.compression.t_stars = "10,100"
    config.compression.num_examples = 2
    config.compression.num_attack_examples = 8
    config.audit.enabled = False
    config.fid_reference_examples = 64
workdir = pathlib.Path(os.environ.get("DIFFJAX_NOTEBOOK_WORKDIR") or tempfile.mkdtemp())
print("workdir:", workdir)'''),
        new_markdown_cell("## Run (or resume) the study"),
        new_code_cell('''\
results = run_study(config, Workdir(workdir))
paths = report.write_all(results, workdir)
print({k: str(v) for k, v in paths.items()})'''),
        new_markdown_cell("## Report: the paper's numbers beside ours, a verdict per claim"),
        new_code_cell('''\
display(Markdown(paths["report"].read_text()))
print("\\n".join(report.summary_lines(results)))'''),
        new_markdown_cell(
            "## Figures\n\nRobust accuracy under fixed randomness against the compression "
            "rate, with the logistic fit (claim 4); distances to the clean image before and "
            "after purification (claim 1); clean, adversarial and purified images."),
        new_code_cell('''\
for name in ("compression_robustness", "distances", "examples"):
    if paths[name].exists():
        display(Image(filename=str(paths[name])))'''),
    ]
    return cells


def write(cells, name):
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []}})
    nbformat.validate(nb)
    path = HERE / name
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(write(quickstart(), "quickstart.ipynb"))
    print(write(reproduction(), "reproduction.ipynb"))

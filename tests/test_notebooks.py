"""The Colab notebooks execute top to bottom (nbclient), so they cannot rot.

Both run with DIFFJAX_NOTEBOOK_QUICK=1 (small sizes) and DIFFJAX_NOTEBOOK_DDPM pointing at a
tiny random DDPM U-Net, so they do not depend on the shipped diffusion checkpoint and stay
fast. The committed notebooks must also be exactly what `colab/make_notebooks.py` writes,
with no outputs.
"""

import json
import os

import nbformat
import pytest
from conftest import ROOT, make_tiny_ddpm

COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "reproduction.ipynb")


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    return make_tiny_ddpm(tmp_path_factory.mktemp("nb_models") / "tiny_ddpm")


def execute(name, env, cwd):
    from nbclient import NotebookClient

    nb = nbformat.read(COLAB / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or json.dumps(out.get("data", {})))
    return "\n".join(parts)


def test_notebooks_are_generated_and_empty():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", COLAB / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, cells in (("quickstart.ipynb", gen.quickstart()),
                        ("reproduction.ipynb", gen.reproduction())):
        nb = nbformat.read(COLAB / name, as_version=4)
        nbformat.validate(nb)
        assert [c.source for c in nb.cells] == [c.source for c in cells], name
        for c in nb.cells:
            assert c.get("outputs", []) == [] and c.get("execution_count") is None, name
        assert 'if "google.colab" in sys.modules:' in nb.cells[1].source
        assert "!pip install" in nb.cells[1].source


def test_quickstart_runs(tiny_ddpm, tmp_path):
    env = {"DIFFJAX_NOTEBOOK_QUICK": "1", "DIFFJAX_NOTEBOOK_DDPM": str(tiny_ddpm),
           "JAX_PLATFORMS": "cpu"}
    nb = execute("quickstart.ipynb", env, ROOT)
    text = outputs_text(nb)
    assert "same keys, same result: True" in text
    for name in ("undefended", "fixed", "transfer", "independent"):
        assert f"{name}: robust" in text or f"{name} : robust" in text, name
    assert "clean accuracy under the realization" in text
    assert "compression rate per image" in text
    assert "image/png" in text  # the figures were drawn


def test_reproduction_runs(tiny_ddpm, tmp_path):
    env = {"DIFFJAX_NOTEBOOK_QUICK": "1", "DIFFJAX_NOTEBOOK_DDPM": str(tiny_ddpm),
           "DIFFJAX_NOTEBOOK_WORKDIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    nb = execute("reproduction.ipynb", env, ROOT)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("dataset", "num_examples", "clean_accuracy", "distances", "robust_accuracy",
                "gradient_correlation", "compression", "sigmoid_fit"):
        assert key in results
    assert results["num_examples"] == 8 and set(results["distances"]) == {"ddpm"}
    assert (tmp_path / "compression_robustness.png").is_file()
    text = outputs_text(nb)
    assert "image/png" in text and "claim 1:" in text

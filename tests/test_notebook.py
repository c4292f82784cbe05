"""feature_eval/feature_eval.ipynb runs end to end on a tiny checkpoint, so it cannot silently rot."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from models.resnet_simclr import create_model
from simclr.checkpoint import save_checkpoint
from simclr.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "feature_eval" / "feature_eval.ipynb"


def _kernel_name() -> str:
    """The notebook's python3 kernel; registered for this interpreter when the machine has no spec for it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=True)  # equivalent to `python -m ipykernel install --user`
    return "python3"


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    config = load_config(None, ["dataset.name=digits", "model.out_dim=8", "epochs=1", "dataset.input_shape=(16,16,3)"])
    torch.manual_seed(0)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": create_model("resnet18", 8).state_dict(), "config": config_to_dict(config),
                           "next_epoch": 1})
    return path


@pytest.mark.slow
def test_notebook_runs_end_to_end(tiny_checkpoint, monkeypatch):
    for name, value in {"FEATURE_EVAL_CHECKPOINT": str(tiny_checkpoint), "FEATURE_EVAL_CLASSIFIERS": "lbfgs,knn",
                        "FEATURE_EVAL_BASELINES": "none", "FEATURE_EVAL_TSNE_POINTS": "150",
                        # One thread: small problems run faster so, and far faster on a shared machine.
                        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Started in feature_eval/ as `jupyter notebook feature_eval/feature_eval.ipynb` would be: the notebook
    # must find the repository root itself.
    NotebookClient(notebook, timeout=240, kernel_name=_kernel_name(),
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    streams = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "%|" not in streams and "\r" not in streams, streams[:300]  # no progress bars saved with the notebook
    tables = [out.data["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert len(tables) == 1 and "| Logistic regression (L-BFGS) | SimCLR | ResNet-18 | 512 | 8 | 1 |" in tables[0]
    assert "| Weighted KNN (k=200, T=0.1) | SimCLR |" in tables[0]
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 3  # t-SNE, confusion matrix, neighbours
    last = [out for out in notebook.cells[-1].outputs if "image/png" in out.get("data", {})]
    assert len(last) == 1 and "neighbours" in notebook.cells[-1].source  # neighbours.png, shown as written
    assert (tiny_checkpoint.parent.parent / "eval" / "last_digits.json").is_file()

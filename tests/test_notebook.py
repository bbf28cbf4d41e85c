"""notebooks/quickstart.ipynb runs end to end (shortened by GMT_NOTEBOOK_SMOKE)."""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient (the test extra) is not installed")
nbformat = pytest.importorskip("nbformat", reason="nbformat (the test extra) is not installed")
pytest.importorskip("transformers", reason="part 3 needs the compare extra (transformers)")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv("GMT_NOTEBOOK_SMOKE", "1")  # the kernel inherits it
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # One CPU device as on Colab: the default config's 3-row batches do not split 8 ways.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  ).execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
  assert "eval_loss" in outputs  # the before/after table

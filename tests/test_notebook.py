"""notebooks/quickstart.ipynb runs end to end (shortened by GMT_NOTEBOOK_SMOKE) and prints
what the run wrote: the before/after table of summary.json, an export transformers reproduces."""

import json
import math
import pathlib
import re

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

  run_dir = re.search(r"^run directory: (.+)$", outputs, re.M).group(1)
  summary = json.loads((pathlib.Path(run_dir) / "summary.json").read_text())
  table = {
    m[1]: (float(m[2]), float(m[3]))
    for m in re.finditer(r"^(\w+) +(\S+) +(\S+)$", outputs, re.M)
    if m[1] in summary["after"]
  }
  assert set(table) == set(summary["after"]) and "eval_loss" in table
  for metric, printed in table.items():
    saved = (summary["before"][metric], summary["after"][metric])
    assert printed == pytest.approx(saved, abs=5e-5), metric
  assert all(math.isfinite(v) for v in table["eval_loss"])

  gap = float(re.search(r"max \|logit difference\| transformers vs train: (\S+)", outputs)[1])
  assert gap < 1e-3

"""`python -m train.study` end to end on a tiny random Llama: the report with its interval
columns and plot, resume skipping finished runs, and one cell reproduced bit for bit.

The last test runs the real `--quick` (SmolLM2, configs/study.yaml) as a user would: 2 min
on a quiet 2-core CPU.
"""

import csv
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.test_train import ROOT, TINY
from train import study
from train.stats import Resampler, items_needed, resolvable_difference, variance_components
from train.study_report import exact_matrix

TRAINER = {
  **TINY,
  "data": {"tokenizer": "bytes", "train_size": 64, "eval_size": 8, "max_length": 64},
  "optimizer": {"lr": 3e-3, "warmup_steps": 1, "selection": "sample", "sample_size": 64},
  "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 4, "tqdm": False},
  "eval": {"size": 8, "max_new_tokens": 4, "generate_batch_size": 8},
  "checkpoint": {"save_final": False},
}


def _write_study(tmp_path) -> str:
  (tmp_path / "trainer.yaml").write_text(yaml.safe_dump(TRAINER))
  spec = {
    "trainer": "trainer.yaml",
    "output_dir": str(tmp_path / "study"),
    "seeds": [0, 1],
    "methods": {
      "sft": {"optimizer.method": "sft"},
      "gmt_0.5": {"optimizer.method": "gmt", "optimizer.mask_ratio": 0.5},
    },
    "tasks": {"sum2": {}},
    "lr_sweep": {"lrs": [3e-3], "task": "sum2", "method": "sft", "seed": 0, "eval_seed": 77},
    "bootstrap": {"samples": 200, "seed": 0},
  }
  path = tmp_path / "study.yaml"
  path.write_text(yaml.safe_dump(spec))
  return str(path)


def test_study_reports_resumes_and_reproduces(tmp_path, monkeypatch):
  config = _write_study(tmp_path)
  out = tmp_path / "study"
  assert study.main(["--config", config]) == 0

  rows = list(csv.DictReader(open(out / "results.csv")))
  assert {(r["method"], r["seed"]) for r in rows} == {
    (m, s) for m in ("sft", "gmt_0.5") for s in ("0", "1")
  }
  assert all(float(r["s_per_step"]) > 0 and float(r["peak_rss_gb"]) > 0 for r in rows)
  report = (out / "results.md").read_text()
  assert "exact match [95%]" in report and "minus SFT [95%]" in report
  assert "Sizing:" in report and "## Conclusion" in report
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  assert list(csv.DictReader(open(out / "sweep.csv")))[0]["validation_items"]
  cell = out / "runs" / "sum2" / "gmt_0.5" / "seed1"
  assert (cell / "config.yaml").is_file() and (cell / "eval_after.jsonl").is_file()
  # The study evaluates before training once per task; every run's logs hold it.
  assert (cell / "eval_before.jsonl").is_file()
  assert json.loads((cell / "eval_log.jsonl").read_text().splitlines()[0])["step"] == 0

  # Resume: finished runs are read back, never rerun; an interrupted one is run again.
  first = json.loads((cell / "study_result.json").read_text())
  (cell / "study_result.json").unlink()
  (cell / "train_log.jsonl").write_text("torn")  # what a killed run leaves
  from train import loop

  ran, original = [], loop.run
  monkeypatch.setattr(
    loop, "run", lambda *a, **k: ran.append(a[0].train.output_dir) or original(*a, **k)
  )
  assert study.main(["--config", config]) == 0
  assert ran == [str(cell)]
  again = json.loads((cell / "study_result.json").read_text())
  # The same config and seed on the same machine: the same numbers, bit for bit.
  assert again["accuracy"] == first["accuracy"] and again["eval_loss"] == first["eval_loss"]
  assert np.array_equal(exact_matrix([first]), exact_matrix([again]))


def test_without_matplotlib_the_study_names_the_extra_before_any_run(tmp_path, monkeypatch, capsys):
  from train import loop

  monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
  monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("a run started"))
  assert study.main(["--config", _write_study(tmp_path)]) == 2
  assert 'pip install "gmt-optax[study]"' in capsys.readouterr().err
  assert not (tmp_path / "study").exists()


def test_report_only_never_trains(tmp_path, monkeypatch):
  from train import loop

  monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("--report-only trained"))
  assert study.main(["--config", _write_study(tmp_path), "--report-only"]) == 1  # none finished


def test_paired_bootstrap_is_fixed_and_paired():
  rng = np.random.default_rng(0)
  a = (rng.random((3, 200)) < 0.6).astype(float)
  same = Resampler(3, 200, 2000, seed=1)
  e1, e2 = same.estimate(a), Resampler(3, 200, 2000, seed=1).estimate(a)
  assert e1 == e2  # fixed bootstrap seed: identical intervals
  assert e1.low < a.mean() < e1.high
  zero = same.estimate(a - a)  # a method against itself: exactly 0, p = 1
  assert (zero.mean, zero.low, zero.high, zero.p_value) == (0.0, 0.0, 0.0, 1.0)
  shifted = same.estimate(np.ones_like(a) * 0.2)
  assert shifted.p_value < 0.001
  # By hand: item variances 2 and 2; seed means 2 and 6, variance 8, less their item noise 2/2.
  assert variance_components(np.array([[1.0, 3.0], [5.0, 7.0]])) == (2.0, 7.0)
  # Seed means that agree better than their item noise allows: no seed component, not < 0.
  assert variance_components(np.array([[0.0, 4.0], [1.0, 3.0]])) == (5.0, 0.0)
  # Drawn with item variance 1 and seed variance 0.09: recovered.
  drawn = rng.normal(0, 0.3, (400, 1)) + rng.normal(0, 1.0, (400, 400))
  item, seed = variance_components(drawn)
  assert item == pytest.approx(1.0, rel=0.02) and seed == pytest.approx(0.09, rel=0.2)
  half = resolvable_difference(item, seed, 3, 200)
  assert items_needed(item, seed, 3, half) == pytest.approx(200, rel=1e-6)


@pytest.mark.parametrize("quick", [False, True])
def test_shipped_study_builds_every_run(quick):
  spec = study.load_study(ROOT / "configs" / "study.yaml", quick=quick)
  grid = study.Study(spec)
  runs = grid.sweep_runs() + grid.grid_runs(3e-5)
  assert len(runs) == len(spec["lr_sweep"]["lrs"]) + len(grid.tasks) * len(grid.methods) * len(
    spec["seeds"]
  )
  # Same steps, schedule and test items for every grid cell; validation items elsewhere.
  cells = [config for _, config in runs[len(spec["lr_sweep"]["lrs"]) :]]
  assert len({(c.train.steps, c.optimizer.schedule, c.data.eval_seed) for c in cells}) == 1
  assert all(c.data.eval_seed != spec["lr_sweep"]["eval_seed"] for c in cells)


def test_study_overrides_split_between_runs_and_the_study(tmp_path):
  config = _write_study(tmp_path)
  spec = study.load_study(config, ["data.task=basic_arithmetic", "study.seeds=[5]"])
  assert spec["seeds"] == [5]
  assert "data.task=basic_arithmetic" in spec["overrides"]
  grid = study.Study(spec).grid_runs(1e-3)
  assert [c.data.shuffle_seed for _, c in grid] == [5, 5]
  assert {c.optimizer.lr for _, c in grid} == {1e-3}
  assert len({c.data.eval_seed for _, c in grid}) == 1


def test_quick_study_on_the_real_model(tmp_path, smollm2_path):
  """`--quick` as documented (SmolLM2, 1 seed, SFT and GMT, 8 steps, 40 items): about 2 min
  on a quiet 2-core CPU."""
  out = tmp_path / "quick"
  result = subprocess.run(
    [sys.executable, "-m", "train.study", "--config", "configs/study.yaml", "--quick"]
    + [f"study.output_dir={out}", f"study.report_dir={out}"],
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": ""},  # one CPU device, as a user's run has
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
  assert sorted(rows) == ["gmt_0.5", "sft"]
  # One seed: each method's exact match is its run's accuracy, inside its interval; the
  # difference to SFT is the difference of the two runs' accuracies, inside its interval.
  table = _report_rows((out / "results.md").read_text())
  assert sorted(table) == sorted(rows)
  for method, row in rows.items():
    printed = table[method]
    accuracy = 100 * float(row["accuracy"])
    mean, low, high = _interval(printed["exact match [95%]"])
    assert mean == pytest.approx(accuracy, abs=0.05) and low <= mean <= high
    assert float(printed["held-out loss"].split()[0]) == pytest.approx(
      float(row["eval_loss"]), abs=5e-4
    )
  gain, low, high = _interval(table["gmt_0.5"]["minus SFT [95%]"])
  expected = 100 * (float(rows["gmt_0.5"]["accuracy"]) - float(rows["sft"]["accuracy"]))
  assert gain == pytest.approx(expected, abs=0.1) and low <= gain <= high


def _report_rows(report: str) -> dict[str, dict[str, str]]:
  """{method: {column: cell}} of the (one task's) results table in results.md."""
  lines = report.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
  header = [cell.strip() for cell in lines[start].strip("| ").split("|")]
  rows = {}
  for line in itertools.takewhile(lambda line: line.startswith("| "), lines[start + 2 :]):
    row = dict(zip(header, (cell.strip() for cell in line.strip("| ").split("|"))))
    rows[row["method"]] = row
  return rows


def _interval(cell: str) -> tuple[float, float, float]:
  """``41.6 [34.0, 49.3]`` -> (41.6, 34.0, 49.3)."""
  mean, low, high = map(float, re.findall(r"-?\d+(?:\.\d+)?", cell))
  return mean, low, high

"""GMT against SFT and its controls: a grid of tasks x methods x seeds in one command.

CLI::

    python -m train.study --config configs/study.yaml [--quick] [--report-only] [key=value ...]

`key=value` overrides go to every run (`data.task=...`), `study.key=value` to the study
itself (`study.output_dir=...`). First a small SFT sweep picks the learning rate on
validation items (another eval seed; items that are also test items are not scored), then
every cell trains with it and is scored on the fixed test items. Everything runs in ONE
process that loads the model, prepares each data set and scores the model before training
once (`train.loop.run(..., cache=...)`); each cell compiles its own step.

Resumable run by run: a run directory with `study_result.json` and the same config is
finished and never redone; any other run directory (an interrupted run, or one of an
earlier config) is removed and run again. Output in
`study.output_dir`: `runs/<task>/<method>/seed<S>/` and `sweep/<task>/lr<LR>/` (each with
its `config.yaml`, `summary.json`, per-item `eval_after.jsonl`), `results.csv`,
`sweep.csv`; the report (`train.study_report`), `results.md` and `results.png`, goes to
`study.report_dir` (default: the output dir; configs/study.yaml: docs/).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import yaml

from train import study_report
from train.config import ConfigError, load_config
from train.examples import canonical_problem, reasoning_gym_examples
from train.paths import RunPaths
from train.records import read_jsonl

# The columns of results.csv, one row per run.
COLUMNS = (
  "task",
  "method",
  "optimizer",
  "mask_ratio",
  "seed",
  "lr",
  "accuracy",
  "eval_loss",
  "accuracy_before",
  "eval_loss_before",
  "items",
  "s_per_step",
  "peak_rss_gb",
  "steps",
  "wall_s",
  "load_average",
  "run_dir",
)


def nested(flat: dict) -> dict:
  """{"data.task": x} -> {"data": {"task": x}}; nested values are kept as they are."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def load_study(path: str | Path, overrides: list[str] = (), quick: bool = False) -> dict:
  """The study section of the YAML, with `--quick`'s values and `study.` overrides applied.

  Returns the study dict with `trainer` resolved to a path and `overrides` a list of the
  trainer overrides for every run (the YAML's, then the command line's).
  """
  path = Path(path)
  study = yaml.safe_load(path.read_text())
  if quick:
    study.update(study.pop("quick", {}))
  study.pop("quick", None)
  study["config"] = str(path)
  study["trainer"] = str(path.parent / study["trainer"])
  run_overrides = [f"{k}={json.dumps(v)}" for k, v in study.get("overrides", {}).items()]
  for item in overrides:
    key, _, raw = item.partition("=")
    if key.startswith("study."):
      study[key.removeprefix("study.")] = yaml.safe_load(raw)
    else:
      run_overrides.append(item)
  study["overrides"] = run_overrides
  return study


def _seeded(seed: int) -> dict:
  """A seed changes the data order and the mask's randomness, never the eval items."""
  return {"data": {"shuffle_seed": seed}, "optimizer": {"seed": seed}}


class Study:
  """The grid of one study: its configs, its run directories and what they hold."""

  def __init__(self, study: dict):
    self.spec = study
    self.out = Path(study["output_dir"])
    self.base = load_config(study["trainer"], study["overrides"])
    # `only_methods` / `only_tasks` (as --quick sets them) keep a part of the grid.
    self.methods = {m: study["methods"][m] for m in study.get("only_methods", study["methods"])}
    self.tasks = {t: study["tasks"][t] for t in study.get("only_tasks", study["tasks"])}

  def config(self, task: str, layers: list[dict], output_dir: Path):
    """The trainer config of one run: base, the task's, then `layers`, then its directory."""
    config = load_config(self.base, nested(self.tasks[task]))
    for layer in layers:
      config = load_config(config, layer)
    return load_config(config, {"train": {"output_dir": str(output_dir)}})

  def sweep_runs(self) -> list[tuple[dict, object]]:
    """(row fields, config) of each learning rate of the SFT sweep, on validation items."""
    sweep = self.spec["lr_sweep"]
    runs = []
    for lr in sweep["lrs"]:
      output_dir = self.out / "sweep" / sweep["task"] / f"lr{lr:g}"
      layers = [
        nested(self.methods[sweep["method"]]),
        _seeded(sweep["seed"]),
        {"optimizer": {"lr": lr}, "data": {"eval_seed": sweep["eval_seed"]}},
        {"eval": {"before": False}},
        nested(sweep.get("overrides", {})),
      ]
      fields = {"task": sweep["task"], "method": sweep["method"], "seed": sweep["seed"]}
      runs.append((fields, self.config(sweep["task"], layers, output_dir)))
    return runs

  def grid_runs(self, lr: float) -> list[tuple[dict, object]]:
    """(row fields, config) of every cell, task by task, seed by seed, method by method."""
    runs = []
    for task in self.tasks:
      for seed in self.spec["seeds"]:
        for method, overrides in self.methods.items():
          output_dir = self.out / "runs" / task / method / f"seed{seed}"
          layers = [nested(overrides), _seeded(seed), {"optimizer": {"lr": lr}}]
          fields = {"task": task, "method": method, "seed": seed}
          runs.append((fields, self.config(task, layers, output_dir)))
    return runs


def _peak_rss_gb() -> float:
  """The process's peak resident memory so far (Linux reports KiB): a high-water mark."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_once(fields: dict, config, cache: dict) -> dict:
  """One run, unless its directory already holds a finished one; returns its row."""
  from train.loop import run  # here: config errors are reported before JAX is imported

  out = Path(config.train.output_dir)
  result_path = RunPaths(out).study_result
  if result_path.is_file() and load_config(RunPaths(out).config) == config:
    return json.loads(result_path.read_text())
  if out.exists():  # an interrupted run: start it again from nothing
    shutil.rmtree(out)
  started = time.time()
  summary = run(config, cache=cache)
  after, before = summary["after"], summary.get("before", {})
  row = {
    **fields,
    "optimizer": config.optimizer.method,
    "mask_ratio": config.optimizer.mask_ratio
    if config.optimizer.method in ("gmt", "random_mask")
    else "",
    "lr": config.optimizer.lr,
    "accuracy": after["accuracy"],
    "eval_loss": after["eval_loss"],
    "accuracy_before": before.get("accuracy", ""),
    "eval_loss_before": before.get("eval_loss", ""),
    "items": after["items"],
    "s_per_step": summary["median_step_time_s"],
    "peak_rss_gb": round(_peak_rss_gb(), 3),
    "steps": summary["steps"],
    "wall_s": round(time.time() - started, 1),
    "load_average": round(summary["load_average"][0], 2),
    "run_dir": str(out),
  }
  result_path.write_text(json.dumps(row, indent=1))  # written last: the run is finished
  return row


SWEEP_COLUMNS = COLUMNS + ("validation_items", "validation_accuracy")


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _test_forms(study: Study, task: str) -> set[str]:
  """Canonical forms of the test items of `task` (what validation must not score)."""
  _, held_out, _ = reasoning_gym_examples(study.config(task, [], study.out).data)
  return {canonical_problem(example.entry) for example in held_out}


def validation_accuracy(study: Study, row: dict, config) -> dict:
  """The sweep run's accuracy on its validation items that are not test items."""
  _, validation, _ = reasoning_gym_examples(config.data)
  test_forms = _test_forms(study, row["task"])
  records = read_jsonl(RunPaths(row["run_dir"]).eval_samples("after"))
  kept = [
    r
    for r, example in zip(records, validation)
    if canonical_problem(example.entry) not in test_forms
  ]
  return {
    **row,
    "validation_items": len(kept),
    "validation_accuracy": sum(r["exact"] for r in kept) / max(len(kept), 1),
  }


def choose_lr(sweep_rows: list[dict]) -> float:
  """The highest validation accuracy; a tie goes to the lower held-out loss."""
  best = max(sweep_rows, key=lambda r: (r["validation_accuracy"], -r["eval_loss"]))
  return float(best["lr"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.study", description=__doc__)
  parser.add_argument("--config", default="configs/study.yaml", help="the study's YAML")
  parser.add_argument("--quick", action="store_true", help="the YAML's `quick:` settings")
  parser.add_argument(
    "--report-only", action="store_true", help="only rewrite the report from finished runs"
  )
  parser.add_argument("overrides", nargs="*", help="key=value for every run; study.key=value")
  args = parser.parse_args(argv)
  try:
    study = Study(load_study(args.config, args.overrides, args.quick))
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  try:  # before any run: a missing plotting package must not cost a finished study
    study_report.pyplot()
  except ImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  study.out.mkdir(parents=True, exist_ok=True)
  cache: dict = {}
  sweep_rows = []
  for fields, config in study.sweep_runs():
    if args.report_only and not RunPaths(config.train.output_dir).study_result.is_file():
      continue
    row = run_once(fields, config, cache)
    sweep_rows.append(validation_accuracy(study, row, config))
    print(f"[study] sweep lr {row['lr']:g}: validation {sweep_rows[-1]['validation_accuracy']:.3f}")
  write_csv(study.out / "sweep.csv", sweep_rows, SWEEP_COLUMNS)
  if not sweep_rows:
    print("[study] no finished sweep run: nothing to report", file=sys.stderr)
    return 1
  lr = choose_lr(sweep_rows)
  rows = []
  for fields, config in study.grid_runs(lr):
    if args.report_only and not RunPaths(config.train.output_dir).study_result.is_file():
      continue
    rows.append(run_once(fields, config, cache))
    r = rows[-1]
    print(f"[study] {r['task']} {r['method']} seed {r['seed']}: accuracy {r['accuracy']:.3f}")
    write_csv(study.out / "results.csv", rows)
  write_csv(study.out / "results.csv", rows)
  study_report.write(study, sweep_rows, rows, lr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

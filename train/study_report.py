"""The study's report: `results.md` (tables, sizing arithmetic, conclusion) and `results.png`.

Everything is recomputed from the finished runs' rows and their per-item records
(`eval_after.jsonl`), so `--report-only` rewrites the same report at any time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from train.paths import RunPaths
from train.records import read_jsonl
from train.stats import (
  Resampler,
  items_needed,
  resolvable_difference,
  seeds_interval,
  variance_components,
)

BASELINE = "sft"


def exact_matrix(rows: list[dict]) -> np.ndarray:
  """[seeds, items] exact match (0/1) of one method's runs, in the rows' seed order."""
  matrix = []
  for row in rows:
    records = read_jsonl(RunPaths(row["run_dir"]).eval_samples("after"))
    matrix.append([record["exact"] for record in records])
  return np.array(matrix, np.float64)


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _interval(estimate) -> str:
  return f"{_pct(estimate.mean)} [{_pct(estimate.low)}, {_pct(estimate.high)}]"


def _p(p: float) -> str:
  return "< 0.001" if p < 0.001 else f"{p:.3f}"


class _Draws:
  """One `Resampler` per matrix shape, all from the same seed: the same shape gets the same
  draws, so a method and its difference to SFT are resampled alike."""

  def __init__(self, samples: int, seed: int):
    self.samples, self.seed, self._by_shape = samples, seed, {}

  def __call__(self, shape) -> Resampler:
    if shape not in self._by_shape:
      self._by_shape[shape] = Resampler(*shape, self.samples, self.seed)
    return self._by_shape[shape]


def task_results(rows: list[dict], methods: list[str], draws: _Draws) -> list[dict]:
  """Per method: accuracy and loss intervals, the paired difference to SFT, cost."""
  by_method = {
    m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"]) for m in methods
  }
  baseline = {r["seed"]: r for r in by_method.get(BASELINE, [])}
  results = []
  for method, runs in by_method.items():
    if not runs:
      continue
    matrix = exact_matrix(runs)
    loss_mean, loss_half = seeds_interval([r["eval_loss"] for r in runs])
    result = {
      "method": method,
      "mask_ratio": runs[0]["mask_ratio"],
      "seeds": len(runs),
      "items": matrix.shape[1],
      "accuracy": draws(matrix.shape).estimate(matrix),
      "loss": (loss_mean, loss_half),
      "s_per_step": float(np.median([r["s_per_step"] for r in runs])),
      "peak_rss_gb": max(float(r["peak_rss_gb"]) for r in runs),
    }
    paired = [r for r in runs if r["seed"] in baseline]
    if method != BASELINE and paired:
      difference = exact_matrix(paired) - exact_matrix([baseline[r["seed"]] for r in paired])
      result["difference"] = draws(difference.shape).estimate(difference)
      result["difference_matrix"] = difference
    results.append(result)
  return results


def pyplot():
  """matplotlib's pyplot, drawing to files (no display); an ImportError naming the `study`
  extra when matplotlib is not installed."""
  try:
    import matplotlib  # here: an optional package (the study extra), loaded only to draw
  except ImportError as e:
    raise ImportError(
      'the study draws its plot with matplotlib: pip install "gmt-optax[study]"'
    ) from e

  matplotlib.use("Agg")  # before pyplot is imported
  import matplotlib.pyplot as plt

  return plt


def _plot(path: Path, tasks: dict[str, list[dict]]) -> None:
  """Accuracy against mask ratio, one panel per task: GMT with its intervals, the SFT band,
  random masking and HFT at 0.5."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
  for ax, (task, results) in zip(axes[0], tasks.items()):
    by = {r["method"]: r for r in results}
    if BASELINE in by:
      a = by[BASELINE]["accuracy"]
      ax.axhspan(a.low, a.high, color="tab:gray", alpha=0.25, label="SFT 95% interval")
      ax.axhline(a.mean, color="tab:gray", lw=1.5, label="SFT")
    gmt = sorted(
      (r for r in results if r["method"].startswith("gmt")), key=lambda r: r["mask_ratio"]
    )
    if gmt:
      x = [float(r["mask_ratio"]) for r in gmt]
      y = [r["accuracy"].mean for r in gmt]
      err = [
        [r["accuracy"].mean - r["accuracy"].low for r in gmt],
        [r["accuracy"].high - r["accuracy"].mean for r in gmt],
      ]
      ax.errorbar(x, y, yerr=err, marker="o", capsize=4, color="tab:blue", label="GMT")
    for method, marker, color, shift in (
      ("random_mask_0.5", "s", "tab:orange", -0.02),
      ("hft", "^", "tab:green", 0.02),
    ):
      if method in by:
        a = by[method]["accuracy"]
        ax.errorbar(
          [0.5 + shift],
          [a.mean],
          yerr=[[a.mean - a.low], [a.high - a.mean]],
          marker=marker,
          capsize=4,
          color=color,
          ls="none",
          label="random mask 0.5" if method != "hft" else "HFT (half frozen)",
        )
    seeds = max(r["seeds"] for r in results)
    items = max(r["items"] for r in results)
    ax.set(
      title=f"{task} ({seeds} seeds x {items} items)",
      xlabel="mask ratio (fraction zeroed)",
      ylabel="held-out exact match",
      xlim=(0.1, 0.9),
    )
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


TELEMETRY_PANELS = (
  ("kept_energy", "kept gradient energy ||g*m||^2 / ||g||^2"),
  ("jaccard", "mask stability (Jaccard with the previous update)"),
  ("coverage", "coverage (sampled entries ever updated)"),
)


def telemetry_curves(rows: list[dict]) -> dict[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Per mask ratio, per statistic of `TELEMETRY_PANELS`: (steps, values), each value the
  mean over the runs of that ratio of the mean over every masked tensor and layer (NaN, as a
  first update's Jaccard, left out). Runs logged without telemetry are skipped."""
  by_ratio: dict[float, list[dict]] = {}
  for row in rows:
    records = read_jsonl(RunPaths(row["run_dir"]).train_log)
    per_step = {}
    for record in records:
      if "mask" not in record:
        continue
      values = {name: [] for name, _ in TELEMETRY_PANELS}
      for statistics in record["mask"].values():
        for name in values:
          values[name] += np.atleast_1d(statistics[name]).tolist()
      per_step[record["step"]] = {
        name: np.nanmean(v) if np.isfinite(v).any() else np.nan for name, v in values.items()
      }
    if per_step:
      by_ratio.setdefault(float(row["mask_ratio"]), []).append(per_step)
  curves = {}
  for ratio, runs in sorted(by_ratio.items()):
    steps = np.array(sorted(set().union(*runs)))
    curves[ratio] = {}
    for name, _ in TELEMETRY_PANELS:
      table = np.array([[run.get(s, {}).get(name, np.nan) for s in steps] for run in runs])
      finite = np.isfinite(table).any(axis=0)
      curves[ratio][name] = (
        steps[finite],
        np.nanmean(table[:, finite], axis=0) if finite.any() else np.array([]),
      )
  return curves


def plot_telemetry(path: Path, rows: list[dict]) -> bool:
  """Kept gradient energy, mask stability and coverage against the step, one line per mask
  ratio (the mean over that ratio's runs, tasks and seeds, and over every masked tensor and
  layer); False, and no file, when no run logged mask telemetry."""
  curves = telemetry_curves(rows)
  if not curves:
    return False
  plt = pyplot()
  fig, axes = plt.subplots(1, len(TELEMETRY_PANELS), figsize=(5 * len(TELEMETRY_PANELS), 3.6))
  for ax, (name, label) in zip(axes, TELEMETRY_PANELS):
    for ratio, statistics in curves.items():
      steps, values = statistics[name]
      ax.plot(steps, values, marker=".", label=f"GMT mask ratio {ratio:g}")
    ax.set(title=label, xlabel="optimizer step", ylim=(0, 1.02))
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _sizing(results: list[dict], seeds: int, items: int) -> list[str]:
  """The arithmetic that sizes the test set: variance components of the GMT - SFT differences
  measured here, the difference this study resolves, and the items a 3-point one needs."""
  differences = [  # only methods with every seed: a missing seed would read as no seed variance
    r["difference_matrix"]
    for r in results
    if "difference_matrix" in r and r["difference_matrix"].shape[0] == seeds
  ]
  if not differences or seeds < 2:
    return ["(sizing needs at least 2 seeds per method)"]
  components = np.array([variance_components(d) for d in differences])
  item, seed = components.mean(axis=0)
  half = resolvable_difference(item, seed, seeds, items)
  need = items_needed(item, seed, seeds, 0.03)
  seeds_for_3 = next(
    (s for s in range(seeds, 201) if items_needed(item, seed, s, 0.03) <= items), None
  )
  return [
    f"Per-item variance of a method's difference to SFT (same seed, same item), averaged "
    f"over the {len(differences)} methods: {item:.4f}; variance of the per-seed mean "
    f"difference beyond item noise: {seed:.5f}.",
    f"95% half-width at {seeds} seeds x {items} items: 1.96 * sqrt({item:.4f} / ({seeds} * "
    f"{items}) + {seed:.5f} / {seeds}) = {_pct(half)} points.",
    "Items per seed for a 3-point half-width at "
    f"{seeds} seeds: {item:.4f} / ({seeds} * ((0.03 / 1.96)^2 - {seed:.5f} / {seeds})) = "
    + ("impossible (the seed term alone exceeds it)" if need == float("inf") else f"{need:.0f}")
    + "."
    + (f" With {items} items, {seeds_for_3} seeds would resolve 3 points." if seeds_for_3 else ""),
  ]


def _budget(finished: list[dict], missing: int) -> list[str]:
  """What the runs cost here and what the missing ones would: the arithmetic behind the size."""
  if not finished:
    return []
  walls = np.array([float(r["wall_s"]) for r in finished])
  steps = np.array([float(r["s_per_step"]) for r in finished])
  loads = np.array([float(r["load_average"]) for r in finished])
  lines = [
    "## Budget",
    "",
    f"All runs ran one after another in one process on this machine (2 CPU cores shared "
    f"with other jobs: 1-minute load average {loads.min():.1f}-{loads.max():.1f} at the runs' "
    f"ends). Per run: median {np.median(walls):.0f} s wall (the first run of a task also "
    f"loads and scores the model before training), median step {np.median(steps):.2f} s "
    f"(range {steps.min():.2f}-{steps.max():.2f}); {walls.sum() / 3600:.2f} h in all.",
  ]
  if missing:
    lines.append(
      f"The {missing} runs not finished would take about {missing} x {np.median(walls):.0f} s"
      f" = {missing * np.median(walls) / 3600:.1f} h more at the same pace "
      "(`python -m train.study` resumes where this stopped)."
    )
  return lines + [""]


def _conclusion(task: str, results: list[dict], draws: _Draws) -> str:
  """A plain verdict from the paired differences: GMT against SFT, then against random
  masking of the same sparsity (what choosing by |g| is worth), then the controls."""
  compared = {r["method"]: r for r in results if "difference" in r}
  if not compared:
    return f"- {task}: no method has a paired SFT run yet."
  parts = [f"- `{task}`:"]
  gmt = [r for m, r in compared.items() if m.startswith("gmt")]
  for r in gmt:
    parts.append(
      f"{r['method']} minus SFT {_signed(r['difference'])} points (p {_p(r['difference'].p_value)});"
    )
  separable = [r["method"] for r in gmt if r["difference"].low > 0 or r["difference"].high < 0]
  parts.append(
    f"GMT differs from SFT at {', '.join(separable)}."
    if separable
    else "no GMT mask ratio is separable from SFT at this size (every interval contains 0)."
  )
  for method, r in compared.items():
    if not method.startswith("random_mask"):
      continue
    twin = compared.get(f"gmt_{r['mask_ratio']}")
    if twin and twin["difference_matrix"].shape == r["difference_matrix"].shape:
      d = twin["difference_matrix"] - r["difference_matrix"]  # paired on seed and item
      e = draws(d.shape).estimate(d)
      parts.append(
        f"GMT minus random masking at ratio {r['mask_ratio']}: {_signed(e)} points (p {_p(e.p_value)})."
      )
  for method in ("random_mask_0.5", "hft"):
    if method in compared:
      d = compared[method]["difference"]
      verdict = "below" if d.high < 0 else "above" if d.low > 0 else "not separable from"
      parts.append(f"{method} is {verdict} SFT ({_signed(d)}).")
  return " ".join(parts)


def _overall(tasks: dict[str, list[dict]]) -> str:
  """One sentence over all tasks: is GMT better than SFT anywhere, by how much at most."""
  gmt = [r for results in tasks.values() for r in results if r["method"].startswith("gmt")]
  gmt = [r for r in gmt if "difference" in r]
  if not gmt:
    return "Overall: no GMT run has a paired SFT run yet."
  wins = [r for r in gmt if r["difference"].low > 0]
  losses = [r for r in gmt if r["difference"].high < 0]
  best = max(gmt, key=lambda r: r["difference"].mean)
  if wins:
    return (
      "Overall, favourable to GMT: its accuracy is above SFT's, beyond the 95% interval, "
      f"for {', '.join(r['method'] for r in wins)}."
    )
  return (
    "Overall, not a demonstrated gain: no GMT mask ratio beats SFT beyond its 95% interval "
    f"(the best, {best['method']}, by {_signed(best['difference'])} points)"
    + (f"; {', '.join(r['method'] for r in losses)} fall below it" if losses else "")
    + ". Each task's Sizing line gives the items or seeds that would resolve 3 points."
  )


def _signed(estimate) -> str:
  return f"{100 * estimate.mean:+.1f} [{100 * estimate.low:+.1f}, {100 * estimate.high:+.1f}]"


def _title(study) -> list[str]:
  """The heading and how the report was made (the command, the date, its sources)."""
  return [
    "# GMT against SFT: the study",
    "",
    f"Generated by `python -m train.study --config {study.spec['config']}` "
    f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; every number below is "
    f"recomputed from `{study.out}/results.csv` and the runs' per-item `eval_after.jsonl` "
    "(`--report-only`).",
    "",
  ]


def _setup(study, rows: list[dict], sweep_rows: list[dict], planned: int) -> list[str]:
  """Model, data, training, tasks, methods and seeds shared by every run; how many finished."""
  base, spec = study.base, study.spec
  return [
    "## Setup",
    "",
    f"- Model `{base.model.path}`; data `{base.data.source}` `{base.data.task}`, "
    f"{base.data.train_size} training items (seed {base.data.train_seed}), test items from "
    f"eval seed {base.data.eval_seed} (no training problem up to reordering).",
    f"- Every run: {base.train.steps} steps of {base.train.batch_size} packed rows of "
    f"{base.data.max_length} tokens, AdamW, {base.optimizer.schedule} lr after "
    f"{base.optimizer.warmup_steps} warmup steps, clip {base.optimizer.clip_norm}; greedy "
    f"decoding of {base.eval.max_new_tokens} tokens, exact match of the last number.",
    "- Tasks: "
    + "; ".join(
      f"`{t}` {json.dumps(o) if o else '(the default config)'}" for t, o in study.tasks.items()
    )
    + ".",
    "- Methods: " + "; ".join(f"`{m}` {json.dumps(o)}" for m, o in study.methods.items()) + ".",
    f"- Seeds {spec['seeds']}: a seed sets `data.shuffle_seed` (data order) and "
    "`optimizer.seed` (mask and freeze randomness); the test items are the same for all.",
    f"- Runs finished: {len(rows)} of {planned} planned, plus {len(sweep_rows)} sweep runs.",
    "",
  ]


def _lr_sweep(spec: dict, sweep_rows: list[dict], lr: float) -> list[str]:
  """The SFT learning-rate sweep: one table row per lr, the chosen one marked."""
  sweep = spec["lr_sweep"]
  lines = [
    f"## Learning rate (SFT sweep, seed {sweep['seed']}, task `{sweep['task']}`)",
    "",
    f"Validation items from eval seed {sweep['eval_seed']}; those whose problem "
    "(up to reordering) is a test item are not scored, so validation and test are disjoint. "
    "The held-out loss is over all validation items.",
    "",
    "| lr | validation items | validation exact match | held-out loss | chosen |",
    "| --- | --- | --- | --- | --- |",
  ]
  for r in sweep_rows:
    lines.append(
      f"| {r['lr']:g} | {r['validation_items']} | {_pct(r['validation_accuracy'])} | "
      f"{r['eval_loss']:.3f} | {'yes' if float(r['lr']) == lr else ''} |"
    )
  return lines + ["", f"Every grid run uses lr {lr:g}.", ""]


def _results_intro(bootstrap: dict) -> list[str]:
  """How to read the results tables (the bootstrap, the columns) and the accuracy plot."""
  return [
    "## Results",
    "",
    "Exact match in percent: mean over seeds and items with the 95% percentile interval of a "
    f"paired bootstrap ({bootstrap['samples']} samples, numpy seed "
    f"{bootstrap['seed']}) that draws seeds and items with replacement; the "
    "difference to SFT is resampled per (seed, item) pair, p is its two-sided bootstrap "
    "p-value. With 3 seeds the seed draws take only 10 distinct multisets and understate the "
    "seed variance by a factor (S - 1) / S: read the intervals as approximate, and the Sizing "
    "lines for what more seeds would buy. Held-out loss: mean over seeds ± the 95% t half-width over seeds. s/step: median "
    "over the runs of each run's median step time (compilation excluded). Peak RSS: all "
    "runs share one process, so this is the process's high-water mark at the end of the "
    "method's last run, cumulative over every run before it (model, data and compiled steps "
    "of earlier runs included), an upper bound on one run's.",
    "",
    "![accuracy against mask ratio](results.png)",
    "",
  ]


def _task_section(task: str, results: list[dict], task_rows: list[dict]) -> list[str]:
  """One task (its `task_rows`): its score before training, a table row per method, the
  sizing arithmetic."""
  before = next((r for r in task_rows if r["accuracy_before"] != ""), None)
  lines = [f"### `{task}`", ""]
  if before:
    lines += [
      f"Before training: exact match {_pct(float(before['accuracy_before']))}, held-out "
      f"loss {float(before['eval_loss_before']):.3f}.",
      "",
    ]
  lines += [
    "| method | mask ratio | seeds x items | exact match [95%] | held-out loss | "
    "minus SFT [95%] | p | s/step | peak RSS GB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in results:
    d = r.get("difference")
    lines.append(
      f"| {r['method']} | {r['mask_ratio']} | {r['seeds']} x {r['items']} | "
      f"{_interval(r['accuracy'])} | {r['loss'][0]:.3f} ± {r['loss'][1]:.3f} | "
      f"{_interval(d) if d else ''} | {_p(d.p_value) if d else ''} | "
      f"{r['s_per_step']:.2f} | {r['peak_rss_gb']:.1f} |"
    )
  seeds = max(r["seeds"] for r in results)
  items = max(r["items"] for r in results)
  return lines + ["", "Sizing: " + " ".join(_sizing(results, seeds, items)), ""]


def _notes(notes: list[str] | None) -> list[str]:
  """The study's own notes (`notes:` in its YAML), one bullet each; nothing when it has none."""
  if not notes:
    return []
  return ["## Notes", ""] + [f"- {' '.join(note.split())}" for note in notes] + [""]


def _telemetry_section(path: Path, rows: list[dict]) -> list[str]:
  """Plots the mask telemetry to `path` and describes it; nothing when no run logged any."""
  if not plot_telemetry(path, rows):
    return []
  return [
    "## Mask telemetry",
    "",
    "What the mask did in the GMT runs (`optimizer.telemetry`), against the step: the "
    "fraction of squared gradient norm it kept, the Jaccard overlap of its kept set with the "
    "previous update's and the fraction of entries updated at least once so far (both on a "
    "fixed sample of 1024 entries per tensor and layer). Each line is a mask ratio: the mean "
    "over its runs of the mean over every masked tensor and layer (docs/training.md, "
    '"Mask telemetry").',
    "",
    f"![mask telemetry against the step]({path.name})",
    "",
  ]


def _conclusion_section(tasks: dict[str, list[dict]], draws: _Draws) -> list[str]:
  """A verdict per task, then one over all of them."""
  conclusions = [_conclusion(task, results, draws) for task, results in tasks.items()]
  return ["## Conclusion", ""] + conclusions + ["", _overall(tasks)]


def write(study, sweep_rows: list[dict], rows: list[dict], lr: float) -> Path:
  """Writes `results.md` and `results.png` in the study's `report_dir`; returns the report."""
  spec = study.spec
  report_dir = Path(spec.get("report_dir", study.out))
  report_dir.mkdir(parents=True, exist_ok=True)
  draws = _Draws(spec["bootstrap"]["samples"], spec["bootstrap"]["seed"])
  methods = list(study.methods)
  by_task = {task: [r for r in rows if r["task"] == task] for task in study.tasks}
  by_task = {task: task_rows for task, task_rows in by_task.items() if task_rows}
  tasks = {task: task_results(task_rows, methods, draws) for task, task_rows in by_task.items()}
  _plot(report_dir / "results.png", tasks)
  planned = len(study.tasks) * len(study.methods) * len(spec["seeds"])
  lines = [
    *_title(study),
    *_setup(study, rows, sweep_rows, planned),
    *_budget(rows + sweep_rows, planned - len(rows)),
    *_lr_sweep(spec, sweep_rows, lr),
    *_results_intro(spec["bootstrap"]),
    *(line for task in tasks for line in _task_section(task, tasks[task], by_task[task])),
    *_notes(spec.get("notes")),
    *_telemetry_section(report_dir / "mask_telemetry.png", rows),
    *_conclusion_section(tasks, draws),
  ]
  report = report_dir / "results.md"
  report.write_text("\n".join(lines) + "\n")
  return report

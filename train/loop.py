"""The training job, top to bottom: set up -> evaluate -> train -> evaluate -> export -> summary.

`run(config)` validates the config, starts multi-host JAX when asked and claims the output
directory; `train.run_setup.setup_run` builds the mesh, model, data and steps once (a `Run`);
the `Evaluator` scores the held-out data before, every `eval.every` steps and after; the
`Trainer` runs the updates with per-step logs (`metrics.loggers`) and Orbax checkpoints.
Everything it writes goes under `train.output_dir` (`train.paths.RunPaths`). Asked to stop
(SIGTERM, SIGINT), it finishes the current step, saves it and raises `Preempted`; an
evaluation stops after its current batch (one during training saves its step, and the resume
runs it first); after the last step, the export stops at once (one process; with several it
finishes), and the resume from the final checkpoint runs only the evaluation after training
and the export. Once everything is written, a stop request changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from train import run_dir
from train.checkpoints import (
  PREEMPTED_EXIT_CODE,
  Checkpoints,
  Interrupted,
  Preempted,
  Preemption,
  check_fingerprint,
  check_state,
  data_fingerprint,
  state_fingerprint,
)
from train.config import Config, load_config
from train.eval.evaluator import EvaluationStopped, Evaluator, all_sequence_logps
from train.examples import check_task_options
from train.mesh import check_same_config, initialize_distributed
from train.metrics import Meter, MetricWriter, flops_per_token, peak_flops_per_device
from train.models.pretrained import export_pretrained
from train.models.tokenizer import AlpacaTemplate, ByteTokenizer
from train.paths import RunPaths
from train.records import log, read_jsonl
from train.run_setup import Run, setup_run, shared
from train.stats import paired_gain
from train.step import reference_copy


def _show(summary: dict) -> None:
  """The closing printout: exact match before/after with intervals, the paired gain, held-out
  loss, the most common answer's share, and three held-out problems before and after."""
  lines = []
  for tag in ("before", "after"):
    r = summary.get(tag, {})
    if "rewards/accuracies" in r:
      lines.append(
        f"{tag:>6}: preference accuracy (reward margin > 0) {r['rewards/accuracies']:.1%}, "
        f"mean reward margin {r['rewards/margins']:+.3f}, chosen more likely than rejected "
        f"{r['chosen_logp_higher']:.1%}, held-out DPO loss {r['eval_loss']:.4f}"
      )
    if "accuracy" in r and "accuracy_ci95" not in r:  # a benchmark's score
      lines.append(
        f"{tag:>6}: benchmark accuracy {r['accuracy']:.1%}, "
        f"held-out loss {r.get('eval_loss', float('nan')):.3f}"
      )
    elif "accuracy" in r:
      lo, hi = r["accuracy_ci95"]
      lines.append(
        f"{tag:>6}: exact match {r['exact_matches']}/{r['items']} = "
        f"{r['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}), held-out loss "
        f"{r.get('eval_loss', float('nan')):.3f}, most common answer "
        f"{r['top_answer']!r} in {r['top_answer_share']:.0%} of predictions, "
        f"task score (partial credit) {r['score']:.3f}"
      )
  if "gain" in summary:
    g = summary["gain"]
    lo, hi = g["accuracy_gain_ci95"]
    lines.append(
      f"  gain: {g['accuracy_gain']:+.1%} exact match (paired 95% CI {lo:+.1%} to "
      f"{hi:+.1%}; {g['fixed']} items fixed, {g['broken']} broken)"
    )
  for example in summary.get("examples", []):
    lines.append(f"  Q: {example['question']}  (answer {example['reference']})")
    for tag in ("before", "after"):
      lines.append(f"    {tag:>6}: {example[tag]!r}")
  if lines:
    log("\n".join(["results on the held-out items:"] + lines))


def run(config_source="configs/default.yaml", overrides=None, cache: dict | None = None) -> dict:
  """Runs the whole job; returns {"before": ..., "after": ..., "steps": ..., ...}.

  Args:
    config_source: a YAML path, a dict or a `Config`.
    overrides: dotted `section.key=value` strings or a nested dict, applied over it.
    cache: a dict that runs in one process share (`train.study`): the loaded model, the
      prepared data, the compiled steps and the evaluation before training are kept there,
      keyed by the config sections they depend on, and reused by a later run that agrees.
  """
  started = time.time()
  config = load_config(config_source, overrides)  # all validation happens here, before any work
  if config.data.source == "reasoning_gym":
    check_task_options(config.data)  # needs reasoning-gym imported: not in load_config
  initialize_distributed(config.mesh)
  check_same_config(config)
  out = Path(config.train.output_dir)
  # Refuses a directory that another run holds or used, probes that it is writable, and
  # locks it until this run ends, however it ends.
  lock = run_dir.claim(out, config)
  try:
    with Preemption() as preemption:  # SIGTERM/SIGINT: stop after a step, saved
      return _run(config, out, cache, started, preemption)
  finally:
    if lock is not None:
      lock.release()


def _run(
  config: Config, out: Path, cache: dict | None, started: float, preemption: Preemption
) -> dict:
  """`run` once the output directory is this run's: set up, evaluate before, train,
  evaluate after, export and summarise."""
  preemption.stop_after(Preemption.BEFORE_THE_FIRST_STEP)  # (the trainer says when it starts)
  paths = RunPaths(out)
  setup = setup_run(config, cache)
  params = setup.model.params
  opt_state = jax.jit(setup.steps.tx.init, out_shardings=setup.steps.shardings["opt_state"])(params)
  # DPO's reference is the initial weights, so it is taken before any checkpoint is restored.
  reference_args, eval_reference = _dpo_reference(setup)
  c = config.checkpoint
  checkpoints = Checkpoints(
    paths.checkpoints,
    c.keep,
    c.every,
    c.every_seconds,
    fall_back_on_corruption=c.fall_back_on_corruption,
  )
  first_step = 0
  if config.train.resume:
    params, opt_state, first_step = _resume(setup, checkpoints, params, opt_state, out)

  summary: dict = {
    "output_dir": str(out),
    "num_params": setup.model.num_params,
    "data": setup.data_report,
  }
  writer = MetricWriter(paths, config, jax.process_index() == 0)
  evaluator = Evaluator(setup, paths, writer, eval_reference)
  trainer = Trainer(setup, paths, checkpoints, writer, preemption)
  if config.eval.before and first_step == 0:
    summary["before"] = _evaluate_before(trainer, evaluator, params, cache)
  trained = trainer.train(params, opt_state, first_step, reference_args, evaluator)
  params = trained.params
  summary.update((f"step_{step}", metrics) for step, metrics in trained.evaluations.items())
  # A preemptible VM kills a few seconds after its SIGTERM: what is left after the last step
  # stops within a batch, and the resume from the final checkpoint runs only that.
  where = " after the current batch of the evaluation after training" if config.eval.after else ""
  saving = "" if checkpoints.latest_step() == setup.total_steps else ", saving the final checkpoint"
  preemption.stop_after(
    f"stopping{where}{saving} (exit {PREEMPTED_EXIT_CODE}); {_left_after_training(config)}"
  )
  if config.eval.after:
    try:
      summary["after"] = evaluator("after", setup.total_steps, params, stop=preemption.reached)
    except EvaluationStopped:
      raise trainer.stopped_after_training(
        trained, ", during the evaluation after training: training is done"
      ) from None
  writer.close()
  summary.update(_comparison(evaluator.answers))
  if trained.step_times:
    times = trained.step_times
    median = np.float32(np.median(times[1:] or times))
    # Timings differ per process: every process returns process 0's, so summaries match.
    summary["median_step_time_s"] = float(multihost_utils.broadcast_one_to_all(median))
  summary["steps"] = setup.total_steps
  done = (
    "training and the evaluation after it are done" if config.eval.after else "training is done"
  )
  finished = f"the run in {out} has finished its work; it ends (exit 0)"
  if config.checkpoint.export:
    export_dir = Path(config.checkpoint.export_dir or paths.export)
    try:
      preemption.stop_at_once(f"the export to {export_dir}")
      summary["export_dir"] = _export(setup, export_dir, params)
      preemption.ignore(finished)  # (a request until here interrupts: it was promised 75)
    except Interrupted:
      raise trainer.stopped_after_training(
        trained, f", during the export to {export_dir}: {done}"
      ) from None
  else:
    preemption.ignore(finished)
    if preemption.reached():  # asked since the evaluation's last batch: stop, as promised
      raise trainer.stopped_after_training(trained, f": {done}")
  # Process 0's wall time and load average (other jobs slow every timing), as for step times.
  timing = np.array([time.time() - started, *os.getloadavg()], np.float32)
  timing = [float(x) for x in multihost_utils.broadcast_one_to_all(timing)]
  summary["wall_time_s"], summary["load_average"] = timing[0], timing[1:]
  if jax.process_index() == 0:
    paths.summary.write_text(json.dumps(summary, indent=1))
  _show(summary)
  written = [paths.config.name, paths.train_log.name, f"{paths.checkpoints.name}/"]
  written += [paths.eval_samples("*").name, paths.summary.name]
  written += [summary["export_dir"]] if "export_dir" in summary else []  # may be elsewhere
  log(f"outputs: {out}/ ({', '.join(written)})")
  return summary


def _dpo_reference(setup: Run) -> tuple[tuple, np.ndarray | None]:
  """DPO: (the train step's extra reference arguments, the reference's log-probs of the
  held-out rows); the training rows get theirs as "reference_logps" when precomputed.
  SFT: ((), None)."""
  config = setup.config
  dpo_cfg = config.dpo_objective
  if dpo_cfg is None:
    return (), None
  start = time.time()
  params, logps, batch_size = setup.model.params, setup.steps.logps, config.eval.batch_size
  eval_reference = None
  if setup.eval_rows is not None:
    eval_reference = all_sequence_logps(logps, params, setup.eval_rows, batch_size, setup.mesh)
  reference_args = ()
  if dpo_cfg.precompute_reference:
    setup.train_rows["reference_logps"] = all_sequence_logps(
      logps, params, setup.train_rows, batch_size, setup.mesh
    )
  else:
    dtype = jnp.dtype(config.model.dtype)
    reference_args = (reference_copy(params, setup.model.shardings, dtype),)
  kind = "log-probs of every pair" if dpo_cfg.precompute_reference else "a frozen copy"
  log(f"dpo reference: {kind}, {config.model.dtype} ({time.time() - start:.1f} s)")
  return reference_args, eval_reference


def _resume(setup: Run, checkpoints: Checkpoints, params, opt_state, out: Path) -> tuple:
  """(params, optimizer state, step) of the checkpoint `train.resume` names: this run's
  latest, or another run's. Refused before any array is read when it holds other rows,
  another model or another optimizer's state."""
  config, c = setup.config, setup.config.checkpoint
  source = (
    checkpoints
    if config.train.resume is True
    else Checkpoints(
      run_dir.resume_source(config),
      c.keep,
      read_only=True,
      fall_back_on_corruption=c.fall_back_on_corruption,
    )
  )
  if source.latest_step() is None:
    raise FileNotFoundError(f"train.resume: no checkpoint in {source.directory}")
  meta = source.read_meta()
  check_fingerprint(meta, config, source.directory)
  cast = check_state(meta, setup.model_config, config, source.directory)
  if cast:
    log(cast)
  params, opt_state, meta = source.restore(params, opt_state)
  # Resumed after the last step, it evaluates again: that step's evaluation is run anew.
  again = meta["step"] == setup.total_steps and config.eval.after
  run_dir.resumed(out, config, meta["step"], evaluates_again=again)
  log(f"resumed from {source.directory} at step {meta['step']} (row {meta['data_position']})")
  return params, opt_state, meta["step"]


def _evaluate_before(trainer: Trainer, evaluator: Evaluator, params, cache: dict | None) -> dict:
  """The evaluation before training, shared through `cache` by runs that agree on it. Asked
  to stop, before it or after one of its batches, the run ends with nothing to save."""
  setup, preemption = trainer.setup, trainer.preemption
  if preemption.reached():  # asked while it loaded or compiled
    raise trainer.stopped_before_training("")
  plan = (
    "stopping after the current batch of the evaluation before training (exit "
    f"{PREEMPTED_EXIT_CODE}); nothing is trained yet: the run starts again"
  )
  try:
    with preemption.stopping_after(plan):
      return _shared_evaluation_before(setup, evaluator, params, cache, preemption.reached)
  except EvaluationStopped:
    raise trainer.stopped_before_training(", during the evaluation before training") from None


def _shared_evaluation_before(
  setup: Run, evaluator: Evaluator, params, cache: dict | None, stop
) -> dict:
  """The evaluation before training, or the one an earlier run in this process made of the
  same model and data (`cache`); `stop` as the `Evaluator` takes it."""
  config = setup.config
  # Generated held-out items do not depend on the shuffle: every seed scores the same before.
  reordered_only = config.data.source == "reasoning_gym"
  data_key = dataclasses.replace(config.data, shuffle_seed=0) if reordered_only else config.data
  answers, made = evaluator.answers, []

  def evaluate():
    made.append(True)
    # Before training the policy is the reference.
    result = evaluator("before", 0, params, policy_logps=evaluator.reference_logps, stop=stop)
    return result, answers.get("before")

  key = ("before", setup.cache_key, data_key, config.eval, config.dpo_objective)
  result, answers["before"] = shared(cache, key, evaluate)
  if not made:  # an earlier run in this process made it: this run's logs get it too
    evaluator.log_shared("before", 0, result, answers["before"])
  if answers["before"] is None:
    del answers["before"]
  return result


def _left_after_training(config: Config) -> str:
  """What a resume from the final checkpoint runs."""
  left = ["the evaluation after training"] if config.eval.after else []
  left += ["the export"] if config.checkpoint.export else []
  return (
    f"the resume runs only {' and '.join(left)}" if left else "the resume only writes the summary"
  )


class Trained(NamedTuple):
  """What `Trainer.train` measured: the final parameters and optimizer state, the
  evaluations during training by step, and each logged step's seconds."""

  params: Any
  opt_state: Any
  evaluations: dict[int, dict]
  step_times: list[float]


class Trainer:
  """The updates of a run from a first step to `total_steps`: each step's record goes to
  the loggers of `metrics.loggers` and the progress bar; checkpoints are saved when due and
  kept once a later loss confirms them; asked to stop, it saves after the current step and
  raises `Preempted`."""

  def __init__(
    self,
    setup: Run,
    paths: RunPaths,
    checkpoints: Checkpoints,
    writer: MetricWriter,
    preemption: Preemption,
  ):
    self.setup, self.paths, self.checkpoints = setup, paths, checkpoints
    self.writer, self.preemption = writer, preemption
    self.step_times: list[float] = []
    model_config, config = setup.model_config, setup.config
    peak = peak_flops_per_device(config.train.peak_flops_per_device)
    self.meter = Meter(
      flops_per_token(
        setup.model.num_params,
        model_config.num_layers,
        config.data.max_length,
        model_config.hidden_size,
      ),
      peak and peak * jax.device_count(),
      setup.model.shardings,  # names the layers of mask telemetry
    )
    self.progress = None

  def meta(self, step: int) -> dict:
    """What a checkpoint at `step` records besides the arrays: where the data stands and
    what must match to resume from it."""
    config = self.setup.config
    return {
      "step": step,
      "data_position": step * config.train.batch_size,
      "optimizer_seed": config.optimizer.seed,
      "fingerprint": data_fingerprint(config),
      "state_fingerprint": state_fingerprint(self.setup.model_config, config),
      "param_dtype": config.model.param_dtype,
    }

  def report(self, record: dict | None) -> None:
    """Logs one record; its loss, computed on the weights of checkpoint `step - 1` if one
    was saved, decides whether that checkpoint is kept (a non-finite loss stops the run)."""
    if record is None:
      return
    record["epoch"] = self.setup.batches.epoch(record["step"])
    self.step_times.append(record["step_time_s"])
    self.writer.write(record["step"], record, "train/")
    self.checkpoints.check(record["step"] - 1, record["loss"])
    self.progress.set_postfix(
      loss=f"{record['loss']:.3f}",
      lr=f"{record['lr']:.1e}",
      **({"kept": f"{record['kept_fraction']:.2f}"} if "kept_fraction" in record else {}),
    )

  def _close(self) -> None:
    if self.progress is not None:
      self.progress.close()

  def _stopped(self, step: int, saved: bool = True, detail: str = "") -> Preempted:
    """Closes the outputs; the error that ends the run after `step`."""
    self._close()
    self.writer.close()
    signal_name = self.preemption.signal_name or "SIGTERM"
    return Preempted(step, self.checkpoints.directory, signal_name, saved, detail)

  def stopped_after_training(self, trained: Trained, during: str = "") -> Preempted:
    """The error that ends a run asked to stop after its last step (`during`: in what). Its
    final checkpoint is saved, even with `checkpoint.save_final=false`: the resume starts
    from it and runs only what was left."""
    total_steps = self.setup.total_steps
    meta = self.meta(total_steps)
    self.checkpoints.save_final(total_steps, trained.params, trained.opt_state, meta)
    return self._stopped(total_steps, detail=f"{during}; {_left_after_training(self.setup.config)}")

  def stopped_before_training(self, during: str) -> Preempted:
    """The error that ends a run asked to stop before its first step, in `during`."""
    return self._stopped(0, saved=False, detail=during)

  def evaluate(self, step: int, params, opt_state, evaluator: Evaluator) -> dict:
    """The evaluation at `step`, during training. Asked to stop, it stops after its current
    batch, `step` is saved (unless its checkpoint is the latest already) and the run ends;
    the resume runs this evaluation first (`owes_evaluation`)."""
    plan = (
      f"stopping after the current batch of the evaluation at step {step}, saving step {step} "
      f"(exit {PREEMPTED_EXIT_CODE}); the resume runs that evaluation first"
    )
    with self.preemption.stopping_after(plan):
      try:
        result = evaluator(f"step{step}", step, params, stop=self.preemption.reached)
      except EvaluationStopped:
        result = None
      # Asked during its last batch: it is logged, and the run stops now, as promised.
      if result is None or self.preemption.reached():
        self.checkpoints.save_final(step, params, opt_state, self.meta(step))
        during = "during the evaluation" if result is None else "after the evaluation"
        left = "; the resume runs it first" if result is None else ""
        raise self._stopped(step, detail=f", {during} at step {step}{left}")
    return result

  def owes_evaluation(self, step: int) -> bool:
    """Whether a run resumed at `step` runs the evaluation there first: one is due at `step`
    (`eval.every`) and the eval log lacks it (a stop came in it or in the step before it).
    Without the JSON-lines logger it cannot tell, and runs it."""
    setup = self.setup
    every = setup.config.eval.every
    if not (every and 0 < step < setup.total_steps and step % every == 0):
      return False
    logged = False
    if jax.process_index() == 0 and self.paths.eval_log.is_file():
      logged = any(record["step"] == step for record in read_jsonl(self.paths.eval_log))
    # Every process evaluates, or none: process 0 read the log.
    return not int(multihost_utils.broadcast_one_to_all(np.int32(logged)))

  def train(
    self, params, opt_state, first_step: int, reference_args: tuple, evaluator: Evaluator
  ) -> Trained:
    """Trains from `first_step`, evaluating every `eval.every` steps; returns the final
    parameters (saved when `checkpoint.save_final`), those evaluations and the step times."""
    evaluations: dict[int, dict] = {}
    setup, checkpoints, meter = self.setup, self.checkpoints, self.meter
    t, total_steps = setup.config.train, setup.total_steps
    self.progress = tqdm(
      range(first_step, total_steps),
      initial=first_step,
      total=total_steps,
      desc=setup.config.optimizer.method,
      disable=not t.tqdm or jax.process_index() != 0,
    )
    if self.preemption.reached():  # asked before the first step: nothing new to save
      if first_step == total_steps:  # resumed after the last step
        trained = Trained(params, opt_state, evaluations, self.step_times)
        raise self.stopped_after_training(trained, ": training is done")
      raise self._stopped(first_step, saved=checkpoints.latest_step() is not None)
    if self.owes_evaluation(first_step):
      log(f"the evaluation due at step {first_step} is not in the eval log: it runs first")
      evaluations[first_step] = self.evaluate(first_step, params, opt_state, evaluator)
    profile = _Profile(t.profile_steps, self.paths.profile, total_steps)
    every = setup.config.eval.every
    meter.restart()  # the evaluations before are not step time
    self.preemption.stop_after(Preemption.AFTER_THE_STEP)
    try:
      for step in self.progress:
        profile.before(step)
        batch = setup.batches.global_batch(step, setup.steps.shardings["batch"])
        params, opt_state, metrics = setup.steps.train(
          params, opt_state, batch, jnp.int32(step), *reference_args
        )
        profile.after(step, metrics)
        # Both are agreed on by every process: each calls them at every step.
        save_now = checkpoints.due(step + 1) and step + 1 < total_steps
        stopping = self.preemption.reached()
        eval_now = every and (step + 1) % every == 0 and step + 1 < total_steps
        # The previous log step's metrics are read only now, with this step queued. A step
        # whose loss is on the weights of an unconfirmed checkpoint is always logged.
        log_now = (step + 1) % t.log_every == 0 or step + 1 == total_steps
        log_now = log_now or step in checkpoints.unconfirmed or stopping
        self.report(meter.push(step + 1, metrics, setup.batches.tokens(step), log_now))
        if stopping:  # this step is done: log and save it, and stop
          self.report(meter.flush())
          if step + 1 == total_steps:
            trained = Trained(params, opt_state, evaluations, self.step_times)
            raise self.stopped_after_training(trained, ": training is done")
          checkpoints.save_final(step + 1, params, opt_state, self.meta(step + 1))
          raise self._stopped(step + 1)
        if save_now:
          checkpoints.save(step + 1, params, opt_state, self.meta(step + 1))
        if eval_now:
          self.report(meter.flush())
          evaluations[step + 1] = self.evaluate(step + 1, params, opt_state, evaluator)
          meter.restart()  # evaluating is not step time
    finally:
      profile.stop()  # a stop or an error in the window keeps the trace so far
    self.report(meter.flush())
    self._close()
    if setup.config.checkpoint.save_final and total_steps > first_step:
      checkpoints.save_final(total_steps, params, opt_state, self.meta(total_steps))
    checkpoints.wait()
    trained = Trained(params, opt_state, evaluations, self.step_times)
    if self.preemption.reached():  # asked while the last steps ran: skip the evaluation after
      raise self.stopped_after_training(trained, ": training is done")
    return trained


class _Profile:
  """A `jax.profiler` trace of the steps in [start, stop) (`train.profile_steps`), on
  process 0, written to `directory`."""

  def __init__(self, window: tuple, directory: Path, total_steps: int):
    self.window = window if jax.process_index() == 0 else ()
    self.directory, self.total_steps = directory, total_steps
    self.tracing = False

  def before(self, step: int) -> None:
    if self.window and not self.tracing and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(str(self.directory))
      self.tracing = True

  def after(self, step: int, metrics) -> None:
    if self.tracing and step + 1 in (self.window[1], self.total_steps):
      jax.block_until_ready(metrics)  # the trace holds the window's device work
      self.stop()

  def stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _comparison(answers: dict) -> dict:
  """The paired gain and three held-out problems before and after, when both were scored."""
  if "before" not in answers or "after" not in answers:
    return {}
  return {
    "gain": paired_gain(answers["before"], answers["after"]),
    "examples": [
      {
        "question": b["question"],
        "reference": b["reference"],
        "before": b["completion"],
        "after": a["completion"],
      }
      for b, a in list(zip(answers["before"], answers["after"]))[:3]
    ],
  }


def _export(setup: Run, export_dir: Path, params) -> str:
  """Writes the trained model (and its tokenizer, unless bytes) in Hugging Face format to
  `export_dir`; returns it."""
  tokenizer = setup.tokenizer
  plain = tokenizer.tokenizer if isinstance(tokenizer, AlpacaTemplate) else tokenizer
  export_pretrained(
    setup.model.merged(params),
    None if isinstance(plain, ByteTokenizer) else plain,
    str(export_dir),
  )
  return str(export_dir)

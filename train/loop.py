"""The training job, top to bottom: config -> mesh -> model -> data -> steps -> outputs.

`run(config)` validates the config, starts multi-host JAX when asked, claims
the output directory, loads (or randomly initialises) the model sharded over the
mesh, prepares the data, evaluates, trains with periodic Orbax checkpoints and
per-step JSONL logs, evaluates again and returns the final metrics. Everything it
writes goes under `train.output_dir`. Asked to stop (SIGTERM, SIGINT), it
finishes the current step, saves it and raises `Preempted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from train import benchmarks, run_dir
from train.checkpoints import (
  Checkpoints,
  Preempted,
  Preemption,
  check_fingerprint,
  check_state,
  data_fingerprint,
  state_fingerprint,
)
from train.config import Config, load_config
from train.data import Batches, examples_for_generation, prepare
from train.evaluator import Evaluator, all_sequence_logps
from train.examples import check_task_options
from train.gguf_import import default_gguf_path
from train.mesh import initialize_distributed, make_mesh, param_shardings
from train.metrics import Meter, MetricWriter, flops_per_token, peak_flops_per_device
from train.model import Llama, LlamaConfig, abstract_model
from train.paths import RunPaths
from train.pretrained import export_pretrained, load_pretrained
from train.stats import paired_gain
from train.step import build_steps, merge, reference_copy
from train.tokenizer import AlpacaTemplate, ByteTokenizer


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message)


def load_model(config: Config, mesh):
  """(graphdef, params, rest, param shardings, tokenizer).

  The graph comes from an abstract `Llama` built with the configured compute
  dtype and remat, so weights loaded in `param_dtype` can compute in bf16
  without a second copy.
  """
  cfg = config.model
  param_dtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
  if cfg.path is not None:
    path = default_gguf_path() if cfg.path == "smollm2" else cfg.path
    model, tokenizer = load_pretrained(path, mesh=mesh, dtype=param_dtype)
    model_config = model.config
  else:
    model_config = LlamaConfig.from_hf(cfg.hf_config)
    model, tokenizer = Llama(model_config, rngs=nnx.Rngs(cfg.seed), param_dtype=param_dtype), None
  if config.data.tokenizer == "bytes":
    tokenizer = ByteTokenizer()
  if tokenizer is None:
    raise ValueError(
      "model.path is null (random init), which has no tokenizer: set data.tokenizer=bytes"
    )
  if config.data.template == "alpaca":
    tokenizer = AlpacaTemplate(tokenizer)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model_config.vocab_size}"
    )
  graphdef, abstract_params, rest = abstract_model(
    model_config,
    dtype=dtype,
    param_dtype=param_dtype,
    remat=cfg.remat,
    attention=cfg.attention,
    logits_dot_in_fp32=cfg.logits_dot_in_fp32,
  )
  shardings = param_shardings(abstract_params, mesh)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.device_put(params, shardings)  # a no-op for weights already loaded onto the mesh
  return graphdef, params, rest, shardings, tokenizer


def _global_batch(batches: Batches, step: int, shardings: dict) -> dict:
  """The step's global batch, one sharded array per field of `shardings` ([A, M, L] token
  fields, [A, M] per-row values); each process fills only its own devices."""
  return {
    name: jax.make_array_from_callback(
      batches.shape[: batches.rows[name].ndim + 1],
      sharding,
      lambda index, name=name: batches.local(step, name, index),
    )
    for name, sharding in shardings.items()
  }


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
    _log("\n".join(["results on the held-out items:"] + lines))


def _shared(cache: dict | None, key: tuple, make):
  """`make()`, or its earlier result under `key` in `cache` (no cache: always made afresh)."""
  if cache is None:
    return make()
  key = repr(key)  # configs hold dicts (task options, HF configs): compare them by value
  if key not in cache:
    cache[key] = make()
  return cache[key]


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
  out = Path(config.train.output_dir)
  # Refuses a directory that another run holds or used, probes that it is writable, and
  # locks it until this run ends, however it ends.
  lock = run_dir.prepare(out, config)
  try:
    with Preemption() as preemption:  # SIGTERM/SIGINT: stop after a step, saved
      return _run(config, out, cache, started, preemption)
  finally:
    if lock is not None:
      lock.release()


def _run(
  config: Config, out: Path, cache: dict | None, started: float, preemption: Preemption
) -> dict:
  """`run` once the output directory is this run's."""
  paths = RunPaths(out)
  mesh = make_mesh(config.mesh)
  _log(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"{jax.process_count()} process(es)"
  )

  start = time.time()
  model_key = ("model", config.model, config.data.tokenizer, config.data.template, config.mesh)
  graphdef, params, rest, p_shardings, tokenizer = _shared(
    cache, model_key, lambda: load_model(config, mesh)
  )
  if cache is not None:  # the train step donates its params: keep the shared ones intact
    params = jax.tree.map(jnp.copy, params)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  _log(f"model: {num_params / 1e6:.1f}M parameters ({time.time() - start:.1f} s)")

  dpo_cfg = config.dpo if config.train.objective == "dpo" else None
  train_rows, eval_rows, held_out, report = _shared(
    cache,
    ("data", model_key, config.data, dpo_cfg),
    lambda: prepare(config.data, tokenizer, dpo_cfg is not None),
  )
  _log("data: " + ", ".join(f"{k} {v}" for k, v in report.items()))
  eval_items = examples_for_generation(tokenizer, held_out)
  if config.eval.benchmark != "held_out":  # the benchmark's items are scored instead
    eval_items = benchmarks.load_items(
      config.eval.benchmark,
      held_out if config.data.source == "reasoning_gym" else None,
      config.eval.size,
    )
  t = config.train
  batches = Batches(
    train_rows,
    t.batch_size,
    t.micro_batch_size,
    config.data.shuffle_seed,
    rows_per_item=1 if dpo_cfg is None else 2,  # a pair's two rows stay together
  )
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.micro_batch_size % shards:
    raise ValueError(
      f"train.micro_batch_size={t.micro_batch_size} must be a multiple of "
      f"mesh data x fsdp = {shards}"
    )
  total_steps = t.steps or math.ceil(t.epochs * batches.num_items / t.batch_size)

  steps = _shared(
    cache,
    ("steps", model_key, config.optimizer, total_steps, batches.shape, dpo_cfg),
    lambda: build_steps(
      graphdef,
      rest,
      params,
      p_shardings,
      config.optimizer,
      total_steps,
      mesh,
      config.model.loss_chunk_tokens,
      dpo_cfg,
    ),
  )
  opt_state = jax.jit(steps.tx.init, out_shardings=steps.shardings["opt_state"])(params)
  shardings, train_step = steps.shardings, steps.train
  # DPO's reference is the initial weights, so it is taken before any checkpoint is restored.
  reference_args, eval_reference = (), None
  if dpo_cfg is not None:
    start = time.time()
    if eval_rows is not None:
      eval_reference = all_sequence_logps(
        steps.logps, params, eval_rows, config.eval.batch_size, mesh
      )
    if dpo_cfg.precompute_reference:
      train_rows["reference_logps"] = all_sequence_logps(
        steps.logps, params, train_rows, config.eval.batch_size, mesh
      )
    else:
      reference_args = (reference_copy(params, p_shardings, jnp.dtype(config.model.dtype)),)
    kind = "log-probs of every pair" if dpo_cfg.precompute_reference else "a frozen copy"
    _log(f"dpo reference: {kind}, {config.model.dtype} ({time.time() - start:.1f} s)")

  c = config.checkpoint
  checkpoints = Checkpoints(paths.checkpoints, c.keep, c.every, c.every_seconds)
  model_config = merge(graphdef, params, rest).config
  first_step = 0
  if t.resume:
    source = (
      checkpoints
      if t.resume is True
      else Checkpoints(run_dir.resume_source(config), c.keep, read_only=True)
    )
    if source.latest_step() is None:
      raise FileNotFoundError(f"train.resume: no checkpoint in {source.directory}")
    # Refused before any array is read: other rows, another model or optimizer state.
    meta = source.read_meta()
    check_fingerprint(meta, config, source.directory)
    cast = check_state(meta, model_config, config, source.directory)
    if cast:
      _log(cast)
    params, opt_state, meta = source.restore(params, opt_state)
    first_step = meta["step"]
    run_dir.resumed(out, config, first_step)
    _log(f"resumed from {source.directory} at step {first_step} (row {meta['data_position']})")

  summary: dict = {"output_dir": str(out), "num_params": num_params, "data": report}
  writer = MetricWriter(paths.tensorboard, jax.process_index() == 0)
  evaluate_at = Evaluator(
    config,
    paths,
    steps,
    graphdef,
    rest,
    tokenizer,
    mesh,
    writer,
    rows=eval_rows,
    items=eval_items,
    reference_logps=eval_reference,
  )
  answers = evaluate_at.answers  # held-out answers by tag, for the before/after comparison

  if config.eval.before and first_step == 0:
    # Generated held-out items do not depend on the shuffle: every seed scores the same before.
    reordered_only = config.data.source == "reasoning_gym"
    data_key = dataclasses.replace(config.data, shuffle_seed=0) if reordered_only else config.data
    summary["before"], answers["before"] = _shared(
      cache,
      ("before", model_key, data_key, config.eval, dpo_cfg),
      lambda: (
        # Before training the policy is the reference.
        evaluate_at("before", 0, params, policy_logps=eval_reference),
        answers.get("before"),
      ),
    )
    if answers["before"] is None:
      del answers["before"]

  def meta(step):
    return {
      "step": step,
      "data_position": step * t.batch_size,
      "optimizer_seed": config.optimizer.seed,
      "fingerprint": data_fingerprint(config),
      "state_fingerprint": state_fingerprint(model_config, config),
      "param_dtype": config.model.param_dtype,
    }

  log_file = open(paths.log, "a") if jax.process_index() == 0 else None
  progress = tqdm(
    range(first_step, total_steps),
    initial=first_step,
    total=total_steps,
    desc=config.optimizer.method,
    disable=not t.tqdm or jax.process_index() != 0,
  )
  peak = peak_flops_per_device(t.peak_flops_per_device)
  meter = Meter(
    flops_per_token(
      num_params, model_config.num_layers, config.data.max_length, model_config.hidden_size
    ),
    peak and peak * jax.device_count(),
    p_shardings,  # names the layers of mask telemetry
  )
  step_times = []

  def report(record: dict | None) -> None:
    """Logs one record; its loss, computed on the weights of checkpoint `step - 1` if one
    was saved, decides whether that checkpoint is kept (a non-finite loss stops the run)."""
    if record is None:
      return
    record["epoch"] = batches.epoch(record["step"])
    step_times.append(record["step_time_s"])
    if log_file:
      log_file.write(json.dumps(record) + "\n")
      log_file.flush()
    writer.write(record["step"], record, "train/")
    checkpoints.check(record["step"] - 1, record["loss"])
    progress.set_postfix(
      loss=f"{record['loss']:.3f}",
      lr=f"{record['lr']:.1e}",
      **({"kept": f"{record['kept_fraction']:.2f}"} if "kept_fraction" in record else {}),
    )

  def stopped(step: int, saved: bool = True) -> Preempted:
    """Closes the log and the progress bar; the error that ends the run after `step`."""
    progress.close()
    if log_file:
      log_file.close()
    writer.close()
    return Preempted(step, checkpoints.directory, preemption.signal_name or "SIGTERM", saved)

  if preemption.reached():  # asked before the first step: nothing new to save
    raise stopped(first_step, saved=checkpoints.latest_step() is not None)
  profile = t.profile_steps if jax.process_index() == 0 else ()
  tracing = False
  for step in progress:
    if profile and not tracing and profile[0] <= step < profile[1]:
      jax.profiler.start_trace(str(paths.profile))
      tracing = True
    tokens = int((train_rows["segment_ids"][batches.row_ids(step)] > 0).sum())
    batch = _global_batch(batches, step, shardings["batch"])
    params, opt_state, metrics = train_step(
      params, opt_state, batch, jnp.int32(step), *reference_args
    )
    if tracing and step + 1 in (profile[1], total_steps):
      jax.block_until_ready(metrics)  # the trace holds the window's device work
      jax.profiler.stop_trace()
      tracing = False
    # Both are agreed on by every process: each calls them at every step.
    save_now = checkpoints.due(step + 1) and step + 1 < total_steps
    stopping = preemption.reached()
    eval_now = config.eval.every and (step + 1) % config.eval.every == 0 and step + 1 < total_steps
    # The previous log step's metrics are read only now, with this step queued. A step
    # whose loss is on the weights of an unconfirmed checkpoint is always logged.
    report(
      meter.push(
        step + 1,
        metrics,
        tokens,
        (step + 1) % t.log_every == 0
        or step + 1 == total_steps
        or step in checkpoints.unconfirmed
        or stopping,
      )
    )
    if stopping:  # this step is done: log and save it, and stop
      report(meter.flush())
      checkpoints.save_final(step + 1, params, opt_state, meta(step + 1))
      raise stopped(step + 1)
    if save_now:
      checkpoints.save(step + 1, params, opt_state, meta(step + 1))
    if eval_now:
      report(meter.flush())
      summary[f"step_{step + 1}"] = evaluate_at(f"step{step + 1}", step + 1, params)
      meter.restart()  # evaluating is not step time
  report(meter.flush())
  progress.close()
  if log_file:
    log_file.close()
  if config.checkpoint.save_final and total_steps > first_step:
    checkpoints.save_final(total_steps, params, opt_state, meta(total_steps))
  checkpoints.wait()
  if preemption.reached():  # asked while the last steps ran: skip the evaluation after
    if checkpoints.latest_step() != total_steps:  # checkpoint.save_final=false
      checkpoints.save_final(total_steps, params, opt_state, meta(total_steps))
    raise stopped(total_steps)

  if config.eval.after:
    summary["after"] = evaluate_at("after", total_steps, params)
  writer.close()
  if "before" in answers and "after" in answers:
    summary["gain"] = paired_gain(answers["before"], answers["after"])
    summary["examples"] = [
      {
        "question": b["question"],
        "reference": b["reference"],
        "before": b["completion"],
        "after": a["completion"],
      }
      for b, a in list(zip(answers["before"], answers["after"]))[:3]
    ]
  if step_times:
    median = np.float32(np.median(step_times[1:] or step_times))
    # Timings differ per process: every process returns process 0's, so summaries match.
    summary["median_step_time_s"] = float(multihost_utils.broadcast_one_to_all(median))
  summary["steps"] = total_steps
  if config.checkpoint.export:
    export_dir = Path(config.checkpoint.export_dir or paths.export)
    plain = tokenizer.tokenizer if isinstance(tokenizer, AlpacaTemplate) else tokenizer
    export_pretrained(
      merge(graphdef, params, rest),
      None if isinstance(plain, ByteTokenizer) else plain,
      str(export_dir),
    )
    summary["export_dir"] = str(export_dir)
  # Process 0's wall time and load average (other jobs slow every timing), as for step times.
  timing = np.array([time.time() - started, *os.getloadavg()], np.float32)
  timing = [float(x) for x in multihost_utils.broadcast_one_to_all(timing)]
  summary["wall_time_s"], summary["load_average"] = timing[0], timing[1:]
  if jax.process_index() == 0:
    paths.summary.write_text(json.dumps(summary, indent=1))
  _show(summary)
  _log(
    f"outputs: {out}/ (config.yaml, train_log.jsonl, checkpoints/, eval_*.jsonl, summary.json"
    + (f", {summary['export_dir']}" if "export_dir" in summary else "")
    + ")"
  )
  return summary

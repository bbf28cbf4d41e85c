"""Step metrics that never stall the device: throughput, step time and MFU per log line; each
log and eval record to the loggers of `metrics.loggers` (JSONL, TensorBoard, W&B).

Reading a metric (`float(v)`) waits for its step. `Meter` keeps the metrics of
a log step and reads them only after the next step is dispatched (as nanodo
does), so the device always has queued work; tokens and time cover every step
since the previous log line. Mask telemetry (`optimizer.telemetry`) arrives as
per-row arrays and leaves as `{"mask": {tensor: {statistic: value or per-layer
list}}}`, named by the parameters' paths.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

import jax

import gmt_optax
from train.config import Config, to_dict
from train.paths import RunPaths

# Peak dense bf16 FLOP/s per chip, by `jax.devices()[0].device_kind` (first match wins).
PEAK_FLOPS = (
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5", 459e12),  # v5p
  ("TPU v6 lite", 918e12),  # v6e
  ("NVIDIA A100", 312e12),
  ("NVIDIA H100", 989e12),
  ("NVIDIA H200", 989e12),
)


def peak_flops_per_device(override: float | None = None) -> float | None:
  """The configured value, else the chip table's; None when unknown (CPU)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((flops for prefix, flops in PEAK_FLOPS if kind.startswith(prefix)), None)


def host_description() -> str:
  """``"<CPU model>, <n> cores"`` of this host, for benchmark and run printouts."""
  try:
    with open("/proc/cpuinfo") as f:
      name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "CPU")
  except OSError:  # not Linux
    name = platform.processor() or "CPU"
  return f"{name}, {os.cpu_count()} cores"


def flops_per_token(num_params: int, num_layers: int, seq_len: int, d_model: int) -> float:
  """Training FLOPs per token: 6·N for the matmuls plus causal attention (12·L·T·d, halved)."""
  return 6 * num_params + 6 * num_layers * seq_len * d_model


class Meter:
  """Turns each log step's device metrics into a log record, one step late."""

  def __init__(self, flops_per_token: float, peak_flops: float | None, param_tree=None):
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops  # all devices together; None: no MFU
    self.param_tree = param_tree  # any pytree shaped like the params: names mask telemetry
    self._pending = None
    self._tokens = self._steps = 0
    self.restart()

  def restart(self) -> None:
    """Starts timing anew (after an eval or a save that is not training time)."""
    self._since = time.perf_counter()

  def push(self, step: int, metrics: dict, tokens: int, log: bool) -> dict | None:
    """Counts a dispatched step; returns the previous log step's record, if one is pending."""
    record = self.flush()
    self._tokens += tokens
    self._steps += 1
    if log:
      self._pending = (step, metrics, self._tokens, self._steps)
      self._tokens = self._steps = 0
    return record

  def flush(self) -> dict | None:
    """The pending log step's record, waiting for that step; None if none is pending."""
    if self._pending is None:
      return None
    step, metrics, tokens, steps = self._pending
    self._pending = None
    values = {
      k: v.by_tensor(self.param_tree) if isinstance(v, gmt_optax.MaskTelemetry) else float(v)
      for k, v in metrics.items()
    }
    now = time.perf_counter()
    seconds, self._since = now - self._since, now
    record = {
      "step": step,
      **values,
      "tokens": tokens,
      "tokens_per_s": tokens / seconds,
      "step_time_s": seconds / steps,
    }
    if self.peak_flops:
      record["mfu"] = tokens * self.flops_per_token / seconds / self.peak_flops
    return record


def mask_scalars(tensors: dict) -> dict[str, float]:
  """`{"mask/<statistic>/<tensor>/layer_<i>": value}` of a record's mask telemetry
  (`MaskTelemetry.by_tensor`): statistics first, so TensorBoard's filter (e.g.
  `mask/kept_energy/.*mlp`) shows one statistic of every layer side by side; layer
  numbers are zero-padded to sort in order. First updates have no previous mask: their
  NaN Jaccard is left out."""
  scalars = {}
  for tensor, statistics in tensors.items():
    for statistic, value in statistics.items():
      tag = f"mask/{statistic}/{tensor}"
      if isinstance(value, list):
        width = len(str(len(value) - 1))
        scalars.update({f"{tag}/layer_{i:0{width}d}": v for i, v in enumerate(value)})
      else:
        scalars[tag] = value
  return {tag: v for tag, v in scalars.items() if not math.isnan(v)}


def scalars(values: dict, prefix: str) -> dict[str, float]:
  """The scalars of a log or eval record, as every logger names them: numeric `values` as
  `<prefix><name>` (the step and booleans left out), then its mask telemetry (`mask_scalars`)."""
  tags = {
    prefix + name: value
    for name, value in values.items()
    if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
  }
  return {**tags, **mask_scalars(values.get("mask", {}))}


class _JsonLines:
  """Train records to train_log.jsonl (whole: the mask telemetry stays nested), eval records
  to eval_log.jsonl, one JSON object per line, flushed at once."""

  def __init__(self, paths: RunPaths, config: Config):
    self._paths = {"train/": paths.train_log, "eval/": paths.eval_log}
    self._files = {}

  def write(self, step: int, record: dict, prefix: str, tags: dict[str, float]) -> None:
    if prefix not in self._files:
      self._files[prefix] = open(self._paths[prefix], "a")
    self._files[prefix].write(json.dumps({"step": step, **record}) + "\n")
    self._files[prefix].flush()

  def close(self) -> None:
    for file in self._files.values():
      file.close()


class _TensorBoard:
  """Scalars as TensorBoard event files in output_dir/tensorboard. tensorboardX writes them
  with only numpy and protobuf (no TensorFlow or torch, which flax's and clu's writers
  import) and is kept in step with TensorBoard's format."""

  def __init__(self, paths: RunPaths, config: Config):
    from tensorboardX import SummaryWriter  # here: only the process that writes loads it

    self._writer = SummaryWriter(str(paths.tensorboard))

  def write(self, step: int, record: dict, prefix: str, tags: dict[str, float]) -> None:
    for tag, value in tags.items():
      self._writer.add_scalar(tag, value, step)
    self._writer.flush()  # a crash or a preemption keeps what was logged

  def close(self) -> None:
    self._writer.close()


class _WandB:
  """Scalars to a Weights & Biases run whose config is the run's. Its id is kept in
  output_dir/wandb/run_id, so `train.resume=true` continues that run. As in TRL, the step is
  the metric `train/global_step`, not W&B's own step: a resume logs again the steps after its
  checkpoint, which W&B would drop as earlier than its last step."""

  def __init__(self, paths: RunPaths, config: Config):
    import wandb  # here: an optional extra, loaded only when asked for

    m = config.metrics
    resumed = config.train.resume is True and paths.wandb_run_id.is_file()
    paths.wandb.mkdir(parents=True, exist_ok=True)
    self._run = wandb.init(
      project=m.wandb_project or os.environ.get("WANDB_PROJECT") or "gmt-optax",
      entity=m.wandb_entity,
      name=m.run_name or paths.root.resolve().name,
      id=paths.wandb_run_id.read_text().strip() if resumed else None,
      resume="allow" if resumed else None,
      dir=str(paths.root),
      config=to_dict(config),
    )
    paths.wandb_run_id.write_text(self._run.id)
    self._run.define_metric("train/global_step")
    self._run.define_metric("*", step_metric="train/global_step", step_sync=True)

  def write(self, step: int, record: dict, prefix: str, tags: dict[str, float]) -> None:
    self._run.log({**tags, "train/global_step": step})

  def close(self) -> None:
    self._run.finish()


_LOGGERS = {"jsonl": _JsonLines, "tensorboard": _TensorBoard, "wandb": _WandB}


class MetricWriter:
  """Log and eval records to every logger of `metrics.loggers`: each gets the same scalars
  (`scalars`), the JSONL logs the whole records. Only process 0 writes; elsewhere this is a
  no-op, so every process can call it."""

  def __init__(self, paths: RunPaths, config: Config, enabled: bool):
    names = config.metrics.loggers if enabled else ()
    self._loggers = [_LOGGERS[name](paths, config) for name in names]

  def write(self, step: int, values: dict, prefix: str) -> None:
    """A record at `step`: its numeric `values` as `<prefix><name>`, a `"mask"` entry (mask
    telemetry) as `mask/<statistic>/<tensor>[/layer_<i>]`, one scalar per layer."""
    tags = scalars(values, prefix)
    for logger in self._loggers:
      logger.write(step, values, prefix, tags)

  def close(self) -> None:
    for logger in self._loggers:
      logger.close()
    self._loggers = []

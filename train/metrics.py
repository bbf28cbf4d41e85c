"""Step metrics that never stall the device: throughput, step time and MFU per log line;
TensorBoard scalars beside the JSONL log.

Reading a metric (`float(v)`) waits for its step. `Meter` keeps the metrics of
a log step and reads them only after the next step is dispatched (as nanodo
does), so the device always has queued work; tokens and time cover every step
since the previous log line. Mask telemetry (`optimizer.telemetry`) arrives as
per-row arrays and leaves as `{"mask": {tensor: {statistic: value or per-layer
list}}}`, named by the parameters' paths.
"""

from __future__ import annotations

import math
import os
import platform
import time

import jax

import gmt_optax

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


class MetricWriter:
  """Numeric values of log and eval records as TensorBoard scalars under `directory`.

  tensorboardX writes the event files with only numpy and protobuf (no
  TensorFlow or torch, which flax's and clu's writers import) and is kept in
  step with TensorBoard's format. Only process 0 writes; elsewhere this is a
  no-op, so every process can call it.
  """

  def __init__(self, directory, enabled: bool):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # here: only the process that writes loads it

      self._writer = SummaryWriter(str(directory))

  def write(self, step: int, values: dict, prefix: str) -> None:
    """Numeric `values` as `<prefix><name>`; a `"mask"` entry (mask telemetry) as
    `mask/<statistic>/<tensor>[/layer_<i>]`, one scalar per layer (see `mask_scalars`)."""
    if self._writer is None:
      return
    for name, value in values.items():
      if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(prefix + name, value, step)
    for tag, value in mask_scalars(values.get("mask", {})).items():
      self._writer.add_scalar(tag, value, step)
    self._writer.flush()  # a crash or a preemption keeps what was logged

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

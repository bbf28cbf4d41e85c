"""The output directory holds one run: checked before any work, continued without mixing.

A directory with another run's log or checkpoints is refused unless the run continues it
(`train.resume=true`) or replaces it (`train.overwrite=true` moves it aside);
the directory and its `checkpoints/` must be writable. A resumed run keeps the
original `config.yaml`, writes its own beside it and drops the log records
after the step it resumes from, so every step is logged once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import jax

from train.config import Config, ConfigError, save_config


def _writable(directory: Path) -> None:
  """Fails at once with the path, not after training when the first save hangs."""
  probe = directory / f".write_test-{socket.gethostname()}-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise OSError(e.errno, f"cannot write to {directory}: {e.strerror}") from None


def prepare(out: Path, config: Config) -> None:
  t = config.train
  # A run that trained left log records or checkpoints; a config.yaml alone (a
  # run that failed before its first step) is simply replaced.
  previous = [
    p.name
    for p in (out / "train_log.jsonl", out / "checkpoints")
    if p.is_file() and p.stat().st_size or p.is_dir() and any(p.iterdir())
  ]
  if previous and t.resume is not True:
    if not t.overwrite:
      raise ConfigError(
        f"{out} already holds a run ({', '.join(previous)}): continue it with "
        "train.resume=true, choose a fresh train.output_dir, or set train.overwrite=true "
        "to move it aside"
      )
    if jax.process_index() == 0:
      aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
      out.rename(aside)
      print(f"moved the previous run in {out} to {aside}")
  for directory in (out, out / "checkpoints"):
    _writable(directory)
  if t.resume is not True and jax.process_index() == 0:
    save_config(config, out / "config.yaml")


def resumed(out: Path, config: Config, step: int) -> None:
  """Continuing the run in `out` at `step`: its config beside the original, the log cut at `step`."""
  if jax.process_index() != 0 or config.train.resume is not True:
    return
  save_config(config, out / f"config.resumed-{step}.yaml")
  log = out / "train_log.jsonl"
  if log.is_file():
    kept = []
    for line in log.read_text().splitlines():
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line + "\n")
      except (json.JSONDecodeError, KeyError):  # a line torn by a kill
        pass
    log.write_text("".join(kept))

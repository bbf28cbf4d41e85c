"""Orbax training state: manager, save, restore, keep K, stale-tmp cleanup, data fingerprint for resume.

A checkpoint at step s holds the weights after s updates. The loss of those
weights is only known once step s + 1 has run on them, so a checkpoint stays
unconfirmed until `check(s, loss)` sees that loss finite; a non-finite loss
removes every checkpoint from s on, and only confirmed checkpoints count
towards the `keep` most recent ones. The final checkpoint, on which no step
runs, is confirmed by checking that all its parameters are finite.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from train.config import Config, ConfigError, to_dict


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the checkpoints whose loss was seen finite are kept."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files cannot be read back."""


def data_fingerprint(config: Config) -> dict:
  """What fixes the rows of step s: the data section, the global batch size and the
  objective (DPO rows are pairs)."""
  values = {
    "train.batch_size": config.train.batch_size,
    "train.objective": config.train.objective,
    **{f"data.{k}": v for k, v in to_dict(config)["data"].items()},
  }
  return json.loads(json.dumps(values))  # tuples -> lists, as they come back from a checkpoint


def check_fingerprint(meta: dict, config: Config, source) -> None:
  saved, now = meta["fingerprint"], data_fingerprint(config)
  changed = [k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
  if changed:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
    raise ConfigError(
      f"cannot resume from {source}: the data would not be the same rows in "
      f"the same order ({shown}); restore these values or start a fresh "
      "train.output_dir"
    )


def _no_space(error: BaseException) -> bool:
  """Whether ENOSPC is anywhere in the chain (Orbax and TensorStore re-wrap it as text)."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def _disk_errors(directory: Path):
  try:
    yield
  except Exception as e:
    if _no_space(e):
      raise OSError(errno.ENOSPC, f"no space left on device at {directory}") from e
    raise


def _all_finite(tree) -> bool:
  return bool(
    jax.jit(lambda t: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(t)])))(tree)
  )


class Checkpoints:
  """The Orbax checkpoints of (params, opt_state, meta) in one directory."""

  def __init__(self, directory: Path, keep: int):
    self.directory = directory.absolute()
    self.keep = keep
    self.unconfirmed: set[int] = set()
    if jax.process_index() == 0 and self.directory.is_dir():
      # Left by a save that died before its rename; they may fill the disk again.
      for stale in self.directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(stale)
    # Orbax writes into a temporary directory and renames it when complete, so
    # a save interrupted mid-way is never listed. Pruning is ours (`check`):
    # Orbax's max_to_keep would drop a good checkpoint for a diverged one.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    """Starts an async save; it is kept once `check(step, loss)` sees a finite loss."""
    with _disk_errors(self.directory):
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
    self.unconfirmed.add(step)

  def save_final(self, step: int, params, opt_state, meta: dict) -> None:
    """No step runs on the last weights: they are kept if every parameter is finite."""
    if not _all_finite(params):
      self.check(step, math.nan, what=f"a parameter is not finite after step {step}")
    self.save(step, params, opt_state, meta)
    self._confirm(step)
    self.wait()

  def check(self, step: int, loss: float, what: str | None = None) -> None:
    """`loss` was computed on the weights after `step` updates.

    Finite: the checkpoints up to `step` are good; the oldest beyond `keep`
    are deleted. Otherwise the checkpoints from `step` on are deleted and
    NonFiniteLossError names the one a resume starts from.
    """
    if math.isfinite(loss):
      self._confirm(step)
      return
    self.wait()  # let in-flight saves land before deleting them
    for bad in [s for s in self.manager.all_steps() if s >= step]:
      self.manager.delete(bad)
    self.unconfirmed.clear()
    kept = self.latest_step()
    resume = (
      f"the last good checkpoint, step {kept}, is kept in {self.directory}: continue "
      "with train.resume=true (and a smaller optimizer.lr)"
      if kept is not None
      else f"no checkpoint with finite weights is left in {self.directory}"
    )
    what = what or f"loss is {loss} at step {step + 1}, computed on the weights after step {step}"
    raise NonFiniteLossError(f"{what}: stopping; {resume}.")

  def _confirm(self, step: int) -> None:
    self.unconfirmed = {s for s in self.unconfirmed if s > step}
    good = [s for s in self.manager.all_steps() if s <= step and s not in self.unconfirmed]
    for old in sorted(good)[: -self.keep]:
      self.manager.delete(old)

  def restore(self, params, opt_state) -> tuple:
    """(params, opt_state, meta) of the latest step, placed like `params` and `opt_state`.

    Its weights count as unconfirmed until the first step's loss is seen.
    """
    step = self.latest_step()
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {"params": params, "opt_state": opt_state},
    )
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:
      # The restore's other reads still report into Orbax's closed event loop from
      # TensorStore threads ("Event loop is closed"): let them finish first, so the
      # error below is the last thing a user sees.
      time.sleep(1)
      raise CorruptCheckpointError(
        f"checkpoint {self.directory / str(step)} is corrupt or truncated: {_bad_file(e, self.directory / str(step))}; "
        "remove that step's directory to resume from the one before"
      ) from e
    self.unconfirmed.add(step)
    return restored["state"]["params"], restored["state"]["opt_state"], restored["meta"]

  def wait(self) -> None:
    with _disk_errors(self.directory):
      self.manager.wait_until_finished()


def _bad_file(error: BaseException, step_dir: Path) -> str:
  """The file a restore failed on, with the innermost error's status.

  TensorStore names its file in the innermost error (the outer ones are Orbax's
  async wrappers, e.g. "Event loop is closed"); a broken JSON metadata file is
  not named, so the first one that does not parse is.
  """
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  files = re.findall(r'local file "([^"]+)"', text)
  if files:
    return f"{files[-1]} ({text.split(':')[0]})"
  for path in sorted(step_dir.rglob("*")):
    if (
      path.is_file()
      and path.parent.name != "d"
      and path.suffix != ".ocdbt"
      and path.suffix != ".txt"
    ):
      try:
        json.loads(path.read_bytes())
      except ValueError:
        return f"{path} ({type(error).__name__}: {text})"
  return f"{type(error).__name__}: {text}"

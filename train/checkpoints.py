"""Orbax training state: manager, save, restore, keep K, stale-tmp cleanup, data fingerprint for resume,
when to save (every k steps, every s seconds, on preemption).

A checkpoint at step s holds the weights after s updates. The loss of those
weights is only known once step s + 1 has run on them, so a checkpoint stays
unconfirmed until `check(s, loss)` sees that loss finite; a non-finite loss
removes every checkpoint from s on, and only confirmed checkpoints count
towards the `keep` most recent ones. A checkpoint being written counts only once it is
complete: nothing is deleted for a save that a full disk or a kill can still stop, so
`keep=K` always leaves K complete checkpoints. The final checkpoint, and one saved
because the job is stopped, on which no step runs, are confirmed by checking
that all their parameters are finite.

Each step is published with `checksums.json`, the sha256 of every file of its items (Orbax
has no checksums of its own for array data: a flipped bit loads silently). A restore checks
them first: a file that differs is a `CorruptCheckpointError` naming the step and the file,
and the checkpoint stays where it is; the one before it is restored only when asked
(`checkpoint.fall_back_on_corruption`). A checkpoint is deleted only by pruning or because
this run's own weights in it gave a non-finite loss, never because it failed its checksums.

`Preemption` turns SIGTERM (what preemptible TPU VMs, spot VMs, Kubernetes and
SLURM send before they kill) and SIGINT into "stop after this step" (or after this
evaluation batch): the loop saves that step, and the command line exits with
`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.config import Config, ConfigError, to_dict
from train.disk import disk_errors
from train.records import log


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the checkpoints whose loss was seen finite are kept."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files cannot be read back, or differ from what was written."""


# In each step directory: the sha256 of every file of its items, by path relative to it.
CHECKSUMS = "checksums.json"


# EX_TEMPFAIL of sysexits.h, "a temporary failure: retrying may succeed": the run saved its
# state and stopped early; the same command with train.resume=true continues it. Distinct
# from 0 (done), 1 (error), 2 (config error) and 128 + n (killed by signal n, nothing saved),
# so a wrapper, a Kubernetes podFailurePolicy or a SLURM requeue script can tell them apart.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """The run was asked to stop (SIGTERM/SIGINT) after `step` updates.

  `saved`: its state is in checkpoint `step` (resume it); False: it stopped before its
  first step and nothing is lost (start it again). `detail`: what was done and what the
  resume runs, when it is not simply the steps after `step`.
  """

  def __init__(
    self, step: int, directory: Path, signal_name: str, saved: bool = True, detail: str = ""
  ):
    self.step, self.directory, self.signal_name, self.saved = step, directory, signal_name, saved
    where = f"saved in {directory / str(step)}" if saved else "nothing to save"
    super().__init__(f"{signal_name}: stopped after step {step}, {where}{detail}")


class Interrupted(BaseException):
  """A stop request ended, where the main thread was, work that a resume redoes
  (`Preemption.stop_at_once`). A BaseException, as KeyboardInterrupt: no `except Exception`
  swallows it."""


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


def state_fingerprint(model_config, config: Config) -> dict:
  """What fixes the shapes and the tree of the saved arrays: the model's architecture and
  the optimizer method (its state); `model.param_dtype` is only cast on restore."""
  return {
    **{f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()},
    "optimizer.method": config.optimizer.method,
  }


def check_state(meta: dict, model_config, config: Config, source) -> str | None:
  """Raises ConfigError naming each field whose saved value differs; returns a line to
  print when only `model.param_dtype` differs (the restore casts), else None."""
  saved = json.loads(json.dumps(meta.get("state_fingerprint", {})))
  now = json.loads(json.dumps(state_fingerprint(model_config, config)))
  changed = [k for k in sorted(saved) if saved[k] != now.get(k)]  # older checkpoints: fewer keys
  if changed:
    shown = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in changed)
    raise ConfigError(
      f"cannot resume from {source}: this run differs from the one that saved it ({shown}); "
      "resume with the saved values, or train into a fresh train.output_dir "
      "(the checkpoint is intact and is left as it is)"
    )
  saved_dtype, dtype = meta.get("param_dtype"), config.model.param_dtype
  if saved_dtype is not None and saved_dtype != dtype:
    return (
      f"model.param_dtype: {saved_dtype} -> {dtype}: the checkpoint's {saved_dtype} weights and "
      f"optimizer state are cast to {dtype}"
    )
  return None


@dataclasses.dataclass
class _StepInfo:
  """What Orbax's save decision policies read of a step (its `PolicyCheckpointInfo`)."""

  step: int
  time: datetime.datetime
  metrics: dict | None = None


class Preemption:
  """Stop requests: SIGTERM or SIGINT to any process stops every process at one point (after
  a step, or an evaluation's batch).

  With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
  catches SIGTERM in each process, tells the others through the coordination service and
  picks a sync point; Orbax's `reached_preemption(n)` (what `CheckpointManager.reached_preemption`
  calls: JAX's `reached_preemption_sync_point`) is true at the same `n` in every process. `n` counts the calls to `reached`, the same in
  every process, from 1, so that a notice received before the first call is reachable too.
  A SIGINT is passed on to that service as a SIGTERM. With one process, a handler of both
  signals sets a flag. A second SIGINT stops at once (KeyboardInterrupt), without saving.

  The run says what a stop request does where it is: stop at the next `reached`
  (`stop_after`: training, the evaluations), raise `Interrupted` at once
  (`stop_at_once`: the export, which a resume redoes), or nothing (`ignore`: all is written,
  the run ends with 0). The handler prints that promise, and the exit code keeps it.

  Signals reach Python's main thread only: in another thread this handles none (JAX's
  service still does).
  """

  AFTER_THE_STEP = (
    "finishing the current step, saving a checkpoint and stopping "
    f"(exit {PREEMPTED_EXIT_CODE}); SIGINT again stops at once, without saving"
  )
  BEFORE_THE_FIRST_STEP = f"stopping before the first step (exit {PREEMPTED_EXIT_CODE})"

  def __init__(self):
    self._calls = 0
    self._previous: dict = {}
    self.signal_name: str | None = None
    # (what a stop request does now: "after", "at_once" or "ignore"; the line it prints). One
    # attribute, so that a handler never sees half of a change.
    self._on_stop = ("after", self.AFTER_THE_STEP)

  def stop_after(self, plan: str) -> None:
    """From now on a stop request is acted on at the next `reached`; `plan` says how."""
    self._on_stop = ("after", plan)

  @contextlib.contextmanager
  def stopping_after(self, plan: str):
    """`stop_after(plan)` for the work inside (an evaluation); the plan before it after."""
    previous = self._on_stop
    self.stop_after(plan)
    try:
      yield
    finally:
      self._on_stop = previous

  def stop_at_once(self, what: str) -> None:
    """From now on a stop request raises `Interrupted` at once, in `what`: work that saves
    nothing and that a resume redoes. Raises it now if one came already.

    With several processes `what` is collective (every process takes part in it), so one
    process alone cannot leave it: it is finished and the run ends with 0."""
    if self.reached():
      raise Interrupted
    if jax.process_count() == 1:
      self._on_stop = ("at_once", f"stopping {what} at once (exit {PREEMPTED_EXIT_CODE})")
    else:
      self.ignore(f"{what} is finished first, as every process takes part in it (exit 0)")

  def ignore(self, reason: str) -> None:
    """From now on a stop request changes nothing: the run ends as it would, with 0;
    `reason` says why."""
    self._on_stop = ("ignore", reason)

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      # Several processes: SIGTERM stays with JAX's handler, which this would replace.
      wanted = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
      self._previous = {s: signal.signal(s, self._handle) for s in wanted}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    action, message = self._on_stop
    if action == "ignore":
      print(f"{name}: ignored: {message}", file=sys.stderr, flush=True)
      return
    if signum == signal.SIGINT and self.signal_name is not None:
      raise KeyboardInterrupt  # asked twice: stop now, without saving
    self.signal_name = name
    print(f"{name}: {message}", file=sys.stderr, flush=True)
    if action == "at_once":
      raise Interrupted
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which tells the other processes

  def reached(self) -> bool:
    """Whether to stop now; every process calls this at the same points of the run."""
    self._calls += 1
    if jax.process_count() > 1:
      return ocp.multihost.reached_preemption(self._calls)
    return self.signal_name is not None


@jax.jit
def _finite(tree) -> jax.Array:
  """Whether every element of `tree` is finite (compiled once per tree: a stop asks it in
  its grace period)."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


class Checkpoints:
  """The Orbax checkpoints of (params, opt_state, meta) in one directory.

  Args:
    directory: where the step directories are.
    keep: how many confirmed checkpoints to keep.
    every: save every this many steps (0: never by step count).
    every_seconds: save at least this often by wall time (0: never by time).
    read_only: another run's checkpoints (`train.resume=<path>`): restored from, never
      written, pruned or cleaned.
    fall_back_on_corruption: a restore whose checkpoint's files fail their checksums
      restores the latest one before it that passes (moving the corrupt ones aside,
      unless `read_only`), rather than stop.
  """

  def __init__(
    self,
    directory: Path,
    keep: int,
    every: int = 0,
    every_seconds: float = 0,
    read_only: bool = False,
    fall_back_on_corruption: bool = False,
  ):
    self.directory = directory.absolute()
    self.keep, self.every = keep, every
    self.read_only, self.fall_back_on_corruption = read_only, fall_back_on_corruption
    self.unconfirmed: set[int] = set()
    # The steps this object saved: a non-finite loss deletes only these (never one restored).
    self._saved: set[int] = set()
    self._restore_from: int | None = None  # the step restored, once its checksums passed
    # The step of the save in flight: Orbax finishes a save before it starts the next one,
    # and `wait` finishes it, so this is the same on every process.
    self._writing: int | None = None
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(errno.ENOENT, f"no such checkpoint directory: {self.directory}")
    if not read_only and jax.process_index() == 0 and self.directory.is_dir():
      # Left by a save of this run directory that died before its rename (the run lock
      # says no other run writes here); they may fill the disk again.
      for stale in self.directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(stale)
    # Orbax writes into a temporary directory and renames it when complete, so
    # a save interrupted mid-way is never listed. Pruning is ours (`check`):
    # Orbax's max_to_keep would drop a good checkpoint for a diverged one.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None,
      create=not read_only,
      read_only=read_only,
      async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    # Orbax decides a time-based save on the primary process and shares the decision,
    # so all processes save the same step; it skips a step while a save is in flight.
    self._by_time = every_seconds and ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
      minimum_interval_secs=every_seconds
    )
    self._last_save = datetime.datetime.now(datetime.timezone.utc)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int, now: datetime.datetime | None = None) -> bool:
    """Whether to save the weights after `step` updates: every `every` steps, or once
    `every_seconds` have passed since the last save (or since this object was made).

    With `every_seconds`, every process must call this at every step (it is collective)."""
    by_steps = bool(self.every) and step % self.every == 0
    if not self._by_time:
      return by_steps
    now = now or datetime.datetime.now(datetime.timezone.utc)
    by_time = self._by_time.should_save(
      _StepInfo(step, now),
      previous_steps=[_StepInfo(step - 1, self._last_save)],
      context=ocp.checkpoint_managers.DecisionContext(
        is_saving_in_progress=self.manager.is_saving_in_progress(),
        reached_preemption=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(),
      ),
    )
    return by_steps or by_time

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    """Starts an async save; it is kept once `check(step, loss)` sees a finite loss."""
    with disk_errors(self.directory):
      # The previous save finishes first (`manager.save` would wait for it too), so that
      # `_writing` names this step when its checksums are written.
      self.manager.wait_until_finished()
      self._writing = step
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
    self.unconfirmed.add(step)
    self._saved.add(step)
    self._last_save = datetime.datetime.now(datetime.timezone.utc)

  def _write_checksums(self) -> None:
    """Orbax's post-finalization callback: on the primary process, once every process has
    written its files, before the rename that publishes the step. So a step is listed only
    with its checksums. Orbax's own step files at the top (`_CHECKPOINT_METADATA`, rewritten
    at the rename) are not covered."""
    tmp = self.directory / f"{self._writing}{ocp.path.atomicity.TMP_DIR_SUFFIX}"
    names = sorted(
      str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file() and path.parent != tmp
    )
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
      digests = pool.map(lambda name: _sha256(tmp / name), names)
      (tmp / CHECKSUMS).write_text(json.dumps({"sha256": dict(zip(names, digests))}, indent=1))

  def save_final(self, step: int, params, opt_state, meta: dict) -> None:
    """No step runs on the last weights (of the run, or before it stops): they are kept if
    every parameter is finite. When the latest checkpoint is `step` already (saved just
    before, or restored: a stop in an evaluation at that step), it is not saved again, and
    checked only if no loss confirmed it yet."""
    saved = step == self.latest_step()
    if (not saved or step in self.unconfirmed) and not bool(_finite(params)):
      self.check(step, math.nan, what=f"a parameter is not finite after step {step}")
    if not saved:
      self.save(step, params, opt_state, meta)
    self.wait()
    self._confirm(step)

  def check(self, step: int, loss: float, what: str | None = None) -> None:
    """`loss` was computed on the weights after `step` updates.

    Finite: the checkpoints up to `step` are good; the oldest beyond `keep`
    are deleted. Otherwise the checkpoints from `step` on that this run saved
    are deleted (their weights gave that loss) and NonFiniteLossError names the
    one a resume starts from. A restored checkpoint is never deleted: a loss on
    it alone does not prove its weights bad (a changed setting can cause it).
    """
    if math.isfinite(loss):
      self._confirm(step)
      return
    self.wait()  # let in-flight saves land before deleting them
    for bad in [s for s in self.manager.all_steps() if s >= step and s in self._saved]:
      self.manager.delete(bad)
    self.unconfirmed.clear()
    kept = self.latest_step()
    if kept is None:
      resume = f"no checkpoint with finite weights is left in {self.directory}"
    elif kept >= step:
      resume = (
        f"checkpoint {kept}, which this run resumed from, is left in {self.directory} (this "
        "run did not write it, so it cannot tell whether its weights gave that loss); to "
        f"continue from an earlier one, move {self.directory / str(kept)} out of "
        f"{self.directory} and resume with train.resume=true (and a smaller optimizer.lr)"
      )
    else:
      resume = (
        f"the last good checkpoint, step {kept}, is kept in {self.directory}: continue "
        "with train.resume=true (and a smaller optimizer.lr)"
      )
    what = what or f"loss is {loss} at step {step + 1}, computed on the weights after step {step}"
    raise NonFiniteLossError(f"{what}: stopping; {resume}.")

  def _confirm(self, step: int) -> None:
    self.unconfirmed = {s for s in self.unconfirmed if s > step}
    self._prune()

  def _prune(self) -> None:
    """Deletes the oldest confirmed checkpoints beyond `keep`, counting complete ones only."""
    good = [
      s
      for s in self.manager.all_steps()
      if s not in self.unconfirmed and s != self._writing  # (Orbax lists a save in flight)
    ]
    for old in sorted(good)[: -self.keep]:
      self.manager.delete(old)

  def read_meta(self) -> dict:
    """The meta (step, data position, fingerprints) of the checkpoint to restore, without its
    arrays, to check a resume before anything is restored."""
    step = self._restorable_step()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise self._corrupt(step, e) from e
    return restored["meta"]

  def _restorable_step(self) -> int:
    """The latest step, once its files match their checksums. One that does not is a
    CorruptCheckpointError, left as it is; with `fall_back_on_corruption`, it is moved aside
    (never deleted; left in place, a later save of its step would overwrite it and pruning
    would count it as good) and the one before it is checked."""
    if self._restore_from is not None:
      return self._restore_from
    for step in sorted(self.manager.all_steps(), reverse=True):
      damage = self._damaged_file(step)
      if damage is None:
        self._restore_from = step
        return step
      corrupt = f"checkpoint {self.directory / str(step)} is corrupt: {damage}"
      if not self.fall_back_on_corruption:
        earlier = [s for s in self.manager.all_steps() if s < step]
        raise CorruptCheckpointError(
          f"{corrupt}; it is left as it is. "
          + (
            f"To resume from step {max(earlier)}, the checkpoint before it, set "
            "checkpoint.fall_back_on_corruption=true (which moves it aside), or move it out "
            f"of {self.directory}"
            if earlier
            else f"No earlier checkpoint is in {self.directory}"
          )
        )
      log(f"{corrupt}; {self._set_aside(step)} (checkpoint.fall_back_on_corruption=true)")
    raise CorruptCheckpointError(f"no checkpoint in {self.directory} matches its checksums")

  def _damaged_file(self, step: int) -> str | None:
    """The first file of checkpoint `step` that differs from what was written, and how; None
    when all match, or when the step has no checksums (saved before they were written).
    Each process hashes a share of the files; all return the same verdict."""
    step_dir = self.directory / str(step)
    damage = None
    if (step_dir / CHECKSUMS).exists():
      try:
        written = json.loads((step_dir / CHECKSUMS).read_text())["sha256"]
        names = sorted(written)[jax.process_index() :: jax.process_count()]
      except (ValueError, KeyError, TypeError) as e:
        damage = f"{step_dir / CHECKSUMS}: not the checksums written with it ({e!r})"
      else:
        with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
          found = pool.map(lambda name: _file_damage(step_dir / name, written[name]), names)
          damage = next((d for d in found if d is not None), None)
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(damage is not None))
      if damage is None and flags.any():
        damage = f"a file that process {int(np.argmax(flags))} names in its output"
    return damage

  def _set_aside(self, step: int) -> str:
    """Moves the corrupt checkpoint `step` out of the list of steps; says where it went."""
    if self.read_only:
      return "restoring the one before it; it is left in place (another run's checkpoints)"
    aside = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()
    return f"moved it to {aside} and restoring the one before it"

  def _corrupt(self, step: int, error: Exception) -> CorruptCheckpointError:
    # The restore's other reads still report into Orbax's closed event loop from
    # TensorStore threads ("Event loop is closed"): let them finish first, so the
    # error is the last thing a user sees.
    time.sleep(1)
    step_dir = self.directory / str(step)
    return CorruptCheckpointError(
      f"checkpoint {step_dir} is corrupt or truncated: {_bad_file(error, step_dir)}; "
      f"to resume from the checkpoint before it, move it out of {self.directory}"
    )

  def restore(self, params, opt_state) -> tuple:
    """(params, opt_state, meta) of the latest step, placed like `params` and `opt_state`
    (and cast to their dtypes).

    Its weights count as unconfirmed until the first step's loss is seen.
    """
    step = self._restorable_step()
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {"params": params, "opt_state": opt_state},
    )
    try:
      saved = self.manager.item_metadata(step)["state"].tree
    except Exception as e:
      raise self._corrupt(step, e) from e
    differences = _shape_differences(saved, abstract)
    if differences:  # checkpoints older than `state_fingerprint`, or a field it misses
      raise ConfigError(
        f"cannot resume from {self.directory / str(step)}: its arrays do not fit this run's "
        f"model and optimizer ({'; '.join(differences)}); resume with the settings it was "
        "saved with, or train into a fresh train.output_dir (the checkpoint is intact and is "
        "left as it is)"
      )
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:
      raise self._corrupt(step, e) from e
    self.unconfirmed.add(step)
    return restored["state"]["params"], restored["state"]["opt_state"], restored["meta"]

  def wait(self) -> None:
    """Finishes the save in flight; then the checkpoints it replaces can go."""
    with disk_errors(self.directory):
      self.manager.wait_until_finished()
    self._writing = None
    self._prune()


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{"params.layers.w": shape} for a tree of arrays or of Orbax's saved array metadata
  (in which the optimizer state's named tuples are dicts)."""

  def name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _shape_differences(saved, abstract, shown: int = 4) -> list[str]:
  """The arrays that the checkpoint lacks, has in excess or holds in another shape."""
  before, now = _leaf_shapes(saved), _leaf_shapes(abstract)
  differences = [
    f"{k}: {before[k] if k in before else 'absent'} -> {now[k] if k in now else 'absent'}"
    for k in sorted(before.keys() | now.keys())
    if before.get(k) != now.get(k)
  ]
  more = len(differences) - shown
  return differences[:shown] + ([f"{more} more"] if more > 0 else [])


# Files are hashed in parallel threads: hashlib releases the GIL while it hashes a large chunk.
_HASH_THREADS = min(32, os.cpu_count() or 1)


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _file_damage(path: Path, written: str) -> str | None:
  """How the file at `path` differs from the one whose sha256 was `written`; None if not."""
  try:
    actual = _sha256(path)
  except FileNotFoundError:
    return f"{path}: missing"
  except OSError as e:
    return f"{path}: unreadable ({e.strerror})"
  return None if actual == written else f"{path}: its sha256 is {actual}, not {written} as saved"


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

"""The output directory holds one run: checked before any work, continued without mixing.

A directory with another run's log or checkpoints is refused unless the run continues it
(`train.resume=true`) or replaces it (`train.overwrite=true` moves it aside);
the directory and its `checkpoints/` must be writable. A resumed run keeps the
original `config.yaml`, writes its own beside it and drops the log records
after the step it resumes from (and the evaluation at that step, when it runs again), so
every step and evaluation is logged once.

A live run holds `run.lock` in its directory for its whole life, so a second run
into the same directory is refused before any work, naming the first. The lock is
an exclusive `flock` on that file, which the kernel releases however the process
ends (SIGKILL included); the file names the holder (pid, host, start time) for
that message and is emptied when the run ends. A file that still names a run
whose lock is free (it was killed) is taken over, saying so. Holding the lock, a
run removes the temporary folders that a killed run's Hugging Face export left.
With several processes only process 0 locks, and all of them stop if it cannot, or if
another process cannot write the directory. On a shared
file system (NFS), `flock` excludes runs on other hosts too; a file system
without cross-host locks (some FUSE mounts) cannot tell two hosts' runs apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from train.config import Config, ConfigError, save_config
from train.models.pretrained import remove_unfinished_exports
from train.paths import RunPaths


class RunDirInUse(ConfigError):
  """Another live run holds the output directory."""


def _writable(directory: Path) -> None:
  """Fails at once with the path, not after training when the first save hangs."""
  probe = directory / f".write_test-{socket.gethostname()}-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise OSError(e.errno, f"cannot write to {directory}: {e.strerror}") from None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class RunLock:
  """An exclusive lock on `<directory>/run.lock`, held until `release()` or process exit."""

  def __init__(self, directory: Path):
    self.path = RunPaths(directory).lock
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise self._in_use(self._holder()) from None
      # The lock is free, so whoever the file names has ended (on this host flock is
      # always exact: a file system without locks gets the kernel's local ones).
      holder = self._holder()
      if holder:
        gone = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid", -1))
        print(
          f"taking over {self.path}: {self._describe(holder)} did not release it "
          f"({'no longer running' if gone else 'its lock is free'})",
          flush=True,
        )
      os.ftruncate(self._fd, 0)
      os.pwrite(
        self._fd,
        json.dumps(
          {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%c")}
        ).encode(),
        0,
      )
    except BaseException:
      os.close(self._fd)
      raise

  def _holder(self) -> dict:
    try:
      return json.loads(os.pread(self._fd, 4096, 0) or b"{}")
    except ValueError:  # torn by a kill mid-write
      return {}

  @staticmethod
  def _describe(holder: dict) -> str:
    return (
      f"run pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
      f"(started {holder.get('started', '?')})"
    )

  def _in_use(self, holder: dict) -> RunDirInUse:
    who = self._describe(holder) if holder else "another run"
    return RunDirInUse(
      f"{self.path.parent} is in use by {who}, which holds {self.path}: wait for it to "
      "end, or choose another train.output_dir"
    )

  def release(self) -> None:
    """Empties the file (no holder to name) and unlocks it."""
    if self._fd < 0:
      return
    with contextlib.suppress(OSError):  # a directory that vanished or filled up
      os.ftruncate(self._fd, 0)
    os.close(self._fd)  # closing releases the flock
    self._fd = -1


def _lock_and_check(out: Path, config: Config) -> RunLock:
  """Process 0: locks `out`, checks that it holds no other run (or moves it aside), and
  writes the config."""
  t = config.train
  _writable(out)
  lock = RunLock(out)
  try:
    # A run that trained left log records or checkpoints; a config.yaml and an eval log of
    # the evaluation before (a run that stopped before its first step) are simply replaced.
    previous = [
      p.name
      for p in (RunPaths(out).train_log, RunPaths(out).checkpoints)
      if p.is_file() and p.stat().st_size or p.is_dir() and any(p.iterdir())
    ]
    if previous and t.resume is not True:
      if not t.overwrite:
        raise ConfigError(
          f"{out} already holds a run ({', '.join(previous)}): continue it with "
          "train.resume=true, choose a fresh train.output_dir, or set train.overwrite=true "
          "to move it aside"
        )
      aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
      out.rename(aside)  # the lock moves with it: take one in the fresh directory
      lock.release()
      RunPaths(aside).lock.unlink()
      print(f"moved the previous run in {out} to {aside}")
      _writable(out)
      lock = RunLock(out)
    _writable(RunPaths(out).checkpoints)
    _remove_unfinished_exports(out, config)
    if t.resume is not True:
      save_config(config, RunPaths(out).config)
      RunPaths(out).eval_log.unlink(missing_ok=True)  # this run evaluates before again
  except BaseException:
    lock.release()
    raise
  return lock


def _remove_unfinished_exports(out: Path, config: Config) -> None:
  """The temporary folders of exports into `out` that a kill stopped (up to a whole model
  each). The lock says that no other run writes there, and this one has not begun to; an
  export directory outside `out` is not covered by it, and is left alone."""
  export = Path(config.checkpoint.export_dir or RunPaths(out).export).resolve()
  if export.is_relative_to(out.resolve()):
    for line in remove_unfinished_exports(export):
      print(line, flush=True)


def resume_source(config: Config) -> Path | None:
  """The checkpoints a `train.resume=<path>` run starts from: `<path>` itself or, for a run
  directory, its `checkpoints/`; it must exist. None for `train.resume=true` or false."""
  resume = config.train.resume
  if not isinstance(resume, str):
    return None
  path = Path(resume)
  if RunPaths(path).checkpoints.is_dir():
    path = RunPaths(path).checkpoints
  if not path.is_dir():
    raise FileNotFoundError(
      errno.ENOENT,
      f"train.resume={resume}: no such directory (a run's output_dir or its checkpoints/)",
    )
  return path


def claim(out: Path, config: Config) -> RunLock | None:
  """Checks and claims the run directory before any work; returns process 0's lock, to be
  released when the run ends (other processes: None).

  :raises RunDirInUse: another live run holds `out`.
  :raises ConfigError: `out` holds a finished or stopped run that this one would mix with.
  :raises OSError: `out` is not writable, or `train.resume=<path>` does not exist.
  """
  lock, error = None, None
  try:
    resume_source(config)
    if jax.process_index() == 0:
      lock = _lock_and_check(out, config)
  except (ConfigError, OSError) as e:
    error = e
  _stop_together(error, lock, f"could not claim {out}", ConfigError)
  if jax.process_index() != 0:  # now that process 0 has made the directory
    try:
      if not RunPaths(out).lock.is_file():
        raise OSError(
          errno.ENOENT,
          f"{out} on this host is not the directory process 0 made (it holds no "
          f"{RunPaths(out).lock.name}): mount the same file system at that path on every host",
        )
      for directory in (out, RunPaths(out).checkpoints):
        _writable(directory)
    except OSError as e:
      error = e
  _stop_together(error, lock, f"cannot write {out}", OSError)
  return lock


def _stop_together(error: Exception | None, lock: RunLock | None, what: str, kind) -> None:
  """Raises `error`; with several processes, one raised in another process raises a `kind`
  here naming it (and releases `lock`): every process stops, rather than wait for it in the
  next collective."""
  if jax.process_count() > 1:
    failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.size:
      if lock is not None:
        lock.release()
      raise kind(f"process {', '.join(map(str, failed))} of this run {what}; its output says why")
  if error is not None:
    raise error


def resumed(out: Path, config: Config, step: int, evaluates_again: bool = False) -> None:
  """Continuing the run in `out` at `step`: its config beside the original, the train and eval
  logs cut at `step` (the eval log before it when the resume `evaluates_again` there)."""
  if jax.process_index() != 0 or config.train.resume is not True:
    return
  save_config(config, RunPaths(out).resumed_config(step))
  paths = RunPaths(out)
  for log, last in (
    (paths.train_log, step),
    (paths.eval_log, step - 1 if evaluates_again else step),
  ):
    if log.is_file():
      kept = []
      for line in log.read_text().splitlines():
        try:
          if json.loads(line)["step"] <= last:
            kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):  # a line torn by a kill
          pass
      log.write_text("".join(kept))

"""Command line: python -m train --config configs/default.yaml [section.key=value ...]"""

import argparse
import os
import shlex
import signal
import sys

from train.config import ConfigError, load_config


def _how_to_continue(stopped, config, argv) -> str:
  """This very command line, set to resume from the checkpoint the run saved."""
  command = sys.orig_argv if argv is None else ["python", "-m", "train", *argv]
  if not stopped.saved:
    return f"start it again: {shlex.join(command)}"
  kept = [a for a in command if not a.startswith(("train.resume=", "train.overwrite="))]
  extra = ["train.resume=true"] + (["train.overwrite=false"] if config.train.overwrite else [])
  return f"resume with: {shlex.join(kept + extra)}"


def _last_words(message: str) -> None:
  """Prints `message` as the last line on stderr. Orbax's writer threads may still be unwinding
  a failed save and printing tracebacks to stderr; from here on their writes go to /dev/null, so
  the root cause cannot be interleaved with them. A thread may have stopped mid-line (a traceback
  line and its newline are two writes), so the message starts on a line of its own. For a
  process about to exit only."""
  sys.stderr.flush()
  stderr = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(stderr, f"\n{message}\n".encode())


def _ignore_stop_request(signum, frame) -> None:
  name = signal.Signals(signum).name
  print(f"{name}: ignored: the run has written everything; it ends (exit 0)", file=sys.stderr)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
  parser.add_argument("--config", default="configs/default.yaml", help="YAML config file")
  parser.add_argument(
    "overrides", nargs="*", help="dotted overrides, e.g. optimizer.mask_ratio=0.3"
  )
  args = parser.parse_args(argv)
  try:  # fail on a bad key or value before importing JAX or loading anything
    config = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  # JAX and the trainer only now: a config error above costs no JAX start-up.
  import jax

  from train.checkpoints import (
    PREEMPTED_EXIT_CODE,
    CorruptCheckpointError,
    NonFiniteLossError,
    Preempted,
  )
  from train.loop import run

  try:
    run(config)
  except Preempted as e:
    print(f"{e}; {_how_to_continue(e, config, argv)}", file=sys.stderr)
    # Every process stopped at the same point: leave the coordination service together, so
    # that process 0 (which serves it) exiting first does not abort the others.
    jax.distributed.shutdown()
    return PREEMPTED_EXIT_CODE
  except ConfigError as e:  # found once the output dir or a checkpoint is seen
    _last_words(f"config error: {e}")
    return 2
  except (NonFiniteLossError, CorruptCheckpointError, OSError) as e:
    _last_words(f"error: {e}")
    return 1
  # Everything is written: a stop request from now on changes nothing (the run has ended
  # with 0), while the processes leave the coordination service together.
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _ignore_stop_request)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  code = main()
  # Exit without interpreter teardown: it takes seconds (XLA's destructors), in which Python
  # runs no signal handler, so a SIGTERM would turn a finished run into 143; and after an
  # error, Orbax's TensorStore threads would print "Event loop is closed" tracebacks after the
  # last line printed above.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)

"""The run's life on preemptible machines and shared directories: SIGTERM/SIGINT stop after a
saved step and a resume continues bit for bit (1 and 2 processes), one run per directory
(`run.lock`), resumes that name what changed, another run's directory left untouched."""

import collections
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train
from tests.test_train import ROOT, TINY, _launch_two_processes, _losses
from train import loop as loop_module
from train import run_dir
from train.checkpoints import PREEMPTED_EXIT_CODE, Interrupted, Preempted, Preemption
from train.config import ConfigError, load_config
from train.eval import evaluator as evaluator_module
from train.paths import RunPaths
from train.records import read_jsonl
from train.run_dir import RunDirInUse, RunLock

# No evaluation: these tests are about steps, checkpoints and the directory.
QUICK = {**TINY, "eval": {"before": False, "after": False}}
STOPPED = re.compile(
  r"^(SIGTERM|SIGINT): stopped after step (\d+), saved in (\S+); resume with: (.+)$", re.M
)


def _config(out: Path, steps: int, **sections) -> dict:
  return {**QUICK, "train": {**QUICK["train"], "steps": steps, "output_dir": str(out)}, **sections}


def _env(tmp_path: Path) -> dict:
  # Later runs reuse what earlier ones compiled: these runs are mostly compilation.
  return {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "jax_cache_preemption"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }


def _cli(tmp_path: Path, config: dict, *overrides: str) -> subprocess.Popen:
  path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
  path.write_text(json.dumps(config))
  return subprocess.Popen(
    [sys.executable, "-m", "train", "--config", str(path), *overrides],
    cwd=ROOT,
    env=_env(tmp_path),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


# `python -m train ARGS...` that sends itself SIGTERM when FUNCTION (module:name) is called for
# the Nth time: moments a test cannot hit from outside. Its printed commands are `python -m
# train ARGS...`, which they stand for.
_SIGNALLED = """
import importlib, os, runpy, signal, sys
function, nth, *args = sys.argv[1:]
module_name, name = function.split(":")
module = importlib.import_module(module_name)
original, calls = getattr(module, name), []
def signalled(*a, **k):
  calls.append(1)
  if len(calls) == int(nth):
    os.kill(os.getpid(), signal.SIGTERM)
  return original(*a, **k)
setattr(module, name, signalled)
sys.argv = ["train", *args]
sys.orig_argv = [sys.executable, "-m", "train", *args]
runpy.run_module("train", run_name="__main__")
"""


def _signalled_cli(tmp_path: Path, config: dict, function: str, nth: int = 1) -> tuple:
  """(exit code, stdout, stderr) of `python -m train --config <config>`, which sends itself
  SIGTERM at the `nth` call of `function`."""
  path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
  path.write_text(json.dumps(config))
  command = [sys.executable, "-c", _SIGNALLED, function, str(nth), "--config", str(path)]
  done = subprocess.run(
    command, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900
  )
  return done.returncode, done.stdout, done.stderr


def _wait_for_steps(out: Path, steps: int, procs: list, timeout: float = 900) -> None:
  """Until the run in `out` has logged `steps` steps; fails with the runs' output (and
  kills them: SIGTERM would only stop them after a step) when one ends or none comes."""
  log, deadline = out / "train_log.jsonl", time.monotonic() + timeout
  while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      for p in procs:
        p.kill()
      outputs = [str(p.communicate())[-3000:] for p in procs]
      pytest.fail(f"no step {steps} in {out} while all runs lived: {outputs}")
    time.sleep(0.2)


def test_sigterm_saves_the_current_step_and_its_resume_equals_the_straight_run(tmp_path):
  """One process, `checkpoint.every=0`: SIGTERM mid-run ends with exit 75 and one line
  naming the step and the command that resumes it; that command finishes the run with the
  losses of a run that was never stopped, bit for bit."""
  steps = 50
  stopped = _cli(tmp_path, _config(tmp_path / "stopped", steps))
  _wait_for_steps(tmp_path / "stopped", 2, [stopped])
  stopped.send_signal(signal.SIGTERM)
  _, stderr = stopped.communicate(timeout=900)
  train.run(_config(tmp_path / "straight", steps))
  assert stopped.returncode == PREEMPTED_EXIT_CODE, stderr
  signal_name, step, saved, command = STOPPED.search(stderr).groups()
  step = int(step)
  assert signal_name == "SIGTERM" and 2 <= step < steps
  assert stderr.rstrip().endswith(command)  # the last line
  checkpoints = tmp_path / "stopped" / "checkpoints"
  assert saved == str(checkpoints / str(step)) and os.listdir(checkpoints) == [str(step)]
  assert sorted(_losses(tmp_path / "stopped")) == list(range(1, step + 1))
  assert RunPaths(tmp_path / "stopped").lock.read_text() == ""  # released
  resumed = subprocess.run(
    shlex.split(command), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True
  )
  assert resumed.returncode == 0, resumed.stderr
  assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")  # bit for bit


def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tmp_path):
  """2 processes x 4 devices; SIGTERM to process 1 only: JAX's preemption service makes
  both stop after the same step, save it and exit 75; resumed on 2 processes, the losses
  equal those of a 2-process run never stopped. Meanwhile `checkpoint.every_seconds` saves
  by process 0's clock, at steps both processes agree on (a disagreement would hang)."""
  # Enough steps that the stop notice reaches both processes before the run ends: on a quiet
  # machine 40 tiny steps could finish first; here the stop lands 2 steps after the signal.
  steps = 100
  config = {**_config(tmp_path / "stopped", steps), "checkpoint": {"keep": 100}}
  stopped = _launch_two_processes(
    config, tmp_path / "stopped.json", "checkpoint.every_seconds=1", cli=True
  )
  straight = _launch_two_processes(
    _config(tmp_path / "straight", steps), tmp_path / "straight.json", cli=True
  )
  try:
    _wait_for_steps(tmp_path / "stopped", 2, stopped)
    stopped[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=900)[0] for p in stopped + straight]
  finally:
    for p in stopped + straight:
      p.kill()  # (only one left running: SIGTERM would not end it)
  assert [p.returncode for p in stopped] == [PREEMPTED_EXIT_CODE] * 2, outputs[:2]
  assert [p.returncode for p in straight] == [0, 0], outputs[2:]
  found = [STOPPED.search(output) for output in outputs[:2]]
  assert all(found), outputs[:2]  # (a stop at the last step would say "training is done")
  lines = [match.groups() for match in found]
  step = int(lines[0][1])
  assert lines[0][1:3] == lines[1][1:3] and step < steps  # the same step and checkpoint
  assert [f"mesh.process_id={i}" in line[3] for i, line in enumerate(lines)] == [True, True]
  saved = sorted(int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir())
  assert saved[-1] == step and len(saved) > 1  # every_seconds saved before the stop
  resumed = _launch_two_processes(
    json.loads((tmp_path / "stopped.json").read_text()),
    tmp_path / "stopped.json",
    "train.resume=true",
    cli=True,
  )
  outputs = [p.communicate(timeout=900)[0] for p in resumed]
  assert [p.returncode for p in resumed] == [0, 0], outputs
  assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")  # bit for bit


def test_sigterm_in_the_evaluation_after_training_stops_it_and_the_resume_runs_what_is_left(
  tmp_path,
):
  """SIGTERM as the evaluation after training begins, with `checkpoint.save_final=false`: the
  run stops before its next batch, saves the final checkpoint, exits 75 and says what is
  done and what is left; the printed command runs only the evaluation and the export."""
  out = tmp_path / "run"
  config = {
    **_config(out, 3),
    "eval": {"before": False, "after": True, "accuracy": False},
    "checkpoint": {"save_final": False, "export": True},
  }
  code, stdout, stderr = _signalled_cli(tmp_path, config, "train.eval.evaluator:held_out_loss")
  assert code == PREEMPTED_EXIT_CODE, stderr
  assert (
    "SIGTERM: stopping after the current batch of the evaluation after training, saving the "
    "final checkpoint (exit 75); the resume runs only the evaluation after training and the "
    "export\n"
  ) in stderr
  last = stderr.rstrip().splitlines()[-1]
  stopped = re.fullmatch(
    rf"SIGTERM: stopped after step 3, saved in {out}/checkpoints/3, during the evaluation "
    r"after training: training is done; the resume runs only the evaluation after training "
    r"and the export; resume with: (.+)",
    last,
  )
  assert stopped, last
  assert "[eval after]" not in stdout and not (out / "hf").exists()  # neither ran
  assert os.listdir(out / "checkpoints") == ["3"] and sorted(_losses(out)) == [1, 2, 3]
  resumed = subprocess.run(
    shlex.split(stopped[1]), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True
  )
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from {out}/checkpoints at step 3" in resumed.stdout
  assert "[eval after]" in resumed.stdout and (out / "hf" / "model.safetensors").is_file()
  assert sorted(_losses(out)) == [1, 2, 3]  # no step ran again


def _sigterm_when_called(monkeypatch, module, name: str, returned: bool = False) -> None:
  """In this process: `module.name` sends SIGTERM to it as it is called (`returned`: as it
  returns, as a signal in its last moments would)."""
  original = getattr(module, name)

  def signalled(*args, **kwargs):
    result = original(*args, **kwargs) if returned else None
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the handler runs between bytecodes
    return result if returned else original(*args, **kwargs)

  monkeypatch.setattr(module, name, signalled)


def test_sigterm_in_an_evaluation_during_training_saves_its_step_and_the_resume_runs_it_first(
  tmp_path, monkeypatch, capsys
):
  """SIGTERM as the evaluation at step 2 begins, its step's save in flight
  (`checkpoint.every=2`): the evaluation stops before its first batch, step 2 is kept and the
  run stops there. The resume evaluates at step 2 first; a SIGTERM in its last batch stops
  it once it is logged. The next resume does not evaluate again, and trains on."""
  out = tmp_path / "run"
  evaluation = {**QUICK["eval"], "accuracy": False, "every": 2}  # the held-out loss alone
  config = _config(out, 4, eval=evaluation, checkpoint={"every": 2})
  _sigterm_when_called(monkeypatch, evaluator_module, "held_out_loss")
  with pytest.raises(Preempted) as raised:
    train.run(config)
  assert str(raised.value) == (
    f"SIGTERM: stopped after step 2, saved in {out}/checkpoints/2, during the evaluation at "
    "step 2; the resume runs it first"
  )
  assert (
    "SIGTERM: stopping after the current batch of the evaluation at step 2, saving step 2 "
    "(exit 75); the resume runs that evaluation first\n"
  ) in capsys.readouterr().err
  assert os.listdir(out / "checkpoints") == ["2"] and sorted(_losses(out)) == [1, 2]
  assert not RunPaths(out).eval_log.exists()

  owed = "the evaluation due at step 2 is not in the eval log: it runs first"
  monkeypatch.undo()
  _sigterm_when_called(monkeypatch, evaluator_module, "held_out_loss", returned=True)
  with pytest.raises(Preempted) as raised:
    train.run(config, ["train.resume=true"])
  assert str(raised.value) == (
    f"SIGTERM: stopped after step 2, saved in {out}/checkpoints/2, after the evaluation at step 2"
  )
  assert owed in capsys.readouterr().out
  assert [r["step"] for r in read_jsonl(RunPaths(out).eval_log)] == [2]

  monkeypatch.undo()
  train.run(config, ["train.resume=true"])
  assert owed not in capsys.readouterr().out
  assert sorted(_losses(out)) == [1, 2, 3, 4]
  assert [r["step"] for r in read_jsonl(RunPaths(out).eval_log)] == [2]


def test_sigterm_before_the_first_step_stops_it_with_nothing_to_save(tmp_path, monkeypatch, capsys):
  """SIGTERM in the evaluation before training stops it within a batch; SIGTERM while the run
  loads stops it before that evaluation. Both say so, and that nothing is saved."""
  out = tmp_path / "run"
  config = _config(out, 2, eval={**QUICK["eval"], "before": True, "accuracy": False})
  _sigterm_when_called(monkeypatch, evaluator_module, "held_out_loss")
  with pytest.raises(Preempted) as raised:
    train.run(config)
  assert not raised.value.saved and str(raised.value) == (
    "SIGTERM: stopped after step 0, nothing to save, during the evaluation before training"
  )
  assert capsys.readouterr().err == (
    "SIGTERM: stopping after the current batch of the evaluation before training (exit 75); "
    "nothing is trained yet: the run starts again\n"
  )
  assert not (out / "train_log.jsonl").exists()
  monkeypatch.undo()
  _sigterm_when_called(monkeypatch, loop_module, "setup_run")
  with pytest.raises(Preempted) as raised:
    train.run(config)  # (a run that trained nothing is started afresh)
  assert str(raised.value) == "SIGTERM: stopped after step 0, nothing to save"
  assert capsys.readouterr().err == "SIGTERM: stopping before the first step (exit 75)\n"


def test_sigterm_in_the_export_stops_it_at_once_and_once_all_is_written_changes_nothing(
  tmp_path,
):
  """SIGTERM after the export's first tensor: it stops at once, leaves no partial export,
  exits 75 and says what is done; the printed command evaluates again (its record replaces
  the first) and exports. A SIGTERM once that run has
  written everything (its last line printed, while the interpreter exits) changes nothing:
  no promise of 75, exit 0."""
  out = tmp_path / "run"
  config = {
    **_config(out, 2),
    "eval": {**QUICK["eval"], "after": True, "accuracy": False},
    "checkpoint": {"export": True},
  }
  code, _, stderr = _signalled_cli(tmp_path, config, "train.models.pretrained:to_host", nth=2)
  assert code == PREEMPTED_EXIT_CODE, stderr
  assert f"SIGTERM: stopping the export to {out}/hf at once (exit 75)\n" in stderr
  last = stderr.rstrip().splitlines()[-1]
  stopped = re.fullmatch(
    rf"SIGTERM: stopped after step 2, saved in {out}/checkpoints/2, during the export to "
    rf"{out}/hf: training and the evaluation after it are done; the resume runs only the "
    rf"evaluation after training and the export; resume with: (.+)",
    last,
  )
  assert stopped, last
  assert sorted(p.name for p in out.iterdir() if "hf" in p.name) == []  # nor a temporary one
  resumed = subprocess.Popen(
    shlex.split(stopped[1]),
    cwd=ROOT,
    env=_env(tmp_path),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  for line in resumed.stdout:
    if line.startswith("outputs: "):  # the run's last line
      resumed.send_signal(signal.SIGTERM)  # (if it has not exited yet)
      break
  output = line + resumed.communicate(timeout=900)[0]
  assert resumed.returncode == 0, output
  assert "exit 75" not in output and "Traceback" not in output
  assert (out / "hf" / "model.safetensors").is_file()
  # The resume evaluated after training again: its record replaced the first one.
  assert [r["step"] for r in read_jsonl(RunPaths(out).eval_log)] == [2]


def test_a_stop_request_in_work_a_resume_redoes_stops_it_at_once_and_after_all_is_written_none(
  capsys,
):
  with Preemption() as preemption:
    preemption.stop_at_once("the export")
    with pytest.raises(Interrupted):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)  # the handler runs between bytecodes
    assert preemption.reached()
    with pytest.raises(Interrupted):  # asked before it began
      preemption.stop_at_once("the export, again")
    preemption.ignore("all is written")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
  assert capsys.readouterr().err.splitlines() == [
    "SIGTERM: stopping the export at once (exit 75)",
    "SIGINT: ignored: all is written",
  ]


def test_sigint_stops_after_the_step_and_a_second_sigint_at_once():
  with Preemption() as preemption:
    assert not preemption.reached()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)  # the handler runs between bytecodes
    assert preemption.reached() and preemption.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
  assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_two_runs_started_at_once_into_one_directory_the_second_is_refused(tmp_path):
  out = tmp_path / "run"
  config = _config(out, 2)
  first, second = _cli(tmp_path, config), _cli(tmp_path, config)
  results = {p.pid: p.communicate(timeout=600) for p in (first, second)}
  codes = sorted((p.returncode, p.pid) for p in (first, second))
  assert [code for code, _ in codes] == [0, 2], results
  (_, winner), (_, refused) = codes
  message = results[refused][1].splitlines()[-1]
  assert re.fullmatch(
    rf"config error: {out} is in use by run pid {winner} on host {socket.gethostname()} "
    rf"\(started .+\), which holds {RunPaths(out).lock}: wait for it to end, or choose another "
    r"train.output_dir",
    message,
  ), message
  assert "model:" not in results[refused][0]  # refused before any work
  assert sorted(_losses(out)) == [1, 2]  # one run's steps, each logged once
  assert RunPaths(out).lock.read_text() == ""  # released at the end


def _holding_process(directory: Path) -> subprocess.Popen:
  """Another live process that holds `directory`'s lock."""
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from pathlib import Path; from train.run_dir import RunLock; "
      "RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
      str(directory),
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline() == "locked\n"
  return holder


def test_the_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
  holder = _holding_process(tmp_path)
  try:
    with pytest.raises(RunDirInUse, match=rf"in use by run pid {holder.pid} on host "):
      RunLock(tmp_path)
  finally:
    holder.kill()
    holder.wait()
  # Killed (SIGKILL: no cleanup): its pid is in the file, its lock is free.
  lock = RunLock(tmp_path)
  assert re.fullmatch(
    rf"taking over {RunPaths(tmp_path).lock}: run pid {holder.pid} on host "
    rf"{socket.gethostname()} \(started .+\) did not release it \(no longer running\)\n",
    capsys.readouterr().out,
  )
  assert json.loads(RunPaths(tmp_path).lock.read_text())["pid"] == os.getpid()
  lock.release()
  assert RunPaths(tmp_path).lock.read_text() == ""
  RunLock(tmp_path).release()
  assert "taking over" not in capsys.readouterr().out  # a released lock is not stale


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  out = tmp_path / "run"
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text('{"model_type": "llama",')
  config = {**_config(out, 2), "model": {"path": str(model)}}
  config["data"] = {**config["data"], "tokenizer": "model"}
  with pytest.raises(ValueError, match="corrupt JSON"):
    train.run(config)
  assert RunPaths(out).lock.read_text() == ""
  RunLock(out).release()


def test_a_directory_whose_run_trained_nothing_is_started_afresh(tmp_path):
  """A run stopped before its first step left its config and the evaluation before: the same
  command starts again there, and that evaluation is logged once."""
  out = tmp_path / "run"
  paths = RunPaths(out)
  out.mkdir()
  paths.config.write_text("stale: true\n")
  paths.eval_log.write_text('{"step": 0, "eval_loss": 5.5}\n')
  run_dir.claim(out, load_config(_config(out, 2))).release()
  assert not paths.eval_log.exists() and "stale" not in paths.config.read_text()


def test_a_process_that_cannot_write_the_directory_stops_every_process(tmp_path, monkeypatch):
  """Claims of a 2-process run, seen from each process in turn. Process 0 claimed the
  directory, then process 1 reports that it cannot write it: process 0 stops too (rather than
  wait for it in a collective), naming it, and releases the lock. Process 1, on a host where
  that directory is not the one process 0 made (a mount missing), says so."""
  out = tmp_path / "run"
  config = load_config(_config(out, 2))
  monkeypatch.setattr(run_dir.jax, "process_count", lambda: 2)
  reports = iter([0, 1])  # process 1's: it claimed nothing; it cannot write
  monkeypatch.setattr(
    run_dir.multihost_utils, "process_allgather", lambda x: np.array([x, next(reports)])
  )
  with pytest.raises(OSError, match=rf"^process 1 of this run cannot write {out}; its output"):
    run_dir.claim(out, config)
  RunLock(out).release()  # free: process 0 released it

  monkeypatch.setattr(run_dir.jax, "process_index", lambda: 1)
  monkeypatch.setattr(run_dir.multihost_utils, "process_allgather", lambda x: np.array([0, x]))
  elsewhere = tmp_path / "not_mounted"
  with pytest.raises(OSError, match="on this host is not the directory process 0 made"):
    run_dir.claim(elsewhere, load_config(_config(elsewhere, 2)))


def test_a_resume_names_the_changed_model_or_method_and_keeps_the_checkpoint(tmp_path, capsys):
  out = tmp_path / "run"
  config = _config(out, 2)
  train.run(config)
  files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p != RunPaths(out).lock}
  wider = {"model": {**QUICK["model"], "hf_config": {**QUICK["model"]["hf_config"]}}}
  wider["model"]["hf_config"]["intermediate_size"] = 128
  for overrides, changed in (
    (wider, r"model.intermediate_size: 64 -> 128"),
    ({"optimizer": {**QUICK["optimizer"], "method": "sft"}}, r"optimizer.method: 'gmt' -> 'sft'"),
  ):
    with pytest.raises(ConfigError) as error:
      train.run({**config, **overrides}, ["train.resume=true", "train.steps=3"])
    assert re.search(rf"cannot resume from {out}/checkpoints: .*\({changed}\)", str(error.value))
    assert "intact" in str(error.value) and "corrupt" not in str(error.value)
  assert {p: p.read_bytes() for p in files} == files  # nothing touched
  capsys.readouterr()
  train.run(config, ["train.resume=true", "train.steps=3", "model.param_dtype=bfloat16"])
  assert (
    "model.param_dtype: float32 -> bfloat16: the checkpoint's float32 weights and optimizer "
    "state are cast to bfloat16"
  ) in capsys.readouterr().out
  assert sorted(_losses(out)) == [1, 2, 3]


def test_resuming_from_another_run_never_writes_there(tmp_path):
  other = tmp_path / "other"
  train.run(_config(other, 2))
  # Another run's save in flight: deleting it would break that run.
  in_flight = other / "checkpoints" / "3.orbax-checkpoint-tmp-1234567890"
  in_flight.mkdir()
  (in_flight / "part").write_text("being written")
  before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
  out = tmp_path / "run"
  train.run(_config(out, 3), [f"train.resume={other}"])
  assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
  assert sorted(_losses(out)) == [3]
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError, match=rf"train.resume={missing}: no such directory"):
    train.run(_config(tmp_path / "run2", 3), [f"train.resume={missing}"])
  assert not missing.exists() and not (tmp_path / "run2").exists()  # before any work


def _lines(path: Path) -> int:
  """How many lines `path` has now (0 if none): a log being written, not parsed."""
  return len(path.read_text().splitlines()) if path.is_file() else 0


def _under_way(out: Path, log: Path, first: bool) -> bool:
  """Whether a soak cycle's run is past its start-up: the first has saved its first
  checkpoint, a resumed one has restored its state."""
  return (out / "checkpoints" / "1").is_dir() if first else "resumed from " in log.read_text()


def _cycle_ended_as_promised(signal_sent, code: int, output: str) -> str:
  """Where the signal of one soak cycle landed, judged by its exit code and output; fails
  when the two disagree (an error, a broken promise, a death by SIGTERM after work began)."""
  last = output.rstrip().splitlines()[-1] if output.strip() else ""
  if code == 0:  # it had written everything (the signal came after, or was ignored)
    assert "\noutputs: " in output and "exit 75" not in output, output[-3000:]
    return "ignored, the work done" if ": ignored: " in output else "after the run ended"
  if signal_sent == signal.SIGKILL and code == -signal.SIGKILL:
    return "killed"
  assert signal_sent == signal.SIGTERM, (code, output[-3000:])
  if code == -signal.SIGTERM:  # before the run installed its handler: nothing was done
    assert "\nmesh " not in f"\n{output}", output[-3000:]
    return "before the run began"
  assert code == PREEMPTED_EXIT_CODE and "resume with: " in last, (code, output[-3000:])
  for during in ("the evaluation after training", "the export"):
    if f"during {during}" in last:
      return f"during {during}"
  return "after the last step" if "training is done" in last else "during training"


@pytest.mark.slow
def test_soak_sigterm_and_sigkill_at_random_moments_resume_to_the_straight_run_bit_for_bit(
  tmp_path,
):
  """20 cycles: a run (from the second cycle on, its resume command) gets SIGTERM or SIGKILL
  at a random moment: in start-up, a step, a checkpoint save, the evaluation after training,
  the export or the exit. Each cycle ends as its signal promises, the next resumes, and the
  finished run's losses, evaluation and export equal those of a run never stopped, bit for
  bit."""
  cycles, steps = 20, 45
  seed = random.randrange(2**32)
  rng = random.Random(seed)
  out, straight = tmp_path / "soak", tmp_path / "straight"
  config = {
    **_config(out, steps),
    "eval": {"before": False, "after": True, "accuracy": False},
    "checkpoint": {"every": 1, "keep": 2, "export": True},
  }
  path = tmp_path / "soak.json"
  path.write_text(json.dumps(config))
  resume = [sys.executable, "-m", "train", "--config", str(path), "train.resume=true"]
  landed: list[str] = []
  started = time.monotonic()
  env = {**_env(tmp_path), "PYTHONUNBUFFERED": "1"}  # its lines in the log as they come
  for cycle in range(cycles):
    log = tmp_path / f"cycle-{cycle}.log"
    with open(log, "w") as output:
      command = resume if cycle else resume[:-1]
      run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    # A random moment: in a quarter of the cycles any time from the start (mostly start-up),
    # else once the run is under way (resumed, or its first checkpoint saved: a run killed
    # before that has nothing to resume from); then after a random time, or once a random
    # number of steps more ran (a step, a save, the evaluation after, the export, the exit).
    under_way = cycle == 0 or rng.random() < 0.75
    while under_way and run.poll() is None and not _under_way(out, log, cycle == 0):
      time.sleep(0.05)
    deadline = time.monotonic() + rng.uniform(0, 10 if under_way else 12)
    more, logged = rng.randint(1, 8), _lines(out / "train_log.jsonl")
    while run.poll() is None and time.monotonic() < deadline:
      if _lines(out / "train_log.jsonl") >= logged + more:
        break
      time.sleep(0.05)
    signal_sent = rng.choice((signal.SIGTERM, signal.SIGKILL))
    run.send_signal(signal_sent)  # (unless it has ended)
    code = run.wait(timeout=900)
    where = _cycle_ended_as_promised(signal_sent, code, log.read_text())
    landed.append(f"{signal.Signals(signal_sent).name} {where}")
    print(f"cycle {cycle} (seed {seed}): {landed[-1]}, exit {code}")  # shown if one fails
  finished = subprocess.run(resume, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True)
  seconds = time.monotonic() - started
  report = (
    f"{cycles} cycles (seed {seed}) in {seconds:.0f} s: "
    f"{', '.join(f'{n} {c}' for c, n in sorted(collections.Counter(landed).items()))}"
  )
  print(report)
  assert finished.returncode == 0, (report, finished.stderr[-3000:])
  train.run({**config, "train": {**config["train"], "output_dir": str(straight)}})
  assert _losses(out) == _losses(straight), report  # every step once, bit for bit
  after = [json.loads(RunPaths(d).summary.read_text())["after"] for d in (out, straight)]
  assert after[0] == after[1], report
  exported = [(d / "hf" / "model.safetensors").read_bytes() for d in (out, straight)]
  assert exported[0] == exported[1], report

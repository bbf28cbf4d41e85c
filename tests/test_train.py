"""End-to-end runs of `train.run` on a tiny random Llama: resume, NaN stop, checkpoints,
multi-process equivalence, shipped configs, CLI errors."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import train
from train.checkpoints import NonFiniteLossError
from train.config import ConfigError, load_config
from train.data import Batches, prepare
from train.mesh import _StartupWatch
from train.models.decoder import abstract_model
from train.models.tokenizer import ByteTokenizer
from train.optimizer import build_optimizer
from train.plan import model_config_of

ROOT = Path(__file__).resolve().parents[1]
TINY = {
  "model": {
    "path": None,
    "hf_config": {
      "model_type": "llama",
      "vocab_size": 320,
      "hidden_size": 32,
      "intermediate_size": 64,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "num_key_value_heads": 2,
    },
  },
  "data": {"tokenizer": "bytes", "train_size": 64, "eval_size": 8, "max_length": 64},
  "optimizer": {"lr": 3e-3, "warmup_steps": 1},
  "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "tqdm": False},
  "eval": {"accuracy": False, "before": False},
  "mesh": {"data": 4, "fsdp": 1, "tensor": 2},
}


def _losses(out: Path) -> dict[int, float]:
  records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records}


def test_exact_resume_after_interruption(tmp_path):
  out = tmp_path / "run"
  config = {
    **TINY,
    "train": {**TINY["train"], "output_dir": str(out)},
    "checkpoint": {"every": 3, "keep": 5, "export": True},
    "eval": {"accuracy": True, "size": 4, "max_new_tokens": 4, "before": False},
  }
  summary = train.run(config)
  straight = _losses(out)
  assert sorted(straight) == [1, 2, 3, 4, 5, 6] and "accuracy" in summary["after"]
  assert (out / "config.yaml").is_file() and (out / "eval_after.jsonl").is_file()
  assert (Path(summary["export_dir"]) / "config.json").is_file()
  # Interrupted after step 5: checkpoint 6 never landed, steps 4-5 were logged.
  shutil.rmtree(out / "checkpoints" / "6")
  log = (out / "train_log.jsonl").read_text().splitlines()[:5]
  (out / "train_log.jsonl").write_text("\n".join(log) + "\n")
  original = (out / "config.yaml").read_text()
  with pytest.raises(ConfigError, match=r"data.train_size: 64 -> 32"):  # other rows at step 3
    train.run(config, ["train.resume=true", "data.train_size=32"])
  resumed = train.run(config, ["train.resume=true", "checkpoint.export=false"])
  again = _losses(out)
  assert [again[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]  # bit-identical
  assert resumed["after"]["eval_loss"] == summary["after"]["eval_loss"]
  steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]  # each step once
  assert (out / "config.yaml").read_text() == original
  assert "export: false" in (out / "config.resumed-3.yaml").read_text()


def test_an_output_dir_holding_a_run_is_refused_or_moved_aside(tmp_path):
  out = tmp_path / "run"
  config = {
    **TINY,
    "train": {**TINY["train"], "steps": 2, "output_dir": str(out)},
    "eval": {"before": False, "after": False},
  }
  train.run(config)
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  with pytest.raises(
    ConfigError,
    match=r"already holds a run.*train.resume=true.*fresh "
    r"train.output_dir.*train.overwrite=true",
  ):
    train.run(config, ["train.steps=1"])
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
  train.run(config, ["train.steps=1", "train.overwrite=true"])
  (aside,) = tmp_path.glob("run.replaced-*")
  assert sorted(_losses(aside)) == [1, 2] and (aside / "checkpoints" / "2").is_dir()
  assert sorted(_losses(out)) == [1] and os.listdir(out / "checkpoints") == ["1"]


def _cli_on_tmpfs(tmp_path, size: str, then: str, *overrides) -> subprocess.CompletedProcess:
  """`python -m train` with output_dir on a tmpfs of `size`, mounted in a user namespace
  (a disk that fills up, or is read-only after `then`), as root or not."""
  if (
    shutil.which("unshare") is None
    or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"]).returncode
  ):
    # Root ignores file permissions, so a full or read-only disk must be a real mount.
    pytest.skip(
      "a full or read-only disk needs a tmpfs mounted by `unshare --user --mount`, "
      "which this machine does not allow (no user namespaces)"
    )
  disk = tmp_path / "disk"
  disk.mkdir()
  config = tmp_path / "tiny.yaml"
  config.write_text(
    json.dumps({**TINY, "train": {**TINY["train"], "steps": 2, "output_dir": str(disk / "run")}})
  )
  command = " ".join([sys.executable, "-m", "train", "--config", str(config), *overrides])
  script = f"mount -t tmpfs -o size={size} tmpfs {disk} && mkdir {disk}/run && {then} && {command}"
  return subprocess.run(
    ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_an_unwritable_output_dir_fails_before_any_work(tmp_path):
  start = time.monotonic()
  result = _cli_on_tmpfs(tmp_path, "1m", f"mount -o remount,ro {tmp_path / 'disk'}")
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == (
    f"error: [Errno 30] cannot write to {tmp_path / 'disk' / 'run'}: Read-only file system"
  )
  assert "model:" not in result.stdout and time.monotonic() - start < 10


def test_disk_full_ends_with_the_root_cause(tmp_path):
  result = _cli_on_tmpfs(tmp_path, "300k", "true")  # room for config and log, not a checkpoint
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == (
    f"error: [Errno 28] no space left on device at {tmp_path / 'disk' / 'run' / 'checkpoints'}"
  )


def test_a_corrupt_model_config_is_named(tmp_path):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text('{"model_type": "llama",')
  with pytest.raises(ValueError, match=rf"{model / 'config.json'}: corrupt JSON"):
    train.run(
      {
        **TINY,
        "model": {"path": str(model)},
        "data": {**TINY["data"], "tokenizer": "model"},
        "train": {**TINY["train"], "output_dir": str(tmp_path / "run")},
      }
    )


def test_interrupted_save_is_never_restored(tmp_path):
  out = tmp_path / "run"
  train.run({**TINY, "train": {**TINY["train"], "steps": 2, "output_dir": str(out)}})
  # What Orbax leaves behind when a save dies before its atomic rename.
  partial = out / "checkpoints" / "9.orbax-checkpoint-tmp-1234567890"
  partial.mkdir()
  (partial / "junk").write_text("half written")
  import orbax.checkpoint as ocp

  assert ocp.CheckpointManager((out / "checkpoints").absolute()).latest_step() == 2


def test_nan_loss_keeps_a_checkpoint_that_resumes_to_a_finite_step(tmp_path):
  out = tmp_path / "run"
  # Warmup: update 1 has lr 0, update 2 diverges. Checkpoint 2 holds weights near 1e30 whose
  # loss (at step 3) is not finite: only checkpoint 1 may be kept.
  config = {
    **TINY,
    "optimizer": {"lr": 1e30, "warmup_steps": 1, "clip_norm": 0.0, "method": "sft"},
    "train": {**TINY["train"], "output_dir": str(out)},
    "checkpoint": {"every": 1},
  }
  with pytest.raises(
    NonFiniteLossError, match=r"loss is (nan|inf) at step 3.*step 1, is kept"
  ) as e:
    train.run(config)
  kept = int(re.search(r"step (\d), is kept", str(e.value)).group(1))
  saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) == kept
  resumed = {
    **config,
    "optimizer": {**config["optimizer"], "lr": 1e-3},
    "train": {**config["train"], "steps": kept + 1, "resume": True},
  }
  train.run(resumed)
  losses = _losses(out)
  assert math.isfinite(losses[kept + 1]) and sorted(losses) == list(range(1, kept + 2))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two_processes(
  config: dict,
  config_path: Path,
  *overrides: str,
  cli: bool = False,
  per_process: tuple = ((), ()),
  started: tuple = (0, 1),
) -> list:
  """Starts `train.run` in 2 processes x 4 CPU devices (gloo on localhost); `cli`: through
  `python -m train` (its exit code and messages) instead of printing the summary;
  `per_process`: overrides for process 0 and process 1 alone; `started`: the processes
  started (the others never start)."""
  config_path.write_text(json.dumps(config))
  port = _free_port()
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
    # Later processes reuse what earlier ones compiled: the test is mostly compilation.
    "JAX_COMPILATION_CACHE_DIR": str(config_path.parent / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  code = (
    "import json, sys, train; "
    "print('SUMMARY', json.dumps(train.run(json.load(open(sys.argv[1])), sys.argv[2:])))"
  )
  command = ["-m", "train", "--config"] if cli else ["-c", code]
  return [
    subprocess.Popen(
      [
        sys.executable,
        *command,
        str(config_path),
        *overrides,
        *per_process[i],
        "mesh.distributed=true",
        f"mesh.coordinator_address=127.0.0.1:{port}",
        "mesh.num_processes=2",
        f"mesh.process_id={i}",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in started
  ]


def _summaries(procs: list) -> list[dict]:
  """Each process's returned summary, once all have finished."""
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  return [json.loads(out.split("SUMMARY ", 1)[1].splitlines()[0]) for out in outputs]


def _close(a: float, b: float) -> bool:
  return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-12)


def test_processes_given_different_configs_stop_with_the_keys_named(tmp_path):
  """A difference between the processes' configs would hang them in mismatched collectives:
  every process stops at start-up with a config error naming the keys and the values."""
  procs = _launch_two_processes(
    {**TINY, "train": {**TINY["train"], "output_dir": str(tmp_path / "run")}},
    tmp_path / "run.json",
    cli=True,
    per_process=(("train.steps=10",), ("train.steps=30",)),
  )
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 2, out
    assert "train.steps: process 0 10, process 1 30" in out, out
  assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_a_process_that_never_starts_is_named_within_the_timeout(tmp_path):
  """Instead of jax's SIGABRT and C++ stack after 5 minutes: before
  mesh.initialization_timeout, each waiting process names the coordinator and who is missing."""
  config = {
    **TINY,
    # A data file, never read (the run stops before), spares importing reasoning-gym.
    "data": {**TINY["data"], "source": "files", "train_files": ["never_read.jsonl"]},
    "train": {**TINY["train"], "output_dir": str(tmp_path / "run")},
  }
  alone = {
    i: _launch_two_processes(
      config, tmp_path / f"{i}.json", "mesh.initialization_timeout=3", cli=True, started=(i,)
    )[0]
    for i in (0, 1)
  }
  for i, proc in alone.items():
    out = proc.communicate(timeout=120)[0]
    port = re.search(r"mesh.coordinator_address=127.0.0.1:(\d+)", " ".join(proc.args))[1]
    last = out.strip().splitlines()[-1]
    assert proc.returncode == 1, out
    assert last.startswith(
      "error: the processes of this run did not all start within "
      f"mesh.initialization_timeout=3 s (process {i} of 2): "
    ), out
    missing = (
      f"processes [1] did not report to the coordinator at 127.0.0.1:{port}",
      f"process 0 (the coordinator at 127.0.0.1:{port}) did not answer",
    )[i]
    assert missing in last and "raise mesh.initialization_timeout" in last, out


def test_the_start_up_roll_call_names_who_is_missing(monkeypatch, capfd):
  """3 processes, 2 started: process 0 names process 2; process 1, whose report process 0's
  roll call took, points to process 0's line."""
  address = f"127.0.0.1:{_free_port()}"
  watches = [
    _StartupWatch(
      load_config(
        {},
        [f"mesh.coordinator_address={address}", "mesh.num_processes=3", f"mesh.process_id={i}"],
      ).mesh
    )
    for i in (0, 1)
  ]
  monkeypatch.setattr(os, "_exit", sys.exit)  # what the timer would do, as an exception
  lines = []
  with watches[0], watches[1]:
    deadline = time.time() + 30
    while not (watches[0].reported and watches[1].reached) and time.time() < deadline:
      time.sleep(0.05)
    for watch in watches:
      with pytest.raises(SystemExit, match="1"):
        watch._give_up()
      lines.append(capfd.readouterr().err)
  coordinator = f"the coordinator at {address}"
  assert f"(process 0 of 3): processes [2] did not report to {coordinator};" in lines[0]
  assert f"(process 1 of 3): process 0 ({coordinator}) is up, but" in lines[1]


def test_two_processes_match_one(tmp_path):
  """Eval (loss and accuracy), checkpoints, export and resume on 2 processes x 4 devices
  give what 1 process x 8 devices gives running straight through. The 2 processes run as 2
  slices (mesh.slices=2: each process stands for a slice joined by DCN, the data axis spans
  both); plain multi-process meshes are covered by test_dpo's and test_preemption's."""
  # Exact thresholds: gloo sums gradients in another order than one process does, and a
  # sampled threshold can then keep a different entry, which no tolerance can absorb.
  config = {
    **TINY,
    "optimizer": {**TINY["optimizer"], "schedule": "constant", "selection": "bisect"},
    "eval": {"accuracy": True, "size": 4, "max_new_tokens": 4, "generate_batch_size": 4},
    "checkpoint": {"every": 2, "export": True},
  }
  multi = tmp_path / "multi"
  config_path = tmp_path / "multi.json"
  slices = {"data": 2, "fsdp": 1, "tensor": 2}  # in each slice: data is 2 x 2 overall
  procs = _launch_two_processes(
    {**config, "mesh": slices, "train": {**TINY["train"], "steps": 4, "output_dir": str(multi)}},
    config_path,
    "mesh.slices=2",
  )
  # The reference run, while the 2 processes start.
  single = train.run({**config, "train": {**TINY["train"], "output_dir": str(tmp_path / "single")}})
  first = _summaries(procs)
  resumed = _summaries(
    _launch_two_processes(
      json.loads(config_path.read_text()),
      config_path,
      "mesh.slices=2",
      "train.steps=6",
      "train.resume=true",
    )
  )
  assert first[0] == first[1] and resumed[0] == resumed[1]  # every process returns the same
  for tag, one, two in (("before", single, first[0]), ("after", single, resumed[0])):
    assert _close(one[tag]["eval_loss"], two[tag]["eval_loss"]), (tag, one[tag], two[tag])
    assert one[tag]["accuracy"] == two[tag]["accuracy"], tag
  losses_one, losses_two = _losses(tmp_path / "single"), _losses(multi)
  assert losses_one.keys() == losses_two.keys() == set(range(1, 7))
  assert all(_close(losses_one[s], losses_two[s]) for s in losses_one), (losses_one, losses_two)
  assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["4", "6"]
  assert (multi / "eval_before.jsonl").is_file() and (multi / "eval_after.jsonl").is_file()
  one, two = (
    load_file(str(out / "hf" / "model.safetensors")) for out in (tmp_path / "single", multi)
  )
  assert one.keys() == two.keys()
  for name in one:
    assert np.max(np.abs(one[name] - two[name])) <= 1e-5 * np.max(np.abs(one[name])), name


def test_logged_tokens_cover_every_step(tmp_path):
  out = tmp_path / "run"
  train.run(
    {
      **TINY,
      "train": {
        **TINY["train"],
        "log_every": 4,
        "output_dir": str(out),
        "peak_flops_per_device": 1e12,
      },
    }
  )
  records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4, 6]
  config = load_config(TINY)
  rows = prepare(config.data, ByteTokenizer())[0]
  batches = Batches(
    rows, config.train.batch_size, config.train.micro_batch_size, config.data.shuffle_seed
  )
  trained = sum(int((rows["segment_ids"][batches.row_ids(s)] > 0).sum()) for s in range(6))
  assert sum(r["tokens"] for r in records) == trained
  for r in records:
    assert r["tokens_per_s"] == pytest.approx(
      r["tokens"] / (r["step_time_s"] * (4 if r["step"] == 4 else 2))
    )
    assert 0 < r["mfu"] < 1


def test_accuracy_survives_ids_the_tokenizer_cannot_decode(monkeypatch):
  from train.eval import evaluator, generate
  from train.stats import answer_stats

  tokenizer = ByteTokenizer()
  answer = tokenizer.encode("7")
  monkeypatch.setattr(generate, "generate", lambda *a, **k: [[300, 258] + answer])
  items = [{"prompt_ids": [5], "reference": "7", "entry": None}]
  records = evaluator.answer_records(None, tokenizer, items, max_new_tokens=4, batch_size=1)
  assert answer_stats(records)["accuracy"] == 1.0


def _trainer_configs() -> list[Path]:
  """The shipped run configs; a study's (a top-level `trainer:`) is tested in test_study.py."""
  paths = sorted((ROOT / "configs").glob("*.yaml"))
  return [p for p in paths if not re.search(r"^trainer:", p.read_text(), re.MULTILINE)]


@pytest.mark.parametrize("path", _trainer_configs(), ids=lambda p: p.name)
def test_shipped_configs_resolve_and_build(path):
  config = load_config(path)
  tx, _ = build_optimizer(config.optimizer, total_steps=1000)
  _, abstract_params, _ = abstract_model(model_config_of(config), remat=config.model.remat)
  params = nnx.to_pure_dict(abstract_params)
  opt_state = jax.eval_shape(tx.init, params)
  assert jax.tree.leaves(opt_state)


@pytest.mark.parametrize(
  "text, override, message",
  [
    ("train: {steps: 3\n", "", r"broken.yaml:2:1: invalid YAML"),
    ("train: {steps: 3}\n", "checkpoint.keep=0", r"checkpoint.keep=0 must be >= 1"),
  ],
)
def test_cli_config_errors_exit_2_and_name_the_cause(tmp_path, text, override, message):
  (tmp_path / "broken.yaml").write_text(text)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "train",
      "--config",
      str(tmp_path / "broken.yaml"),
      *filter(None, [override]),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and re.search(message, result.stderr.splitlines()[-1])


def test_cli_rejects_a_bad_key_before_any_work():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "train",
      "--config",
      "configs/default.yaml",
      "optimizer.mask_ration=0.3",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2
  assert "did you mean 'optimizer.mask_ratio'" in result.stderr


def test_train_step_benchmark_runs(tmp_path):
  """benchmarks/train_step.py builds its steps as the trainer does, so a trainer change reaches it."""
  config = tmp_path / "tiny.yaml"
  config.write_text(json.dumps(TINY))
  result = subprocess.run(
    [sys.executable, "benchmarks/train_step.py", "--config", str(config), "--steps", "2"],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": str(ROOT)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert re.search(r"^\| gmt \| [\d.]+ \| [\d.]+ / [\d.]+ / [\d.]+ \|", result.stdout, re.MULTILINE)

"""Weights & Biases as a logger (`metrics.loggers`), offline: the run written to
output_dir/wandb, read back with W&B's own record format, holds train_log.jsonl's values and
every scalar TensorBoard got; a resume continues the same W&B run."""

import json
import shutil
import struct

import pytest

import train
from tests.test_tensorboard import _scalars
from tests.test_train import TINY
from train.__main__ import main
from train.config import ConfigError, load_config

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed chunks


def _records(path):
  """The `Record` protos of a .wandb file (W&B's transaction log). wandb >= 0.20 reads it in
  its Go core only; the framing is LevelDB's log format under a `:W&B` header."""
  data = path.read_bytes()
  ident, magic, _ = struct.unpack("<4sHB", data[:7])
  assert (ident, magic) == (b":W&B", 0xBEE1), path
  at, pending = 7, b""
  while at + 7 <= len(data):
    if _BLOCK - at % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
      at += _BLOCK - at % _BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[at : at + 7])
    pending += data[at + 7 : at + 7 + length]
    at += 7 + length
    if kind in (1, 4):  # a full record, or the last chunk of one
      yield wandb_internal_pb2.Record.FromString(pending)
      pending = b""


def _run(path) -> tuple[str, dict, list[dict]]:
  """(run id, config, history rows) of one offline run's .wandb file."""
  run_id, config, rows = None, {}, []
  for record in _records(path):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run_id = record.run.run_id
      config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    elif kind == "history":
      rows.append(
        {
          item.key or "/".join(item.nested_key): json.loads(
            item.value_json
          )  # wandb >= 0.20: nested
          for item in record.history.item
        }
      )
  return run_id, config, rows


def test_wandb_offline_holds_the_logged_scalars_and_a_resume_continues_its_run(
  tmp_path, monkeypatch
):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  out = tmp_path / "run"
  config = {
    **TINY,
    "train": {**TINY["train"], "steps": 4, "output_dir": str(out)},
    "optimizer": {**TINY["optimizer"], "method": "gmt"},  # mask telemetry
    "checkpoint": {"every": 2, "keep": 5},
    "metrics": {"loggers": ["jsonl", "tensorboard", "wandb"], "wandb_project": "tiny"},
  }
  train.run(config)
  (written,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
  run_id, run_config, rows = _run(written)
  assert run_id == (out / "wandb" / "run_id").read_text()
  assert run_config["optimizer"]["method"] == "gmt" and run_config["train"]["steps"] == 4
  log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["train/global_step"] for r in train_rows] == [r["step"] for r in log] == [1, 2, 3, 4]
  for row, record in zip(train_rows, log):
    assert row["train/loss"] == record["loss"] and row["train/lr"] == record["lr"]
  (evaluation,) = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
  assert [r["eval/eval_loss"] for r in rows if "eval/eval_loss" in r] == [evaluation["eval_loss"]]
  tensorboard = _scalars(out / "tensorboard")
  logged = {tag for row in rows for tag in row if not tag.startswith("_")} - {"train/global_step"}
  assert logged == set(tensorboard) and any(tag.startswith("mask/") for tag in logged)

  # Stopped after step 3: checkpoint 4 never landed; the resume logs step 4 again.
  shutil.rmtree(out / "checkpoints" / "4")
  train.run(config, ["train.resume=true"])
  runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
  assert len(runs) == 2
  resumed_id, _, resumed_rows = _run(next(p for p in runs if p != written))
  assert resumed_id == run_id
  steps = [r["train/global_step"] for r in resumed_rows if "train/loss" in r]
  assert steps == [3, 4]
  log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  assert [r["train/loss"] for r in resumed_rows if "train/loss" in r] == [
    r["loss"] for r in log if r["step"] in steps
  ]


def test_asking_for_wandb_without_it_installed_names_the_extra(monkeypatch, capsys):
  from importlib import util

  find_spec = util.find_spec
  monkeypatch.setattr(util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
  with pytest.raises(ConfigError, match=r'metrics.loggers.*pip install "gmt-optax\[wandb\]"'):
    load_config(TINY, ["metrics.loggers=[jsonl,tensorboard,wandb]"])
  assert main(["metrics.loggers=[jsonl,tensorboard,wandb]"]) == 2  # at load, before any model
  assert 'pip install "gmt-optax[wandb]"' in capsys.readouterr().err
  assert load_config(TINY, ["metrics.loggers=[jsonl]"]).metrics.loggers == ("jsonl",)

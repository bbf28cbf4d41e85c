"""TensorBoard scalars and the profile window of a tiny end-to-end run: the events read back
hold the values of train_log.jsonl."""

import json
import struct

import pytest
from tensorboardX.proto import event_pb2

import train
from tests.test_train import TINY


def _scalars(directory) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the event files (TFRecords: length, crc, event, crc)."""
  tags: dict[str, dict[int, float]] = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at : at + 8])
      event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        tags.setdefault(value.tag, {})[event.step] = value.simple_value
  return tags


def test_scalars_go_to_tensorboard_and_the_profile_window_writes_a_trace(tmp_path):
  out = tmp_path / "run"
  config = {
    **TINY,
    "train": {**TINY["train"], "steps": 4, "output_dir": str(out), "profile_steps": [1, 3]},
    "optimizer": {**TINY["optimizer"], "method": "gmt"},
    # gsm8k on reasoning-gym held-out items: the benchmark path, offline
    "eval": {"accuracy": True, "benchmark": "gsm8k", "size": 2, "max_new_tokens": 4},
  }
  summary = train.run(config)
  tags = _scalars(out / "tensorboard")
  for tag in (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/kept_fraction",
    "train/tokens_per_s",
  ):
    assert sorted(tags[tag]) == [1, 2, 3, 4], tag
  assert sorted(tags["eval/eval_loss"]) == sorted(tags["eval/accuracy"]) == [0, 4]
  log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [1, 2, 3, 4]
  for record in log:  # TensorBoard stores float32
    for name in ("loss", "lr", "grad_norm", "kept_fraction"):
      assert tags[f"train/{name}"][record["step"]] == pytest.approx(record[name], rel=1e-6), name
  assert tags["eval/eval_loss"][4] == pytest.approx(summary["after"]["eval_loss"], rel=1e-6)
  for when, step in (("before", 0), ("after", 4)):
    accuracy = summary[when]["accuracy"]
    assert accuracy in (0.0, 0.5, 1.0)  # 2 items
    assert tags["eval/accuracy"][step] == pytest.approx(accuracy, rel=1e-6)
  assert len(list((out / "profile").rglob("*.xplane.pb"))) == 1  # one window, one trace

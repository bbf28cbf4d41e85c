"""The run's closing summary: exact match, intervals, the paired gain and the most common
answer are present and agree with the completions in eval_before/after.jsonl; its steps,
timings, parameter count and data report agree with train_log.jsonl, the model and the data."""

import json
import math
import time
from collections import Counter

import jax
import numpy as np
import pytest
from flax import nnx

import train
from tests.test_train import TINY
from train.config import load_config
from train.data import Batches, prepare
from train.eval.scoring import exact_match
from train.models.decoder import Llama, LlamaConfig
from train.models.tokenizer import ByteTokenizer
from train.stats import answer_stats, paired_gain, seeds_interval


def test_summary_fields_match_the_saved_completions(tmp_path, capsys):
  out = tmp_path / "run"
  config = {
    **TINY,
    "train": {**TINY["train"], "steps": 2, "output_dir": str(out)},
    "data": {**TINY["data"], "task_options": {"max_terms": 2, "max_digits": 1}},
    "eval": {
      "accuracy": True,
      "before": True,
      "size": 6,
      "max_new_tokens": 4,
      "generate_batch_size": 8,
    },
  }
  started = time.time()
  summary = train.run(config)
  elapsed = time.time() - started
  assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
  records = {}
  for tag in ("before", "after"):
    records[tag] = [
      json.loads(line) for line in (out / f"eval_{tag}.jsonl").read_text().splitlines()
    ]
    r, rows = summary[tag], records[tag]
    assert r["items"] == len(rows) == 6
    assert r["exact_matches"] == sum(row["exact"] for row in rows)
    assert r["accuracy"] == pytest.approx(r["exact_matches"] / r["items"])
    assert all(row["exact"] == exact_match(row["prediction"], row["reference"]) for row in rows)
    assert r["score"] == pytest.approx(sum(row["score"] for row in rows) / len(rows))
    top, count = Counter(row["prediction"] for row in rows).most_common(1)[0]
    assert r["top_answer_share"] == pytest.approx(count / len(rows))
    assert count == sum(row["prediction"] == r["top_answer"] for row in rows)
    lo, hi = r["accuracy_ci95"]
    assert 0 <= lo <= r["accuracy"] <= hi <= 1 and "eval_loss" in r
  gain = summary["gain"]
  diffs = [a["exact"] - b["exact"] for b, a in zip(records["before"], records["after"])]
  assert gain["accuracy_gain"] == pytest.approx(
    summary["after"]["accuracy"] - summary["before"]["accuracy"]
  )
  assert gain["accuracy_gain"] == pytest.approx(sum(diffs) / len(diffs))
  assert (gain["fixed"], gain["broken"]) == (diffs.count(1), diffs.count(-1))
  assert gain["accuracy_gain_ci95"][0] <= gain["accuracy_gain"] <= gain["accuracy_gain_ci95"][1]
  assert [e["before"] for e in summary["examples"]] == [
    r["completion"] for r in records["before"][:3]
  ]
  assert [e["after"] for e in summary["examples"]] == [
    r["completion"] for r in records["after"][:3]
  ]
  assert summary["wall_time_s"] > 0 and len(summary["load_average"]) == 3
  check_figures(config, summary, out, elapsed)
  shown = capsys.readouterr()
  assert "exact match" in shown.out + shown.err and "paired 95% CI" in shown.out + shown.err


def check_figures(config, summary, out, elapsed):
  """The summary's figures against train_log.jsonl (one record per step at log_every=1), the
  data prepared anew and the model's shapes."""
  cfg = load_config(config)
  model_config = LlamaConfig.from_hf(cfg.model.hf_config)
  records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  assert summary["steps"] == cfg.train.steps == 2
  assert [r["step"] for r in records] == [1, 2]

  # Tokens, loss tokens and epochs: the batches of the data prepared again from the config.
  rows, _, _, report = prepare(cfg.data, ByteTokenizer())
  assert summary["data"] == report and report["train_rows"] == len(rows["inputs"]) == 64
  assert report["train_loss_tokens"] == rows["loss_mask"].sum()
  batches = Batches(rows, cfg.train.batch_size, cfg.train.micro_batch_size, cfg.data.shuffle_seed)
  for r in records:
    step_rows = batches.row_ids(r["step"] - 1)
    assert r["tokens"] == batches.tokens(r["step"] - 1) > 0
    assert r["loss_tokens"] == rows["loss_mask"][step_rows].sum() > 0
    assert r["epoch"] == pytest.approx(r["step"] * cfg.train.batch_size / len(rows["inputs"]))
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["tokens"], rel=1e-6)

  # Losses: the random init predicts about uniformly over the 320 ids, on the held-out rows
  # before training and on the first step's batch (taken on the initial weights); the
  # learning rate warms up from 0 in one step, and the second step lowers the held-out loss.
  for loss in (records[0]["loss"], summary["before"]["eval_loss"]):
    assert abs(loss - math.log(model_config.vocab_size)) < 0.1, loss
  assert [r["lr"] for r in records] == pytest.approx([0.0, cfg.optimizer.lr])
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]

  # Timings: the median leaves out the first (compiling) step; wall time covers every step.
  step_times = [r["step_time_s"] for r in records]
  assert summary["median_step_time_s"] == pytest.approx(np.median(step_times[1:]), rel=1e-6)
  assert 0 < sum(step_times) < summary["wall_time_s"] <= elapsed

  shapes = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
  params = jax.tree_util.tree_leaves(nnx.state(shapes, nnx.Param))
  assert summary["num_params"] == sum(math.prod(p.shape) for p in params)


def test_exact_match_is_not_partial_credit():
  assert exact_match(" 7", "7") and exact_match("+07", "7") and exact_match("-3", "-3")
  assert not exact_match("8", "7") and not exact_match("", "7") and not exact_match("7.5", "7")
  records = [
    {"prediction": p, "exact": int(exact_match(p, "1")), "score": 0.5}
    for p in ["1", "1", "2", "-1"]
  ]
  stats = answer_stats(records)
  assert (stats["items"], stats["exact_matches"], stats["accuracy"]) == (4, 2, 0.5)
  assert stats["score"] == 0.5 and stats["top_answer"] == "1" and stats["top_answer_share"] == 0.5


def test_paired_gain_and_seed_interval():
  before = [{"exact": e} for e in [0, 0, 0, 1, 1, 0, 0, 0]]
  after = [{"exact": e} for e in [1, 1, 0, 1, 0, 1, 0, 0]]
  gain = paired_gain(before, after)
  assert gain["accuracy_gain"] == pytest.approx(2 / 8) and (gain["fixed"], gain["broken"]) == (3, 1)
  lo, hi = gain["accuracy_gain_ci95"]
  assert lo < 0.25 < hi and hi - 0.25 == pytest.approx(0.25 - lo)
  mean, half = seeds_interval([0.1, 0.2, 0.3])
  assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)

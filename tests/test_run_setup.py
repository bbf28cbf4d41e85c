"""`train.run_setup`: one set-up for the loop, the plan and the benchmarks."""

import jax
import numpy as np
import pytest

from tests.test_train import TINY
from train.config import ConfigError, load_config
from train.run_setup import setup_run


def _config(**sections):
  return load_config({**TINY, **sections})


def test_runs_sharing_a_cache_share_model_and_data_but_own_their_parameters():
  cache = {}
  gmt = setup_run(_config(optimizer={**TINY["optimizer"], "method": "gmt"}), cache)
  sft = setup_run(_config(optimizer={**TINY["optimizer"], "method": "sft"}), cache)
  assert sft.train_rows is gmt.train_rows  # prepared once
  assert sft.steps is not gmt.steps  # each optimizer its own steps
  # The train step donates its parameters: each run holds its own buffers of equal values.
  for a, b in zip(jax.tree.leaves(gmt.model.params), jax.tree.leaves(sft.model.params)):
    assert a is not b
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert gmt.total_steps == TINY["train"]["steps"]
  assert gmt.batches.shape == (2, 4, TINY["data"]["max_length"])
  assert gmt.model.num_params == sum(x.size for x in jax.tree.leaves(gmt.model.params))
  batch = gmt.batches.global_batch(0, gmt.steps.shardings["batch"])
  assert batch["inputs"].shape == gmt.batches.shape
  assert gmt.batches.tokens(0) == int((np.asarray(batch["segment_ids"]) > 0).sum())


def test_a_micro_batch_that_does_not_split_over_the_mesh_is_refused_before_loading():
  config = _config(
    train={**TINY["train"], "batch_size": 6, "micro_batch_size": 6},
    mesh={"data": 4, "fsdp": 1, "tensor": 2},
  )
  cache = {}
  with pytest.raises(ConfigError, match=r"train.micro_batch_size=6 does not divide over mesh"):
    setup_run(config, cache)
  assert not cache  # nothing was loaded


def test_a_training_set_smaller_than_a_batch_is_named(capsys):
  run = setup_run(_config(data={**TINY["data"], "train_size": 3, "pack": False}))
  assert run.batches.num_items == 3
  assert (
    "warning: the training set is 3 rows (3 examples, data.train_size=3), fewer than "
    "train.batch_size=8: each step repeats rows, each about 2.7 times"
  ) in capsys.readouterr().out

"""Remat policies (MaxText's names) and the attention dispatch (xla / splash / cudnn / auto)."""

import logging
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import assert_attention_matches_xla, tiny_llama_config
from train import config
from train.config import ConfigError, load_config
from train.models.decoder import (
  REMAT_POLICIES,
  Llama,
  cudnn_attention,
  cudnn_unavailable,
  packing_mask,
  remat_policy_name,
  resolve_attention,
)

TINY = tiny_llama_config(vocab_size=97)
IDS = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY.vocab_size)
SEGMENTS = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])


def _loss_and_grads(remat):
  model = Llama(TINY, rngs=nnx.Rngs(0), remat=remat)
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(IDS, segment_ids=SEGMENTS))[..., 3])
  return nnx.jit(nnx.value_and_grad(loss))(model)


def _saved_bytes(remat):
  """Bytes the forward pass keeps for the backward pass: the residuals its vjp closes over."""
  graphdef, state = nnx.split(Llama(TINY, rngs=nnx.Rngs(0), remat=remat))
  loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(IDS, segment_ids=SEGMENTS))
  backward = jax.eval_shape(lambda state: jax.vjp(loss, state)[1], state)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_loss_and_gradients_of_none(policy):
  (loss, grads), (expected_loss, expected_grads) = _loss_and_grads(policy), _loss_and_grads("none")
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_policies_keep_less_and_less():
  saved = {policy: _saved_bytes(policy) for policy in REMAT_POLICIES}
  ordered = list(saved.values())  # REMAT_POLICIES runs from the most kept to the least
  assert all(a > b for a, b in zip(ordered, ordered[1:])), saved


def test_booleans_are_full_and_none_and_unknown_names_are_listed():
  assert remat_policy_name(True) == "full" and remat_policy_name(False) == "none"
  assert Llama(TINY, rngs=nnx.Rngs(0), remat=True).remat == "full"
  with pytest.raises(ValueError, match="remat='dots'.*'minimal'.*'full'"):
    remat_policy_name("dots")


def test_config_remat_accepts_names_and_booleans():
  assert load_config({}, ["model.remat=true"]).model.remat == "full"
  assert load_config({}, ["model.remat=false"]).model.remat == "none"
  assert load_config({}, ["model.remat=save_dot_except_mlp"]).model.remat == "save_dot_except_mlp"
  with pytest.raises(
    ConfigError, match=r"model.remat='dots'.*'minimal'.*true = full, false = none"
  ):
    load_config({}, ["model.remat=dots"])
  # The config and the model list the same names.
  allowed = typing.get_args(typing.get_type_hints(config.ModelConfig)["remat"])
  assert list(allowed) == list(REMAT_POLICIES)


def test_attention_auto_is_xla_on_cpu_and_splash_on_tpu():
  assert resolve_attention("auto", "cpu") == "xla"
  assert resolve_attention("auto", "tpu") == "splash"
  assert resolve_attention("xla", "gpu") == "xla"
  assert Llama(TINY, rngs=nnx.Rngs(0), attention="auto").attention == "xla"
  with pytest.raises(ValueError, match="attention='flash'"):
    resolve_attention("flash", "cpu")


def test_cudnn_requested_without_a_gpu_is_a_clear_error():
  assert "not an NVIDIA GPU" in cudnn_unavailable()
  with pytest.raises(ValueError, match="attention='cudnn'.*unavailable.*cpu.*attention=auto"):
    Llama(TINY, rngs=nnx.Rngs(0), attention="cudnn")
  assert load_config({}, ["model.attention=cudnn"]).model.attention == "cudnn"


def test_auto_on_a_gpu_without_cudnn_falls_back_to_xla_with_one_warning(caplog):
  # This host is no GPU, so the probe fails as it would on a GPU without cuDNN.
  with caplog.at_level(logging.INFO, logger="train.models.decoder"):
    assert resolve_attention("auto", "gpu") == "xla"
  [record] = caplog.records
  assert record.levelno == logging.WARNING
  assert "cuDNN fused attention unavailable" in record.message and "using xla" in record.message


def test_packing_mask_is_the_mask_the_xla_path_applies():
  """The mask given to cuDNN's kernel: same nonzero segment, not in the future."""
  slots = jnp.arange(SEGMENTS.shape[1])
  mask = np.asarray(packing_mask(SEGMENTS, SEGMENTS, slots, slots))
  s = SEGMENTS.shape[1]
  for row, ids in enumerate(np.asarray(SEGMENTS)):
    for q in range(s):
      for t in range(s):
        assert mask[row, q, t] == (ids[q] == ids[t] != 0 and t <= q), (row, q, t)


@pytest.mark.parametrize("window", [None, 3])
def test_cudnn_call_equals_xla_attention_with_packed_segments(window):
  """cudnn_attention's call (mask, grouping, scale, sliding window), run by jax's XLA
  implementation of the same API on this CPU, against the model's XLA path: values and
  gradients at real tokens."""
  s = SEGMENTS.shape[1]
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, s, 2, 3, 8))
  k, v = jax.random.normal(keys[1], (2, s, 2, 8)), jax.random.normal(keys[2], (2, s, 2, 8))
  fused = lambda q, k, v: cudnn_attention(q, k, v, SEGMENTS, window=window, implementation="xla")
  assert_attention_matches_xla(fused, q, k, v, SEGMENTS, window)


def test_plan_remat_sweep_trades_memory_for_flops():
  """`train.plan --remat-sweep` on the real TPU compiler (libtpu, no TPU): keeping every
  activation costs the most memory and the fewest FLOPs; all fit here, so the policy with
  the shortest modeled step is chosen (on this small, memory-bound model, the fewest FLOPs
  need not be the fastest)."""
  pytest.importorskip("libtpu", reason="libtpu (in the test extra) compiles for TPU topologies")
  from train import plan

  small = {
    "model": {
      "path": None,
      "dtype": "bfloat16",
      "hf_config": {
        "model_type": "llama",
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
      },
    },
    "data": {"max_length": 1024},  # activations, not weights, dominate the temporaries
    "train": {"steps": 10, "batch_size": 8, "micro_batch_size": 8},
  }
  devices = plan.topology_devices("v5e:2x4")
  hbm = plan.HBM_BYTES[devices[0].device_kind]
  sweep = plan.remat_sweep(load_config(small), devices, hbm, ("none", "minimal", "full"))
  none, minimal, full = (sweep["policies"][p] for p in ("none", "minimal", "full"))
  temporaries = [r["breakdown_bytes"]["temporaries"] for r in (none, minimal, full)]
  flops = [r["flops_per_step"] for r in (none, minimal, full)]
  assert temporaries[0] > temporaries[1] > temporaries[2], temporaries
  assert flops[0] < flops[1] < flops[2], flops
  steps = {p: r["step_model"]["step_s"] for p, r in sweep["policies"].items()}
  assert sweep["choice"] == min(steps, key=steps.get), steps

"""The Flax NNX Llama-family model against Hugging Face reference logits."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import FIXTURES, assert_attention_matches_xla, load_fixture, tiny_llama_config
from train.models.decoder import Llama, LlamaConfig, attention, rope_inv_freq, splash_attention
from train.models.pretrained import load_pretrained

NAMES = ("llama", "qwen2", "mistral")


def hf_config(name):
  with open(os.path.join(FIXTURES, name, "config.json")) as f:
    return json.load(f)


@jax.jit
def forward(model, ids, positions=None, segment_ids=None):
  return model(ids, positions=positions, segment_ids=segment_ids)


@pytest.fixture(scope="module")
def llama():
  return load_pretrained(os.path.join(FIXTURES, "llama"))[0]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  path, ids, expected = load_fixture(name)
  model, _ = load_pretrained(path)
  logits = forward(model, jnp.asarray(ids))
  assert logits.dtype == jnp.float32 and logits.shape == expected.shape
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_fixture_configs_cover_the_family():
  configs = {n: LlamaConfig.from_hf(hf_config(n)) for n in NAMES}
  assert configs["llama"].rope_scaling["rope_type"] == "llama3"
  assert configs["llama"].tie_word_embeddings
  assert configs["qwen2"].attention_bias
  assert configs["mistral"].num_kv_heads < configs["mistral"].num_heads


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
  config = LlamaConfig.from_hf(hf_config(name))
  assert LlamaConfig.from_hf(config.to_hf()) == config
  # Static jit metadata: an equal config must hash equal (a cache hit, no retrace).
  assert hash(LlamaConfig.from_hf(config.to_hf())) == hash(config)
  assert hash(dataclasses.replace(config, num_layers=config.num_layers + 1)) != hash(config)


def test_llama3_rope_scaling_divides_low_frequencies():
  config = LlamaConfig.from_hf(hf_config("llama"))
  plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
  scaled = rope_inv_freq(config)
  np.testing.assert_allclose(scaled[1:], plain[1:] / 8.0, rtol=1e-6)  # wavelength > 16
  assert plain[0] / 8.0 < scaled[0] < plain[0]  # smoothed band


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model_type", "gpt2", "model_type 'gpt2'"),
    ("sliding_window", 16, "sliding_window"),
    ("hidden_act", "gelu", "hidden_act"),
    ("mlp_bias", True, "mlp_bias"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
  ],
)
def test_unsupported_config_names_the_field(field, value, message):
  config = {**hf_config("mistral"), field: value}
  with pytest.raises(ValueError, match=message):
    LlamaConfig.from_hf(config)


def test_qwen2_sliding_window_in_use_is_rejected():
  with pytest.raises(ValueError, match="use_sliding_window"):
    LlamaConfig.from_hf({**hf_config("qwen2"), "use_sliding_window": True})


def test_partitioning_metadata(llama):
  specs = nnx.get_partition_spec(nnx.state(llama, nnx.Param))
  layers = specs["layers"]  # stacked: the leading layer axis is never sharded
  assert tuple(layers["self_attn"]["q_proj"]["kernel"].get_value()) == (None, "fsdp", "tensor")
  assert tuple(layers["self_attn"]["o_proj"]["kernel"].get_value()) == (None, "tensor", "fsdp")
  assert tuple(layers["mlp"]["down_proj"]["kernel"].get_value()) == (None, "tensor", "fsdp")
  assert tuple(layers["input_layernorm"]["weight"].get_value()) == (None, None)
  assert llama.layers.mlp.up_proj.kernel.shape[0] == llama.config.num_layers
  assert tuple(specs["embed_tokens"].get_value()) == ("tensor", "fsdp")
  assert tuple(specs["norm"]["weight"].get_value()) == (None,)


def test_packing_equals_separate_sequences(llama):
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, 288, size=5), rng.integers(3, 288, size=4)
  packed = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
  positions = np.array([list(range(5)) + list(range(4)) + [0] * 3], np.int32)
  logits = forward(llama, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  alone_a = forward(llama, jnp.asarray(a[None], jnp.int32))
  alone_b = forward(llama, jnp.asarray(b[None], jnp.int32))
  np.testing.assert_allclose(logits[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:9], alone_b[0], atol=1e-5)
  assert np.isfinite(np.asarray(logits)).all()  # padding rows too


def test_kv_cache_matches_full_forward(llama):
  _, ids, _ = load_fixture("llama")
  full = forward(llama, jnp.asarray(ids))
  cache = llama.init_cache(ids.shape[0], 16)
  step = jax.jit(lambda m, x, c: m(x, cache=c))  # nnx modules are pytrees
  logits, cache = step(llama, jnp.asarray(ids[:, :7]), cache)
  pieces = [logits]
  for i in range(7, ids.shape[1]):
    logits, cache = step(llama, jnp.asarray(ids[:, i : i + 1]), cache)
    pieces.append(logits)
  assert int(cache["index"]) == ids.shape[1]
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_splash_kernel_equals_xla_attention_with_packed_segments():
  """The TPU splash kernel (run by the Pallas interpreter) against the XLA path:
  outputs and gradients, two packed segments in one row and padding in the other."""
  rng = np.random.default_rng(0)
  b, s, k_heads, groups, h = 2, 256, 2, 2, 32
  q = jnp.asarray(rng.normal(size=(b, s, k_heads, groups, h)), jnp.float32) * h**-0.5
  k, v = (jnp.asarray(rng.normal(size=(b, s, k_heads, h)), jnp.float32) for _ in range(2))
  segment_ids = np.ones((b, s), np.int32)
  segment_ids[0, 100:] = 2
  segment_ids[1, 200:] = 0
  splash = lambda q, k, v: splash_attention(q, k, v, jnp.asarray(segment_ids), interpret=True)
  assert_attention_matches_xla(splash, q, k, v, segment_ids)


def test_remat_same_values_and_gradients():
  config = LlamaConfig.from_hf(hf_config("qwen2"))
  ids = jnp.asarray(load_fixture("qwen2")[1])

  def loss_and_grads(remat):
    model = Llama(config, rngs=nnx.Rngs(0), remat=remat)
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])
    return nnx.jit(nnx.value_and_grad(loss))(model)

  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_bfloat16_compute_is_close():
  path, ids, expected = load_fixture("mistral")
  model, _ = load_pretrained(path, dtype=jnp.bfloat16)
  assert model.layers.mlp.up_proj.kernel.dtype == jnp.bfloat16
  logits = forward(model, jnp.asarray(ids))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), expected, atol=0.1)


def test_random_init_without_mesh():
  model = Llama(tiny_llama_config(), rngs=nnx.Rngs(0))
  # By hand: embedding and head 2 x 64 x 32; per layer q, o 32 x 32, k, v 32 x 16, the MLP
  # 3 x 32 x 64 and two norms of 32; the final norm 32.
  assert model.num_params == 2 * 64 * 32 + 2 * (2 * 1024 + 2 * 512 + 3 * 2048 + 64) + 32
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(len(p.sharding.device_set) == 1 for p in params)  # unsharded, on one device
  ids = jnp.array([[1, 2, 3]])
  logits = forward(model, ids)
  assert logits.shape == (1, 3, 64) and bool(jnp.isfinite(logits).all())
  np.testing.assert_array_equal(logits, forward(Llama(tiny_llama_config(), rngs=nnx.Rngs(0)), ids))
  assert not np.allclose(logits, forward(Llama(tiny_llama_config(), rngs=nnx.Rngs(1)), ids))


def test_attention_custom_gradient_matches_autodiff():
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 7, 2, 3, 8))
  k, v = jax.random.normal(keys[1], (2, 7, 2, 8)), jax.random.normal(keys[2], (2, 7, 2, 8))
  mask = jnp.tril(jnp.ones((7, 7), bool))[None].repeat(2, 0).at[1, :2].set(False)
  weights = jax.random.normal(keys[3], q.shape)

  def reference(q, k, v):
    scores = jnp.einsum("bskgh,btkh->bkgst", q, k)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # fully masked rows -> 0
    return jnp.einsum("bkgst,btkh->bskgh", jnp.nan_to_num(probs), v)

  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  np.testing.assert_allclose(attention(q, k, v, mask), reference(q, k, v), atol=1e-5)
  assert not np.asarray(attention(q, k, v, mask))[1, :2].any()
  ours = jax.grad(loss(lambda q, k, v: attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-5)

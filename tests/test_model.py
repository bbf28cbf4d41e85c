"""The Flax NNX Llama-family model against Hugging Face reference logits."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import (
  FIXTURES,
  assert_attention_matches_xla,
  fixture_variants,
  load_fixture,
  load_variant,
  tiny_llama_config,
)
from train.models.decoder import Llama, LlamaConfig, attention, rope_inv_freq, splash_attention
from train.models.pretrained import load_pretrained

NAMES = ("llama", "qwen2", "mistral", "qwen3", "gemma3")
# (fixture, variant): the same weights under another config (tests/fixtures/*/variants.json):
# sliding windows of 4 over the 12 input tokens (Mistral, Qwen2/3), none (Gemma 3).
VARIANTS = [(name, variant) for name in NAMES for variant in fixture_variants(name)]


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


@pytest.mark.parametrize("name, variant", VARIANTS)
def test_sliding_window_logits_match_transformers(name, variant, tmp_path):
  path, ids, expected = load_variant(tmp_path, name, variant)
  model, _ = load_pretrained(path)
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(ids))), expected, atol=1e-4)
  # The variant changes the logits: without the window (or with it) they would differ.
  assert np.abs(expected - load_fixture(name)[2]).max() > 1e-2


def test_fixture_configs_cover_the_family():
  configs = {n: LlamaConfig.from_hf(hf_config(n)) for n in NAMES}
  assert configs["llama"].rope_scaling["rope_type"] == "llama3"
  assert configs["llama"].tie_word_embeddings
  assert configs["qwen2"].attention_bias
  assert configs["mistral"].num_kv_heads < configs["mistral"].num_heads
  qwen3, gemma3 = configs["qwen3"], configs["gemma3"]
  assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.sliding_window is None
  assert qwen3.head_dim * qwen3.num_heads != qwen3.hidden_size  # head_dim read, not derived
  assert gemma3.qk_norm and gemma3.norm_unit_offset and gemma3.sandwich_norms
  assert gemma3.scale_embeddings and gemma3.tie_word_embeddings
  assert gemma3.hidden_act == "gelu_pytorch_tanh" and gemma3.query_pre_attn_scalar == 12
  assert gemma3.sliding_window == 4 and list(gemma3.sliding_layers) == [True, False, True]
  assert gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
  assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)


def test_gemma3_config_forms_read_alike():
  """A transformers 4 config.json (rope_theta, rope_local_base_freq, rope_scaling,
  sliding_window_pattern) and a multimodal gemma3 one (a text_config listing only what
  differs from Gemma3TextConfig's defaults) read as transformers reads them."""
  new = hf_config("gemma3")
  old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
  old |= dict(
    rope_theta=1e6,
    rope_local_base_freq=1e4,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    sliding_window_pattern=2,
  )
  assert LlamaConfig.from_hf(old) == LlamaConfig.from_hf(new)
  del old["sliding_window_pattern"]  # transformers 5's spelling only
  assert LlamaConfig.from_hf({**old, "_sliding_window_pattern": 2}) == LlamaConfig.from_hf(new)
  text = {"hidden_size": 2560, "num_hidden_layers": 34, "sliding_window": 1024}
  multimodal = LlamaConfig.from_hf({"model_type": "gemma3", "text_config": text})
  assert multimodal.model_type == "gemma3_text" and multimodal.vocab_size == 262_208
  assert (multimodal.head_dim, multimodal.num_heads, multimodal.num_kv_heads) == (256, 8, 4)
  assert multimodal.sliding_layers.sum() == 34 - 34 // 6  # every sixth layer is global
  assert not multimodal.sliding_layers[5] and multimodal.sliding_layers[6]
  assert (multimodal.rope_theta, multimodal.rope_local_theta) == (1e6, 1e4)


def test_qwen_sliding_layers_from_max_window_layers():
  hf = {**hf_config("qwen3"), "use_sliding_window": True, "sliding_window": 4}
  hf |= {"max_window_layers": 1, "layer_types": None}
  assert list(LlamaConfig.from_hf(hf).sliding_layers) == [False, True]
  # As transformers: without use_sliding_window, no layer slides whatever sliding_window says.
  assert LlamaConfig.from_hf({**hf, "use_sliding_window": False}).sliding_window is None


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
    ("sliding_window", 0, "sliding_window=0"),
    ("hidden_act", "gelu", "hidden_act"),
    ("mlp_bias", True, "mlp_bias"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
  ],
)
def test_unsupported_config_names_the_field(field, value, message):
  config = {**hf_config("mistral"), field: value}
  with pytest.raises(ValueError, match=message):
    LlamaConfig.from_hf(config)


@pytest.mark.parametrize(
  "name, field, value",
  [
    ("llama", "sliding_window", 16),  # transformers' Llama ignores it; Mistral has it
    ("gemma3", "final_logit_softcapping", 30.0),  # Gemma 2
    ("gemma3", "attn_logit_softcapping", 50.0),
    ("gemma3", "use_bidirectional_attention", True),
    ("gemma3", "layer_types", ["sliding_attention", "chunked_attention", "full_attention"]),
    ("qwen3", "attention_bias", True),
  ],
)
def test_unsupported_family_config_names_the_field(name, field, value):
  with pytest.raises(ValueError, match=rf"\({name}\w*\): unsupported {field}="):
    LlamaConfig.from_hf({**hf_config(name), field: value})


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


@pytest.mark.parametrize("name", ["llama", "gemma3"])  # gemma3: sliding layers, window 4
def test_kv_cache_matches_full_forward(name):
  path, ids, _ = load_fixture(name)
  model, _ = load_pretrained(path)
  full = forward(model, jnp.asarray(ids))
  cache = model.init_cache(ids.shape[0], 16)
  step = jax.jit(lambda m, x, c: m(x, cache=c))  # nnx modules are pytrees
  logits, cache = step(model, jnp.asarray(ids[:, :7]), cache)
  pieces = [logits]
  for i in range(7, ids.shape[1]):
    logits, cache = step(model, jnp.asarray(ids[:, i : i + 1]), cache)
    pieces.append(logits)
  assert int(cache["index"]) == ids.shape[1]
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("window", [None, 64])
def test_splash_kernel_equals_xla_attention_with_packed_segments(window):
  """The TPU splash kernel (run by the Pallas interpreter) against the XLA path:
  outputs and gradients, two packed segments in one row and padding in the other; with a
  sliding window shorter than both segments, or none."""
  rng = np.random.default_rng(0)
  b, s, k_heads, groups, h = 2, 256, 2, 2, 32
  q = jnp.asarray(rng.normal(size=(b, s, k_heads, groups, h)), jnp.float32) * h**-0.5
  k, v = (jnp.asarray(rng.normal(size=(b, s, k_heads, h)), jnp.float32) for _ in range(2))
  segment_ids = np.ones((b, s), np.int32)
  segment_ids[0, 100:] = 2
  segment_ids[1, 200:] = 0
  splash = lambda q, k, v: splash_attention(
    q, k, v, jnp.asarray(segment_ids), window=window, interpret=True
  )
  assert_attention_matches_xla(splash, q, k, v, segment_ids, window)


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


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_bfloat16_compute_is_close(name):
  path, ids, expected = load_fixture(name)
  model, _ = load_pretrained(path, dtype=jnp.bfloat16)
  assert model.layers.mlp.up_proj.kernel.dtype == jnp.bfloat16
  logits = forward(model, jnp.asarray(ids))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), expected, atol=0.1)


def test_bfloat16_sliding_window_is_close(tmp_path):
  path, ids, expected = load_variant(tmp_path, "qwen3", "sliding_window")
  model, _ = load_pretrained(path, dtype=jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(ids))), expected, atol=0.1)


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

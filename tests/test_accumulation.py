"""gmt, accumulate_gradients and hft against hand-built references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gmt_optax


def random_tree(seed):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.standard_normal((24, 16)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((16,)), jnp.float32),
  }


def numpy_mask(g, ratio):
  g = np.asarray(g)
  threshold = np.sort(np.abs(g).ravel())[int(np.floor(ratio * g.size))]
  return np.where(np.abs(g) >= threshold, g, 0.0)


def test_accumulated_update_equals_masked_adamw_on_the_mean_gradient():
  params = random_tree(0)
  micro = [random_tree(s) for s in (1, 2, 3)]
  tx = gmt_optax.gmt(optax.adamw(0.1), 0.5, accumulation_steps=3, selection="bisect")
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, g in enumerate(micro):
    updates, state = update(g, state, params)
    if i < 2:  # micro-steps: no update, the mask has not run
      for u in jax.tree_util.tree_leaves(updates):
        np.testing.assert_array_equal(u, 0.0)
      assert int(state.inner_state[0].count) == 0

  mean = {k: np.mean([np.asarray(g[k]) for g in micro], 0) for k in params}
  masked = {k: numpy_mask(v, 0.5) for k, v in mean.items()}
  reference = optax.adamw(0.1)
  expected, _ = reference.update(
    {k: jnp.asarray(v) for k, v in masked.items()}, reference.init(params), params
  )
  for k in params:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-7)
  assert int(state.inner_state[0].count) == 1
  assert int(state.mini_step) == 0
  for acc in jax.tree_util.tree_leaves(state.grad_mean):
    np.testing.assert_array_equal(acc, 0.0)


def test_matches_multisteps_chain():
  params = random_tree(0)
  ours = gmt_optax.gmt(optax.adam(0.01), 0.4, accumulation_steps=2, selection="bisect")
  multi = optax.MultiSteps(
    optax.chain(gmt_optax.gradient_mask(0.4, selection="bisect"), optax.adam(0.01)), 2
  )
  ours_state, multi_state = ours.init(params), multi.init(params)
  for seed in range(6):
    g = random_tree(10 + seed)
    a, ours_state = jax.jit(ours.update)(g, ours_state, params)
    b, multi_state = jax.jit(multi.update)(g, multi_state, params)
    for k in params:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_one_step_is_the_plain_chain():
  params = random_tree(0)
  g = random_tree(1)
  tx = gmt_optax.gmt(optax.sgd(1.0), 0.5)
  chain = optax.chain(gmt_optax.gradient_mask(0.5), optax.sgd(1.0))
  assert jax.tree_util.tree_structure(tx.init(params)) == jax.tree_util.tree_structure(
    chain.init(params)
  )
  a, _ = tx.update(g, tx.init(params), params)
  b, _ = chain.update(g, chain.init(params), params)
  for k in params:
    np.testing.assert_array_equal(a[k], b[k])


def test_mask_updates_holds_masked_entries_still():
  params = random_tree(0)
  # Momentum from a first step would move every entry in the second one.
  tx = gmt_optax.gmt(optax.adamw(0.1, weight_decay=0.1), 0.5, mask_updates=True, selection="bisect")
  loose = gmt_optax.gmt(optax.adamw(0.1, weight_decay=0.1), 0.5, selection="bisect")
  state, loose_state = tx.init(params), loose.init(params)
  for seed in (1, 2):
    g = random_tree(seed)
    updates, state = tx.update(g, state, params)
    loose_updates, loose_state = loose.update(g, loose_state, params)
  for k in params:
    masked = numpy_mask(g[k], 0.5) == 0
    np.testing.assert_array_equal(np.asarray(updates[k])[masked], 0.0)
    assert np.all(np.asarray(updates[k])[~masked] != 0)
    assert np.all(np.asarray(loose_updates[k])[masked] != 0)
  assert float(gmt_optax.kept_fraction(state)) == pytest.approx(0.5, abs=0.05)


def test_bfloat16_gradients_with_float32_accumulator():
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), random_tree(0))
  tx = gmt_optax.gmt(optax.sgd(1.0), 0.5, accumulation_steps=2, accumulator_dtype=jnp.float32)
  state = tx.init(params)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(state.grad_mean))
  small = jax.tree_util.tree_map(lambda x: x * 0 + 1e-3, params)
  _, state = tx.update(small, state, params)
  np.testing.assert_allclose(state.grad_mean["w"], 5e-4, rtol=1e-2)
  updates, _ = tx.update(small, state, params)
  assert updates["w"].dtype == jnp.bfloat16


def test_bad_accumulation_steps():
  with pytest.raises(ValueError, match="accumulation_steps.*0"):
    gmt_optax.gmt(optax.sgd(1.0), 0.5, accumulation_steps=0)


def test_hft_freezes_half_of_the_matrices_and_redraws():
  rng = np.random.default_rng(0)
  params = {f"m{i}": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32) for i in range(10)}
  params["norm"] = jnp.ones(4)
  tx = gmt_optax.hft(optax.adamw(0.1, weight_decay=0.1), period=3, seed=1)
  state = tx.init(params)
  update = jax.jit(tx.update)
  frozen_sets = []
  for step in range(6):
    updates, state = update(params, state, params)
    frozen = {k for k, u in updates.items() if np.all(np.asarray(u) == 0)}
    assert len(frozen) == 5 and "norm" not in frozen  # norms always train
    assert all(np.all(np.asarray(updates[k]) != 0) for k in params if k not in frozen)
    frozen_sets.append(frozen)
  assert frozen_sets[0] == frozen_sets[1] == frozen_sets[2]
  assert frozen_sets[3] == frozen_sets[4] == frozen_sets[5]
  assert frozen_sets[0] != frozen_sets[3]


def test_hft_freezes_whole_slices_of_stacked_layers():
  rng = np.random.default_rng(1)
  params = {
    "q": jnp.asarray(rng.standard_normal((6, 4, 4)), jnp.float32),
    "mlp": jnp.asarray(rng.standard_normal((6, 4, 8)), jnp.float32),
    "norm": jnp.ones((6, 4)),
    "embed": jnp.ones((10, 4)),
  }
  tx = gmt_optax.hft(
    optax.sgd(0.1), period=2, seed=3, stacked_axes={"q": 1, "mlp": 1, "norm": 1, "embed": 0}
  )
  state = tx.init(params)
  assert state.frozen.shape == (13,)  # 6 + 6 layer matrices, the embedding
  update = jax.jit(tx.update)
  frozen_sets = []
  for _ in range(4):
    updates, state = update(params, state, params)
    frozen = {
      (k, layer)
      for k in ("q", "mlp")
      for layer, u in enumerate(np.asarray(updates[k]))
      if np.all(u == 0)
    }
    frozen |= {("embed", 0)} if np.all(np.asarray(updates["embed"]) == 0) else set()
    # Every slice is either frozen whole or moves everywhere.
    for k in ("q", "mlp"):
      for layer, u in enumerate(np.asarray(updates[k])):
        assert (k, layer) in frozen or np.all(u != 0)
    assert len(frozen) == round(0.5 * 13)
    np.testing.assert_allclose(updates["norm"], -0.1)  # vectors train
    frozen_sets.append(frozen)
  assert frozen_sets[0] == frozen_sets[1] != frozen_sets[2] == frozen_sets[3]


def test_nnx_optimizer_end_to_end():
  nnx = pytest.importorskip("flax.nnx", reason="flax (the train extra) is not installed")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
      return self.dense(x)

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, gmt_optax.gmt(optax.sgd(0.1), 0.5, selection="bisect"), wrt=nnx.Param
  )
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), jnp.float32)
  before = np.asarray(model.dense.kernel[...])

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return grads

  grads = train_step(model, optimizer, x)
  moved = np.asarray(model.dense.kernel[...]) != before
  expected_moved = numpy_mask(grads["dense"]["kernel"][...], 0.5) != 0
  np.testing.assert_array_equal(moved, expected_moved)
  assert float(gmt_optax.kept_fraction(optimizer.opt_state)) == 0.5

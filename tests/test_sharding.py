"""gradient_mask on sharded gradients (8 simulated CPU devices, see conftest)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gmt_optax

AUTO = jax.sharding.AxisType.Auto
SAMPLE_SIZE = 1024  # "big" below is sampled, "w" and "norm" are exact


def grads_tree(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {"big": normal(256, 128), "w": normal(32, 48), "norm": normal(48)}


def layouts():
  fsdp = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  tp = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AUTO, AUTO))
  return {
    # FSDP-like: every matrix split along its rows.
    "fsdp": (fsdp, {"big": P("fsdp", None), "w": P("fsdp", None), "norm": P(None)}),
    # Tensor-parallel-like: rows over fsdp, columns over tensor.
    "fsdp+tensor": (tp, {"big": P("fsdp", "tensor"), "w": P(None, "tensor"), "norm": P("tensor")}),
  }


def shard(tree, mesh, specs):
  return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}


@pytest.mark.parametrize("layout", ["fsdp", "fsdp+tensor"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("selection", ["auto", "bisect", "sample"])
def test_jit_sharded_equals_unsharded(layout, granularity, selection):
  mesh, specs = layouts()[layout]
  grads = grads_tree()
  tx = gmt_optax.gradient_mask(
    0.5, granularity=granularity, selection=selection, sample_size=SAMPLE_SIZE
  )
  expected, expected_state = jax.jit(tx.update)(grads, tx.init(grads))
  sharded = shard(grads, mesh, specs)
  updates, state = jax.jit(tx.update)(sharded, tx.init(sharded))
  for key in grads:
    assert updates[key].sharding.is_equivalent_to(
      sharded[key].sharding, 2 if grads[key].ndim == 2 else 1
    )
    np.testing.assert_array_equal(updates[key], expected[key], err_msg=key)
  assert float(state.kept_fraction) == pytest.approx(float(expected_state.kept_fraction), abs=1e-6)


def collectives_and_sorts(hlo: str):
  """(op, result shape) of every all-gather, all-to-all and sort in HLO."""
  found = []
  for line in hlo.splitlines():
    match = re.search(r"= (\S+\[[^\]]*\])\S* (all-gather|all-to-all|sort)\(", line)
    if match:
      found.append((match.group(2), match.group(1)))
  return found


@pytest.mark.parametrize("layout", ["fsdp", "fsdp+tensor"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_default_selection_compiles_without_all_gather_or_sort(layout, granularity):
  mesh, specs = layouts()[layout]
  sharded = shard(grads_tree(), mesh, specs)
  params = sharded
  tx = optax.chain(
    gmt_optax.gradient_mask(0.5, granularity=granularity, sample_size=SAMPLE_SIZE),
    optax.adamw(1e-3),
  )
  state = tx.init(params)

  def step(tx):
    def update(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.jit(update)

  hlo = step(tx).lower(sharded, state, params).compile().as_text()
  assert collectives_and_sorts(hlo) == []
  assert "all-reduce" in hlo  # the counts are reduced across shards
  # The check can fail: the sort-based reference does all-gather and sort.
  exact = optax.chain(gmt_optax.gradient_mask(0.5, selection="exact"), optax.adamw(1e-3))
  hlo = step(exact).lower(sharded, exact.init(params), params).compile().as_text()
  ops = {op for op, _ in collectives_and_sorts(hlo)}
  assert "sort" in ops and "all-gather" in ops


@pytest.mark.parametrize("selection", ["bisect", "exact", "auto"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_shard_map_with_axis_name_equals_unsharded(selection, granularity):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AUTO,))
  grads = {"w": grads_tree()["w"], "v": grads_tree(1)["big"][:64]}
  # The "auto" selection is exact here: every tensor is below sample_size.
  options = dict(selection=selection, granularity=granularity, sample_size=1 << 20)
  tx = gmt_optax.gradient_mask(0.5, **options)
  expected, expected_state = jax.jit(tx.update)(grads, tx.init(grads))

  local = gmt_optax.gradient_mask(0.5, axis_name="x", **options)
  specs = {"w": P("x"), "v": P(None, "x")}
  update = jax.jit(
    jax.shard_map(local.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
  )
  sharded = shard(grads, mesh, specs)
  updates, state = update(sharded, local.init(grads))
  for key in grads:
    np.testing.assert_array_equal(updates[key], expected[key], err_msg=key)
  assert float(state.kept_fraction) == pytest.approx(float(expected_state.kept_fraction), abs=1e-6)


def test_shard_map_sampling_masks_the_ratio_of_the_whole_tensor():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AUTO,))
  g = jnp.asarray(np.random.default_rng(3).standard_normal((512, 256)), jnp.float32)
  # Shards of very different scales: a per-shard threshold would mask ~50%
  # of each shard, the global one masks mostly the small shards.
  g = g * jnp.repeat(jnp.logspace(-3, 0, 8), 64)[:, None]
  tx = gmt_optax.gradient_mask(0.5, selection="sample", sample_size=2048, axis_name="x")
  update = jax.jit(
    jax.shard_map(tx.update, mesh=mesh, in_specs=(P("x"), P()), out_specs=(P("x"), P()))
  )
  updates, state = update(jax.device_put(g, NamedSharding(mesh, P("x"))), tx.init(g))
  masked = np.asarray(updates) == 0
  reference = np.abs(np.asarray(g)) < np.quantile(np.abs(np.asarray(g)), 0.5)
  assert abs(masked.mean() - 0.5) < 0.02
  assert (masked == reference).mean() > 0.98
  assert float(state.kept_fraction) == pytest.approx(0.5, abs=0.02)


def test_pmap_with_axis_name_gives_the_same_result_on_every_device():
  n = jax.local_device_count()
  g = jnp.asarray(np.random.default_rng(4).standard_normal((n, 40, 30)), jnp.float32)
  tx = gmt_optax.gradient_mask(0.3, selection="bisect", axis_name="i")
  state = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), tx.init(g[0]))
  updates, new_state = jax.pmap(tx.update, axis_name="i")(g, state)
  # The per-device pieces are masked with the threshold of the whole tensor.
  magnitudes = np.abs(np.asarray(g))
  threshold = np.sort(magnitudes.ravel())[int(np.floor(0.3 * g.size))]
  np.testing.assert_array_equal(updates, np.where(magnitudes >= threshold, np.asarray(g), 0))
  kept = np.asarray(new_state.kept_fraction)
  assert (kept == kept[0]).all() and kept[0] == pytest.approx(0.7, abs=1e-3)
  # Data-parallel replicas (the same gradient on every device) agree too.
  replicated = jnp.stack([g[0]] * n)
  updates, _ = jax.pmap(gmt_optax.gradient_mask(0.3).update, axis_name="i")(replicated, state)
  for device_update in updates[1:]:
    np.testing.assert_array_equal(device_update, updates[0])


# Stateless inner optimizers: optax's own scalar counts are placed on one
# device by init, which is optax's business.
@pytest.mark.parametrize(
  "factory",
  [
    lambda: gmt_optax.gmt(optax.sgd(1e-3), 0.5, sample_size=SAMPLE_SIZE),
    lambda: gmt_optax.gmt(optax.sgd(1e-3), 0.5, accumulation_steps=2, sample_size=SAMPLE_SIZE),
    lambda: gmt_optax.random_mask(0.5),
    lambda: gmt_optax.hft(optax.sgd(1e-3)),
  ],
)
def test_state_sharding_is_stable_under_jit(factory):
  mesh, specs = layouts()["fsdp+tensor"]
  params = shard(grads_tree(), mesh, specs)
  tx = factory()
  # The accumulator is sharded like the parameters, even from a plain init.
  for leaf, acc in zip(
    jax.tree_util.tree_leaves(params),
    jax.tree_util.tree_leaves(getattr(tx.init(params), "grad_mean", params)),
  ):
    assert acc.sharding.is_equivalent_to(leaf.sharding, leaf.ndim)
  state = tx.init(params)
  update = jax.jit(tx.update)
  signature = lambda s: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), s)
  before = signature(state)
  for _ in range(3):
    _, state = update(params, state, params)
  assert signature(state) == before
  assert update._cache_size() == 1


@pytest.mark.parametrize("layout", ["fsdp", "fsdp+tensor"])
def test_random_mask_is_the_same_sharded_or_not(layout):
  mesh, specs = layouts()[layout]
  grads = grads_tree()
  tx = gmt_optax.random_mask(0.5, seed=3)
  expected, _ = jax.jit(tx.update)(grads, tx.init(grads))
  sharded = shard(grads, mesh, specs)
  updates, _ = jax.jit(tx.update)(sharded, tx.init(sharded))
  for key in grads:
    np.testing.assert_array_equal(updates[key], expected[key], err_msg=key)


def stacked_tree():
  """Scanned layers: 4 layers of each matrix stacked in one leaf."""
  rng = np.random.default_rng(5)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {
    "q": normal(4, 64, 96),
    "mlp": normal(4, 96, 32),
    "norm": normal(4, 96),
    "embed": normal(128, 32),
  }


STACKED_AXES = {"q": 1, "mlp": 1, "norm": 1, "embed": 0}


def stacked_layout():
  """FSDP over a non-leading axis of each stacked leaf; layers unsplit."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  return mesh, {
    "q": P(None, "fsdp", None),
    "mlp": P(None, None, "fsdp"),
    "norm": P(None, "fsdp"),
    "embed": P("fsdp", None),
  }


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("selection", ["auto", "bisect", "sample"])
def test_stacked_layers_jit_sharded_equals_unsharded(granularity, selection):
  mesh, specs = stacked_layout()
  grads = stacked_tree()
  tx = gmt_optax.gradient_mask(
    0.5,
    granularity=granularity,
    selection=selection,
    sample_size=SAMPLE_SIZE,
    stacked_axes=STACKED_AXES,
  )
  expected, expected_state = jax.jit(tx.update)(grads, tx.init(grads))
  sharded = shard(grads, mesh, specs)
  updates, state = jax.jit(tx.update)(sharded, tx.init(sharded))
  for key in grads:
    assert updates[key].sharding.is_equivalent_to(sharded[key].sharding, grads[key].ndim)
    np.testing.assert_array_equal(updates[key], expected[key], err_msg=key)
  assert float(state.kept_fraction) == pytest.approx(float(expected_state.kept_fraction), abs=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_stacked_default_selection_compiles_without_all_gather_or_sort(granularity):
  mesh, specs = stacked_layout()
  params = shard(stacked_tree(), mesh, specs)
  tx = optax.chain(
    gmt_optax.gradient_mask(
      0.5, granularity=granularity, sample_size=SAMPLE_SIZE, stacked_axes=STACKED_AXES
    ),
    optax.adamw(1e-3),
  )

  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  hlo = jax.jit(update).lower(params, tx.init(params), params).compile().as_text()
  assert collectives_and_sorts(hlo) == []
  assert "all-reduce" in hlo


def test_stacked_layers_under_shard_map():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AUTO,))
  grads = {k: v for k, v in stacked_tree().items() if k != "embed"}
  options = dict(selection="bisect", stacked_axes=1)
  tx = gmt_optax.gradient_mask(0.5, **options)
  expected, expected_state = jax.jit(tx.update)(grads, tx.init(grads))
  local = gmt_optax.gradient_mask(0.5, axis_name="x", **options)
  specs = {"q": P(None, "x"), "mlp": P(None, None, "x"), "norm": P(None, "x")}
  update = jax.jit(
    jax.shard_map(local.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
  )
  updates, state = update(shard(grads, mesh, specs), local.init(grads))
  for key in grads:
    np.testing.assert_array_equal(updates[key], expected[key], err_msg=key)
  assert float(state.kept_fraction) == pytest.approx(float(expected_state.kept_fraction), abs=1e-6)

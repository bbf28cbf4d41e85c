"""gradient_mask and random_mask against a numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gmt_optax
from gmt_optax import _selection

SELECTIONS = ("auto", "exact", "bisect", "sample")


def reference_mask(grads, ratio):
  """numpy: keep |g| >= T, T the value of rank floor(r n) of |g| (ascending),
  computed over all arrays in ``grads`` together."""
  mags = np.concatenate([np.abs(np.asarray(g, np.float64)).ravel() for g in grads])
  k = min(int(math.floor(ratio * mags.size)), mags.size - 1)
  threshold = np.sort(mags)[k]
  return [
    np.where(np.abs(np.asarray(g, np.float64)) >= threshold, np.asarray(g, np.float64), 0.0)
    for g in grads
  ]


def random_grads(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def masked_fraction(x):
  return float(jnp.mean(x == 0))


def run(tx, grads):
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  return updates, state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("selection", ["exact", "bisect"])
def test_exact_per_tensor_matches_numpy(dtype, ratio, selection):
  rng = np.random.default_rng(int(ratio * 100))
  # Per-tensor thresholds are independent: one tree checks every shape.
  grads = {
    str(shape): random_grads(rng, shape, dtype) for shape in [(7,), (33, 17), (4, 5, 6), (1, 1)]
  }
  updates, _ = run(gmt_optax.gradient_mask(ratio, selection=selection), grads)
  for key, g in grads.items():
    assert updates[key].dtype == dtype
    (expected,) = reference_mask([g], ratio)
    np.testing.assert_array_equal(np.asarray(updates[key], np.float64), expected, err_msg=key)


@pytest.mark.parametrize("selection", ["bisect", "sample"])
def test_many_same_shaped_tensors_searched_in_chunks(selection):
  # 45 rows of 16 KiB stack into a block searched in cache-sized chunks
  # (with a padded last chunk): every tensor keeps its own threshold.
  rng = np.random.default_rng(11)
  grads = {f"w{i}": random_grads(rng, (64, 64)) * (i + 1) for i in range(45)}
  updates, _ = run(gmt_optax.gradient_mask(0.3, selection=selection, sample_size=4096), grads)
  for key, g in grads.items():
    if selection == "bisect":
      (expected,) = reference_mask([g], 0.3)
      np.testing.assert_array_equal(updates[key], expected, err_msg=key)
    else:
      assert abs(masked_fraction(updates[key]) - 0.3) <= dkw_tolerance(4096)


def test_ties_are_kept_and_bisect_matches_numpy():
  # 40% of the entries equal the threshold value: all of them are kept.
  g = jnp.asarray([0.1] * 3 + [0.5] * 4 + [2.0] * 3, jnp.float32)
  for selection in ("exact", "bisect"):
    updates, state = run(gmt_optax.gradient_mask(0.5, selection=selection), {"g": g})
    (expected,) = reference_mask([g], 0.5)
    np.testing.assert_array_equal(updates["g"], expected)
    assert float(state.kept_fraction) == pytest.approx(0.7)


@pytest.mark.parametrize("selection", ["exact", "bisect"])
def test_global_threshold_matches_numpy(selection):
  rng = np.random.default_rng(1)
  grads = {
    "a": random_grads(rng, (40, 30)) * 3.0,
    "b": random_grads(rng, (500,), jnp.bfloat16),
    "c": random_grads(rng, (2, 3, 4)),
  }
  tx = gmt_optax.gradient_mask(0.6, granularity="global", selection=selection)
  updates, state = run(tx, grads)
  leaves = [grads[k] for k in "abc"]
  for key, expected in zip("abc", reference_mask(leaves, 0.6)):
    np.testing.assert_array_equal(np.asarray(updates[key], np.float64), expected)
  total = sum(g.size for g in leaves)
  kept = sum(int(jnp.sum(updates[k] != 0)) for k in "abc")
  assert float(state.kept_fraction) == pytest.approx(kept / total, abs=1e-6)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_zero_ratio_is_identity_bit_for_bit(selection, granularity):
  rng = np.random.default_rng(2)
  g = np.asarray(rng.standard_normal((64, 48)), np.float32)
  g[0, :3] = [np.nan, np.inf, -0.0]
  grads = {"g": jnp.asarray(g), "h": random_grads(rng, (9,), jnp.bfloat16)}
  tx = gmt_optax.gradient_mask(0.0, selection=selection, granularity=granularity, sample_size=256)
  updates, _ = run(tx, grads)
  for key in grads:
    assert updates[key].dtype == grads[key].dtype
    np.testing.assert_array_equal(
      np.asarray(updates[key]).view(np.uint8), np.asarray(grads[key]).view(np.uint8)
    )
  # A traced ratio of 0 (inject_hyperparams) is the identity too.
  injected = optax.inject_hyperparams(gmt_optax.gradient_mask)(
    mask_ratio=0.0, selection=selection, granularity=granularity
  )
  updates, _ = run(injected, grads)
  np.testing.assert_array_equal(np.asarray(updates["g"]).view(np.uint8), g.view(np.uint8))


def dkw_tolerance(m, delta=1e-6):
  """Masked-fraction tolerance of a threshold from m samples (DKW + rank
  rounding), holding with probability 1 - delta."""
  return math.sqrt(math.log(2 / delta) / (2 * m)) + 1 / m


def test_sample_selection_masks_within_tolerance_over_seeds_and_shapes():
  m = 2048
  errors = []
  for shape in [(300, 200), (123457,), (50, 40, 30)]:
    # Ratio and seed as hyperparameters: one compilation per shape.
    factory = optax.inject_hyperparams(
      gmt_optax.gradient_mask, static_args=("selection", "sample_size")
    )
    update = jax.jit(factory(0.5, selection="sample", sample_size=m).update)
    for seed in range(8):
      grads = {"w": random_grads(np.random.default_rng(100 + seed), shape)}
      for ratio in (0.2, 0.5, 0.9):
        tx = factory(ratio, selection="sample", sample_size=m, seed=seed)
        updates, state = update(grads, tx.init(grads))
        error = masked_fraction(updates["w"]) - ratio
        assert abs(error) <= dkw_tolerance(m), (seed, shape, ratio, error)
        # The logged kept fraction is the sample's estimate.
        assert float(gmt_optax.kept_fraction(state)) == pytest.approx(1 - ratio, abs=2 / m)
        errors.append(error)
  # Unbiased: the mean error is far below the per-draw tolerance.
  assert abs(np.mean(errors)) < 3 * 0.5 / math.sqrt(m * len(errors))


def test_auto_is_exact_for_small_leaves_and_sampled_for_large():
  rng = np.random.default_rng(3)
  small, large = random_grads(rng, (30, 30)), random_grads(rng, (400, 300))
  tx = gmt_optax.gradient_mask(0.4, sample_size=1000)
  updates, _ = run(tx, {"small": small, "large": large})
  (expected_small,) = reference_mask([small], 0.4)
  np.testing.assert_array_equal(updates["small"], expected_small)
  (expected_large,) = reference_mask([large], 0.4)
  assert not np.array_equal(np.asarray(updates["large"]), expected_large)
  assert abs(masked_fraction(updates["large"]) - 0.4) <= dkw_tolerance(1000)


def test_global_sample_weights_leaves_by_size():
  rng = np.random.default_rng(4)
  # A big leaf of small values and a small leaf of big values: one global
  # threshold must mask mostly the big leaf.
  grads = {"big": random_grads(rng, (600, 500)) * 0.01, "small": random_grads(rng, (100, 50))}
  tx = gmt_optax.gradient_mask(0.5, granularity="global", selection="sample", sample_size=4096)
  updates, state = run(tx, grads)
  exact_big, exact_small = reference_mask([grads["big"], grads["small"]], 0.5)
  total = grads["big"].size + grads["small"].size
  masked = (int(jnp.sum(updates["big"] == 0)) + int(jnp.sum(updates["small"] == 0))) / total
  assert abs(masked - 0.5) <= dkw_tolerance(4096)
  assert abs(masked_fraction(updates["small"]) - np.mean(exact_small == 0)) < 0.05
  assert float(state.kept_fraction) == pytest.approx(1 - masked, abs=0.02)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_nan_and_inf_are_kept_and_do_not_move_the_threshold(selection):
  rng = np.random.default_rng(5)
  g = np.asarray(rng.standard_normal(4000), np.float32)
  g[:40] = np.nan
  g[40:60] = -np.inf
  updates, _ = run(gmt_optax.gradient_mask(0.5, selection=selection, sample_size=20000), {"g": g})
  out = np.asarray(updates["g"])
  assert np.isnan(out[:40]).all() and (out[40:60] == -np.inf).all()
  # The finite entries are masked as if NaN/Inf were the largest magnitudes.
  (expected,) = reference_mask([np.where(np.isnan(g), np.inf, g)], 0.5)
  if selection == "sample":  # a threshold mask, at the sampled rank
    kept = out[60:] != 0
    assert np.abs(g[60:][~kept]).max() <= np.abs(g[60:][kept]).min()
    assert abs(np.mean(out == 0) - 0.5) <= dkw_tolerance(20000)
  else:
    np.testing.assert_array_equal(out[60:], expected[60:])


@pytest.mark.parametrize("selection", SELECTIONS)
def test_scalars_empty_and_non_float_leaves(selection):
  grads = {
    "scalar": jnp.asarray(3.0),
    "empty": jnp.zeros((0, 4)),
    "ints": jnp.arange(6),
    "w": jnp.asarray([1.0, -2.0, 3.0, -4.0]),
    "none": None,
  }
  updates, state = run(gmt_optax.gradient_mask(0.5, selection=selection, sample_size=64), grads)
  assert float(updates["scalar"]) == 3.0
  assert updates["empty"].shape == (0, 4)
  np.testing.assert_array_equal(updates["ints"], np.arange(6))
  assert updates["none"] is None
  if selection != "sample":
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0, 3.0, -4.0])
  assert np.isfinite(float(state.kept_fraction))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_mask_ratio_names_the_value(bad):
  for factory in (gmt_optax.gradient_mask, gmt_optax.random_mask):
    with pytest.raises(ValueError, match=f"mask_ratio.*{bad}"):
      factory(bad)
  with pytest.raises(ValueError, match=f"mask_ratio.*{bad}"):
    gmt_optax.gmt(optax.sgd(1.0), bad)


@pytest.mark.parametrize(
  "bad",
  [np.float32(1.0), np.float64(-0.5), jnp.array(1.5), jnp.array(jnp.nan), jnp.array([0.5]), "0.5"],
  ids=["np.float32(1)", "np.float64(-0.5)", "jnp(1.5)", "jnp(nan)", "shape (1,)", "str"],
)
def test_a_concrete_array_or_numpy_ratio_is_checked_like_a_float(bad):
  for factory in (gmt_optax.gradient_mask, gmt_optax.random_mask):
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\)"):
      factory(bad)
  # In range: accepted, and masks that fraction as a Python float would.
  grads = {"w": jnp.arange(1.0, 11.0)}
  mask = gmt_optax.gradient_mask(np.float32(0.5))
  kept, _ = mask.update(grads, mask.init(grads))
  np.testing.assert_array_equal(kept["w"], [0.0] * 5 + [6.0, 7.0, 8.0, 9.0, 10.0])
  grads = {"w": jnp.ones(4000)}
  mask = gmt_optax.random_mask(jnp.array(0.25))
  kept, _ = mask.update(grads, mask.init(grads))
  assert float(jnp.mean(kept["w"] == 0)) == pytest.approx(0.25, abs=0.03)
  for fraction in (np.float32(1.5), jnp.array(jnp.nan)):
    with pytest.raises(ValueError, match="freeze_fraction must be in"):
      gmt_optax.hft(optax.sgd(1.0), freeze_fraction=fraction)


def test_an_injected_ratio_out_of_range_is_refused_at_init_but_traced_ones_pass():
  grads = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\)"):
    optax.inject_hyperparams(gmt_optax.gradient_mask)(mask_ratio=1.5).init(grads)
  injected = optax.inject_hyperparams(gmt_optax.gradient_mask)(mask_ratio=0.5)
  state = injected.init(grads)
  jax.jit(injected.update)(grads, state)  # traced: not checked, not refused


def test_bad_options_name_the_option():
  with pytest.raises(ValueError, match="granularity.*'layer'"):
    gmt_optax.gradient_mask(0.5, granularity="layer")
  with pytest.raises(ValueError, match="selection.*'topk'"):
    gmt_optax.gradient_mask(0.5, selection="topk")
  with pytest.raises(ValueError, match="sample_size.*0"):
    gmt_optax.gradient_mask(0.5, sample_size=0)


def test_mask_tree_and_callable_choose_leaves():
  rng = np.random.default_rng(6)
  grads = {
    "embed": random_grads(rng, (20, 8)),
    "layers": {"w": random_grads(rng, (8, 8)), "norm": random_grads(rng, (8,))},
  }
  by_tree = gmt_optax.gradient_mask(0.5, mask={"embed": False, "layers": True})
  by_callable = gmt_optax.gradient_mask(
    0.5, mask=lambda tree: jax.tree_util.tree_map(lambda x: x.ndim == 2, tree)
  )
  updates, _ = run(by_tree, grads)
  np.testing.assert_array_equal(updates["embed"], grads["embed"])
  for key in ("w", "norm"):
    (expected,) = reference_mask([grads["layers"][key]], 0.5)
    np.testing.assert_array_equal(updates["layers"][key], expected)
  updates, _ = run(by_callable, grads)
  np.testing.assert_array_equal(updates["layers"]["norm"], grads["layers"]["norm"])
  (expected,) = reference_mask([grads["embed"]], 0.5)
  np.testing.assert_array_equal(updates["embed"], expected)


def test_schedule_and_inject_hyperparams():
  rng = np.random.default_rng(7)
  grads = {"w": random_grads(rng, (50, 40))}
  # Ratios exact in binary: a traced ratio's float32 rank is then exact too.
  schedule = optax.linear_schedule(0.0, 0.75, transition_steps=3)
  tx = gmt_optax.gradient_mask(schedule, selection="bisect")
  state = tx.init(grads)
  update = jax.jit(tx.update)
  for step in range(5):
    updates, state = update(grads, state)
    (expected,) = reference_mask([grads["w"]], float(schedule(step)))
    np.testing.assert_array_equal(updates["w"], expected)

  injected = optax.inject_hyperparams(gmt_optax.gradient_mask)(mask_ratio=0.3, selection="bisect")
  state = injected.init(grads)
  updates, state = jax.jit(injected.update)(grads, state)
  (expected,) = reference_mask([grads["w"]], 0.3)
  np.testing.assert_array_equal(updates["w"], expected)
  state.hyperparams["mask_ratio"] = jnp.asarray(0.6)
  updates, state = jax.jit(injected.update)(grads, state)
  assert masked_fraction(updates["w"]) == pytest.approx(0.6, abs=1e-3)
  assert float(gmt_optax.kept_fraction(state)) == pytest.approx(0.4, abs=1e-3)


@pytest.mark.parametrize(
  "factory",
  [
    lambda: gmt_optax.gradient_mask(0.5),
    lambda: gmt_optax.random_mask(0.5),
    lambda: gmt_optax.gmt(optax.adamw(1e-3), 0.5, accumulation_steps=2),
    lambda: gmt_optax.gmt(optax.adamw(1e-3), 0.5, mask_updates=True),
    lambda: gmt_optax.hft(optax.adamw(1e-3), period=2),
    lambda: gmt_optax.gradient_mask(0.5, stacked_axes=1, sample_size=16),
    lambda: gmt_optax.gmt(
      optax.adamw(1e-3), 0.5, accumulation_steps=2, mask_updates=True, stacked_axes={"w": 1, "b": 0}
    ),
    lambda: gmt_optax.hft(optax.adamw(1e-3), period=2, stacked_axes=1),
  ],
)
def test_state_structure_is_stable_across_updates(factory):
  tx = factory()
  rng = np.random.default_rng(8)
  params = {"w": random_grads(rng, (40, 30)), "b": random_grads(rng, (30,))}
  abstract = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  state = tx.init(params)
  # Abstract init gives the same structure without touching values.
  assert jax.tree_util.tree_structure(
    jax.eval_shape(tx.init, abstract)
  ) == jax.tree_util.tree_structure(state)
  update = jax.jit(tx.update)
  before = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), state)
  for _ in range(3):
    _, state = update(params, state, params)
  after = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), state)
  assert before == after
  assert update._cache_size() == 1  # no retrace


def test_init_on_shape_dtype_structs():
  abstract = {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.bfloat16)}
  for tx in (
    gmt_optax.gradient_mask(0.5),
    gmt_optax.random_mask(0.5),
    gmt_optax.accumulate_gradients(optax.identity(), 2),
  ):
    state = tx.init(abstract)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))


def state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def test_memory_no_parameter_sized_state():
  params = {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,), jnp.bfloat16)}
  param_bytes = state_bytes(params)
  assert state_bytes(gmt_optax.gradient_mask(0.5).init(params)) <= 64
  assert state_bytes(gmt_optax.random_mask(0.5).init(params)) <= 64
  adamw_bytes = state_bytes(optax.adamw(1e-3).init(params))
  accumulated = gmt_optax.gmt(optax.adamw(1e-3), 0.5, accumulation_steps=4).init(params)
  # One gradient-sized accumulator, AdamW's moments and a few scalars.
  assert param_bytes + adamw_bytes < state_bytes(accumulated)
  assert state_bytes(accumulated) <= param_bytes + adamw_bytes + 64


def test_random_mask_zeroes_the_ratio_on_average():
  rng = np.random.default_rng(9)
  grads = {"w": random_grads(rng, (300, 300)), "b": random_grads(rng, (7,))}
  tx = gmt_optax.random_mask(0.3, mask=lambda t: {"w": True, "b": False})
  state = tx.init(grads)
  update = jax.jit(tx.update)
  first, state = update(grads, state)
  assert masked_fraction(first["w"]) == pytest.approx(0.3, abs=0.01)
  assert float(state.kept_fraction) == pytest.approx(1 - masked_fraction(first["w"]), abs=1e-6)
  np.testing.assert_array_equal(first["b"], grads["b"])
  kept = np.asarray(first["w"]) != 0
  np.testing.assert_array_equal(np.asarray(first["w"])[kept], np.asarray(grads["w"])[kept])
  second, state = update(grads, state)
  assert not np.array_equal(np.asarray(first["w"]), np.asarray(second["w"]))


def test_kept_fraction_finds_nested_state_or_none():
  params = {"w": jnp.asarray([1.0, 2.0, 3.0, 4.0])}
  tx = optax.chain(optax.clip_by_global_norm(1.0), gmt_optax.gradient_mask(0.5), optax.adamw(1e-3))
  _, state = tx.update(params, tx.init(params), params)
  assert float(gmt_optax.kept_fraction(state)) == 0.5
  assert gmt_optax.kept_fraction(optax.adamw(1e-3).init(params)) is None


def test_inside_multisteps():
  rng = np.random.default_rng(10)
  grads = [{"w": random_grads(rng, (20, 20))} for _ in range(2)]
  tx = optax.MultiSteps(optax.chain(gmt_optax.gradient_mask(0.5), optax.sgd(1.0)), 2)
  state = tx.init(grads[0])
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, g)
  mean = (grads[0]["w"] + grads[1]["w"]) / 2
  (expected,) = reference_mask([mean], 0.5)
  np.testing.assert_allclose(updates["w"], -expected, rtol=1e-6)


def stacked_and_separate(rng, num_layers=3, dtype=jnp.float32):
  """The same layer tensors as stacked leaves and as one leaf per layer."""
  stacked = {
    "q": random_grads(rng, (num_layers, 33, 17), dtype)
    * jnp.arange(1, num_layers + 1, dtype=dtype)[:, None, None],
    "norm": random_grads(rng, (num_layers, 9), dtype),
    "embed": random_grads(rng, (40, 8), dtype),
  }
  separate = {"embed": stacked["embed"]}
  for layer in range(num_layers):
    separate |= {f"q{layer}": stacked["q"][layer], f"norm{layer}": stacked["norm"][layer]}
  return stacked, separate


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("selection", ["exact", "bisect"])
def test_stacked_layers_equal_separate_leaves_bit_for_bit(selection, dtype):
  stacked, separate = stacked_and_separate(np.random.default_rng(12), dtype=dtype)
  stacked_axes = {"q": 1, "norm": 1, "embed": 0}
  updates, state = run(
    gmt_optax.gradient_mask(0.4, selection=selection, stacked_axes=stacked_axes), stacked
  )
  expected, expected_state = run(gmt_optax.gradient_mask(0.4, selection=selection), separate)
  np.testing.assert_array_equal(updates["embed"], expected["embed"])
  for layer in range(3):
    for key in ("q", "norm"):
      np.testing.assert_array_equal(
        np.asarray(updates[key][layer]).view(np.uint8),
        np.asarray(expected[f"{key}{layer}"]).view(np.uint8),
      )
  assert float(state.kept_fraction) == float(expected_state.kept_fraction)


def test_stacked_axes_callable_and_two_stacked_axes():
  rng = np.random.default_rng(13)
  g = random_grads(rng, (2, 3, 20, 10))
  by_callable = gmt_optax.gradient_mask(
    0.3, selection="bisect", stacked_axes=lambda tree: jax.tree_util.tree_map(lambda _: 2, tree)
  )
  updates, _ = run(by_callable, {"g": g})
  for i in range(2):
    for j in range(3):
      (expected,) = reference_mask([g[i, j]], 0.3)
      np.testing.assert_array_equal(updates["g"][i, j], expected)


def test_stacked_sample_selection_within_tolerance_per_slice():
  m = 2048
  rng = np.random.default_rng(14)
  # Slices of very different scales: one threshold per slice masks the
  # ratio of each; a single threshold would mask the small ones entirely.
  g = random_grads(rng, (6, 300, 200)) * jnp.logspace(-3, 0, 6)[:, None, None]
  for seed in range(3):
    tx = gmt_optax.gradient_mask(0.5, sample_size=m, stacked_axes=1, seed=seed)
    updates, state = run(tx, {"g": g})
    for layer in range(6):
      error = masked_fraction(updates["g"][layer]) - 0.5
      assert abs(error) <= dkw_tolerance(m), (seed, layer, error)
    assert float(state.kept_fraction) == pytest.approx(0.5, abs=2 / m)


@pytest.mark.parametrize("selection", ["exact", "bisect", "sample"])
def test_stacked_leaves_under_a_global_threshold(selection):
  stacked, separate = stacked_and_separate(np.random.default_rng(15))
  tx = lambda **kw: gmt_optax.gradient_mask(
    0.6, granularity="global", selection=selection, sample_size=256, **kw
  )
  updates, state = run(tx(stacked_axes=1), {k: stacked[k] for k in ("q", "norm")})
  expected, _ = run(tx(), {k: v for k, v in separate.items() if k != "embed"})
  if selection == "sample":  # 256 samples per slice, weighted by its size
    masked = (int(jnp.sum(updates["q"] == 0)) + int(jnp.sum(updates["norm"] == 0))) / (
      3 * 33 * 17 + 3 * 9
    )
    assert abs(masked - 0.6) <= dkw_tolerance(256)
    assert float(state.kept_fraction) == pytest.approx(1 - masked, abs=0.05)
    return
  for layer in range(3):
    np.testing.assert_array_equal(updates["q"][layer], expected[f"q{layer}"])
  leaves = [stacked["q"], stacked["norm"]]
  np.testing.assert_array_equal(updates["q"], reference_mask(leaves, 0.6)[0])
  kept = sum(int(jnp.sum(updates[k] != 0)) for k in ("q", "norm"))
  assert float(state.kept_fraction) == pytest.approx(kept / sum(g.size for g in leaves), abs=1e-6)


def test_bad_stacked_axes_name_the_value():
  with pytest.raises(ValueError, match="stacked_axes.*-1"):
    gmt_optax.gradient_mask(0.5, stacked_axes=-1)
  with pytest.raises(ValueError, match="stacked_axes.*3.*shape \\(4, 5\\)"):
    run(gmt_optax.gradient_mask(0.5, stacked_axes=3), {"w": jnp.ones((4, 5))})


# Counts beyond int32. vmap with an axis name over an unbatched operand
# stands for that many identical shards: psum sums the counts of all of them,
# so 2**21 entries in memory count as 2**32 without allocating them.
VIRTUAL_SHARDS = 1 << 11


def over_virtual_shards(f):
  return jax.jit(jax.vmap(f, in_axes=None, out_axes=None, axis_name="i", axis_size=VIRTUAL_SHARDS))


def limbs_value(limbs):
  high, low = np.asarray(limbs, np.int64)
  return high * 2**_selection.COUNT_LOW_BITS + low


def test_num_masked_and_count_limbs_beyond_int32():
  assert _selection.num_masked(0.5, 3 * 2**31) == 3 * 2**30
  assert _selection.num_masked(0.3, 2**40) == int(np.floor(0.3 * 2**40))
  assert limbs_value(_selection.count_limbs(2**40 + 5)) == 2**40 + 5
  rank = jax.jit(lambda r, n=3 * 2**31: _selection.count_limbs(_selection.num_masked(r, n)))
  assert limbs_value(rank(0.5)) == 3 * 2**30
  assert limbs_value(rank(0.3)) == pytest.approx(0.3 * 3 * 2**31, rel=2**-23)
  # A traced ratio just below 1 still gives a rank below n.
  n = 2**40 + 1
  top = jax.jit(lambda r: _selection.count_limbs(_selection.num_masked(r, n)))
  assert limbs_value(top(np.float32(1 - 2**-24))) <= n - 1
  with pytest.raises(ValueError, match="count exactly"):
    _selection.count_limbs(2**43)


def test_bisect_counts_beyond_int32_exactly():
  rng = np.random.default_rng(16)
  block = jnp.asarray(rng.integers(0, 2**31 - 1, (1 << 10, 1 << 11)), jnp.int32)
  total = block.size * VIRTUAL_SHARDS  # 2**32
  for rank in (2**31 + 12345, 3 * 2**30 - 1, total - 1):
    target = _selection.limbs_plus_one(_selection.count_limbs(rank))[:, None]
    found = over_virtual_shards(
      lambda t: _selection.bisect(
        _selection.CountingProblem([block], [np.zeros(1 << 10, np.int32)], None, t), axis_name="i"
      )
    )(target)
    # Every key appears VIRTUAL_SHARDS times.
    assert int(found[0]) == np.sort(np.asarray(block).ravel())[rank // VIRTUAL_SHARDS]
  # Weighted: each counted entry stands for 2**11 (float32 sums of multiples
  # of 2**11 are exact below 2**35); 2**20 + 1 entries reach the target.
  target = _selection.count_limbs(2**31 + 2**11)[:, None]
  found = _selection.bisect(
    _selection.CountingProblem(
      [block], [np.zeros(1 << 10, np.int32)], [np.full(1 << 10, float(VIRTUAL_SHARDS))], target
    )
  )
  assert int(found[0]) == np.sort(np.asarray(block).ravel())[2**20]


def test_count_rows_splits_rows_beyond_int32(monkeypatch):
  # The same code path as a row of 2**31 entries or more, at a lower limit.
  monkeypatch.setattr(_selection, "_INT32_COUNT_LIMIT", 64)
  hits = jnp.asarray(np.random.default_rng(17).random((3, 5, 7, 40)) < 0.3)
  counts = jax.jit(_selection.count_rows)(hits)
  np.testing.assert_array_equal(limbs_value(counts), np.sum(np.asarray(hits), axis=(1, 2, 3)))


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_gradient_mask_beyond_int32_entries(granularity):
  rng = np.random.default_rng(18)
  g = random_grads(rng, (1 << 10, 1 << 11))  # counted as 2**32 entries
  tx = gmt_optax.gradient_mask(0.3, selection="bisect", granularity=granularity, axis_name="i")
  updates, state = over_virtual_shards(tx.update)(g, tx.init(g))
  rank = int(np.floor(0.3 * g.size * VIRTUAL_SHARDS))
  magnitudes = np.abs(np.asarray(g))
  threshold = np.sort(magnitudes.ravel())[rank // VIRTUAL_SHARDS]
  expected = np.where(magnitudes >= threshold, np.asarray(g), 0)
  np.testing.assert_array_equal(updates, expected)
  assert float(state.kept_fraction) == pytest.approx(np.mean(expected != 0), abs=1e-6)


# Few examples: each new shape/dtype/ratio compiles the update once.
@settings(max_examples=10, deadline=None)
@given(
  data=st.data(),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  ratio=st.floats(0.0, 0.99),
  selection=st.sampled_from(["exact", "bisect"]),
)
def test_kept_fraction_property(data, dtype, ratio, selection):
  # Small integers and their halves: many ties, zeros and signs, exact in every dtype.
  g = data.draw(
    hnp.arrays(
      np.float32,
      hnp.array_shapes(max_dims=3, max_side=24),
      elements=st.integers(-64, 64).map(lambda i: i / 2),
    )
  )
  g = jnp.asarray(g, dtype)
  updates, state = run(gmt_optax.gradient_mask(ratio, selection=selection), {"g": g})
  (expected,) = reference_mask([g], ratio)
  np.testing.assert_array_equal(np.asarray(updates["g"], np.float64), expected)
  mags = np.abs(np.asarray(g, np.float64)).ravel()
  threshold = np.sort(mags)[min(math.floor(ratio * mags.size), mags.size - 1)]
  kept = float(state.kept_fraction)
  assert kept >= 1 - ratio - 1e-6
  assert kept == pytest.approx(np.mean(mags >= threshold), abs=1e-6)

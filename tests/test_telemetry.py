"""Mask telemetry (`gradient_mask(telemetry=True)`) against exact numpy computations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gmt_optax
from gmt_optax import _masking, _selection, _telemetry
from tests.test_sharding import collectives_and_sorts

AUTO = jax.sharding.AxisType.Auto
STACKED = {"embed": 0, "layers": 1}


def grads_tree(rng, scale=1.0):
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32) * scale
  return {
    "embed": jnp.asarray(normal(40, 24)),
    "layers": {"w": jnp.asarray(normal(3, 16, 24)), "norm": jnp.asarray(normal(3, 24))},
  }


def rows_of(grads, stacked=STACKED):
  """[(name, [rows, ...] numpy)] in the telemetry's row order (tree_leaves order)."""
  axes = _masking.leaf_values(stacked, grads, jax.tree_util.tree_structure(grads))
  paths = jax.tree_util.tree_flatten_with_path(grads)[0]
  return [
    (
      jax.tree_util.keystr(path, simple=True, separator="/"),
      np.asarray(x).reshape((-1,) + x.shape[a:]),
    )
    for (path, x), a in zip(paths, axes)
  ]


def sampled_positions(grads, rng_key, stacked=STACKED):
  """Flat in-row index of each telemetry sample: the sampler run on the entries' indices."""
  blocks = [
    jnp.arange(np.prod(r.shape[1:]), dtype=jnp.int32).reshape((1,) + r.shape[1:])
    for _, r in rows_of(grads, stacked)
  ]
  drawn = _selection.sample_entries(
    blocks, _telemetry.TELEMETRY_SAMPLE_SIZE, jax.random.split(rng_key)[1]
  )
  return [np.asarray(d[0]) for d in drawn]


def exact_statistics(grads, ratio):
  """Per row: (kept fraction, threshold, kept energy, keep mask) by sorting in float64."""
  out = []
  for _, rows in rows_of(grads):
    for row in rows.reshape(rows.shape[0], -1).astype(np.float64):
      magnitudes = np.abs(row)
      threshold = np.sort(magnitudes)[int(np.floor(ratio * row.size))]
      keep = magnitudes >= threshold
      out.append((keep.mean(), threshold, np.sum(row[keep] ** 2) / np.sum(row**2), keep))
  return out


def test_statistics_equal_exact_computations_per_tensor_and_layer():
  rng = np.random.default_rng(0)
  ratio = 0.4
  tx = gmt_optax.gradient_mask(ratio, selection="bisect", stacked_axes=STACKED, telemetry=True)
  params = grads_tree(rng)
  state = tx.init(params)
  update = jax.jit(tx.update)
  positions = sampled_positions(params, state.rng_key)
  row_positions = [
    p for (_, rows), p in zip(rows_of(params), positions) for _ in range(rows.shape[0])
  ]
  previous, ever, grads = None, None, params
  for step in range(3):
    grads = grads_tree(rng) if step != 1 else jax.tree.map(lambda g: g * 1.01, grads)
    _, state = update(grads, state)
    telemetry = jax.device_get(gmt_optax.mask_telemetry(state))
    expected = exact_statistics(grads, ratio)
    np.testing.assert_allclose(telemetry.kept_fraction, [e[0] for e in expected], rtol=1e-6)
    np.testing.assert_allclose(telemetry.threshold, [e[1] for e in expected], rtol=1e-6)
    np.testing.assert_allclose(telemetry.kept_energy, [e[2] for e in expected], rtol=1e-5)
    # Stability and coverage: exact on the fixed sample.
    sample = np.stack([e[3][p] for e, p in zip(expected, row_positions)])
    np.testing.assert_array_equal(state.sample_kept, sample)
    if previous is None:
      assert np.isnan(telemetry.jaccard).all()  # no previous mask
      ever = sample
    else:
      jaccard = (previous & sample).sum(1) / (previous | sample).sum(1)
      np.testing.assert_allclose(telemetry.jaccard, jaccard, rtol=1e-6)
      ever = ever | sample
    np.testing.assert_allclose(telemetry.coverage, ever.mean(1), rtol=1e-6)
    previous = sample
  # Step 1 scaled step 0's gradient: the same mask.
  np.testing.assert_array_equal(telemetry.leaf, [0] + [1] * 3 + [2] * 3)
  np.testing.assert_array_equal(telemetry.layer, [-1, 0, 1, 2, 0, 1, 2])


def test_a_repeated_gradient_has_jaccard_one_and_by_tensor_names_rows():
  rng = np.random.default_rng(1)
  grads = grads_tree(rng)
  # Exact thresholds: a sampled one would be drawn anew, and move the mask.
  tx = gmt_optax.gradient_mask(0.5, selection="bisect", stacked_axes=STACKED, telemetry=True)
  state = tx.init(grads)
  for _ in range(2):
    _, state = jax.jit(tx.update)(grads, state)
  named = gmt_optax.mask_telemetry(state).by_tensor(grads)
  assert set(named) == {"embed", "layers/norm", "layers/w"}
  assert named["embed"]["jaccard"] == 1.0  # an unstacked leaf: plain floats
  assert named["layers/w"]["jaccard"] == [1.0, 1.0, 1.0]  # one value per layer
  assert set(named["layers/w"]) == set(_telemetry.TELEMETRY_STATISTICS)


def test_sample_estimates_are_close_to_the_full_tensor_values():
  rng = np.random.default_rng(2)
  shape = (512, 384)
  base = rng.standard_normal(shape).astype(np.float32)
  tx = gmt_optax.gradient_mask(0.6, selection="bisect", telemetry=True)
  state = tx.init(jnp.zeros(shape))
  masks = []
  for _ in range(4):  # correlated gradients: partly stable masks
    g = base + 0.8 * rng.standard_normal(shape).astype(np.float32)
    updates, state = jax.jit(tx.update)(jnp.asarray(g), state)
    masks.append(np.asarray(updates) != 0)
    telemetry = gmt_optax.mask_telemetry(state)
    if len(masks) > 1:
      full = (masks[-1] & masks[-2]).sum() / (masks[-1] | masks[-2]).sum()
      # 1024 samples: the ratio's standard error is about 0.015.
      assert float(telemetry.jaccard[0]) == pytest.approx(full, abs=0.05)
    coverage = np.logical_or.reduce(masks).mean()
    assert float(telemetry.coverage[0]) == pytest.approx(coverage, abs=0.05)


def test_nothing_masked_keeps_everything():
  grads = grads_tree(np.random.default_rng(3))
  tx = gmt_optax.gradient_mask(0.0, stacked_axes=STACKED, telemetry=True)
  state = tx.init(grads)
  for _ in range(2):
    _, state = tx.update(grads, state)
  telemetry = gmt_optax.mask_telemetry(state)
  for name in ("kept_fraction", "kept_energy", "jaccard", "coverage"):
    np.testing.assert_array_equal(getattr(telemetry, name), 1.0)
  np.testing.assert_array_equal(telemetry.threshold, 0.0)


def test_telemetry_off_leaves_the_state_and_the_program_as_they_were():
  grads = grads_tree(np.random.default_rng(4))
  off = gmt_optax.gradient_mask(0.5, stacked_axes=STACKED)
  state = off.init(grads)
  assert type(state) is gmt_optax.GradientMaskState
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == gmt_optax.GradientMaskState(
    ((), jnp.int32), ((2,), jnp.uint32), ((), jnp.float32)
  )
  assert gmt_optax.mask_telemetry(state) is None
  explicit = gmt_optax.gradient_mask(0.5, stacked_axes=STACKED, telemetry=False)
  lower = lambda tx: jax.jit(tx.update).lower(grads, tx.init(grads)).as_text()
  assert lower(explicit) == lower(off)
  on = gmt_optax.gradient_mask(0.5, stacked_axes=STACKED, telemetry=True)
  assert lower(on) != lower(off)  # the comparison can fail


def test_state_shape_dtype_and_sharding_are_stable_across_jitted_updates():
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  rng = np.random.default_rng(5)
  specs = {"embed": P("fsdp"), "layers": {"w": P(None, None, "fsdp"), "norm": P()}}
  shard = lambda tree: jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
  )
  tx = optax.chain(
    gmt_optax.gradient_mask(0.5, stacked_axes=STACKED, sample_size=256, telemetry=True),
    optax.adam(1e-3),
  )
  params = shard(grads_tree(rng))
  state = tx.init(params)
  describe = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding.spec), s[0])
  first = describe(state)
  assert {x.sharding.spec for x in jax.tree.leaves(state[0])} == {P()}  # replicated
  step = jax.jit(tx.update)
  for _ in range(3):
    _, state = step(shard(grads_tree(rng)), state, params)
    assert describe(state) == first


def test_jit_sharded_equals_unsharded_without_all_gather():
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AUTO, AUTO))
  rng = np.random.default_rng(6)
  grads = {"big": jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), **grads_tree(rng)}
  specs = {
    "big": P("fsdp", "tensor"),
    "embed": P("fsdp", None),
    "layers": {"w": P(None, "fsdp", "tensor"), "norm": P(None, "tensor")},
  }
  stacked = {"big": 0, **STACKED}
  tx = gmt_optax.gradient_mask(0.5, stacked_axes=stacked, sample_size=1024, telemetry=True)
  expected = gmt_optax.mask_telemetry(jax.jit(tx.update)(grads, tx.init(grads))[1])
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), grads, specs)
  state = tx.init(sharded)
  telemetry = gmt_optax.mask_telemetry(jax.jit(tx.update)(sharded, state)[1])
  for name in ("kept_fraction", "threshold", "kept_energy", "coverage"):
    np.testing.assert_allclose(
      getattr(telemetry, name), getattr(expected, name), rtol=1e-5, err_msg=name
    )
  hlo = jax.jit(tx.update).lower(sharded, state).compile().as_text()
  assert collectives_and_sorts(hlo) == []


def test_shard_map_with_axis_name_equals_the_whole_tensor():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AUTO,))
  rng = np.random.default_rng(7)
  grads = {"w": jnp.asarray(rng.standard_normal((3, 64, 48)), jnp.float32)}
  options = dict(selection="bisect", stacked_axes=1, telemetry=True)
  whole = gmt_optax.gradient_mask(0.5, **options)
  local = gmt_optax.gradient_mask(0.5, axis_name="x", **options)
  specs = {"w": P(None, "x")}
  update = jax.jit(
    jax.shard_map(local.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
  )
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), grads, specs)
  state, expected_state = local.init(grads), whole.init(grads)
  masks = []
  for step in range(3):
    g = (
      grads
      if step != 2
      else jax.tree.map(lambda x: x + 0.5 * jnp.asarray(rng.standard_normal(x.shape)), grads)
    )
    updates, state = update(
      jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), g, sharded), state
    )
    _, expected_state = jax.jit(whole.update)(g, expected_state)
    masks.append(np.asarray(updates["w"]) != 0)
  telemetry, expected = gmt_optax.mask_telemetry(state), gmt_optax.mask_telemetry(expected_state)
  for name in ("kept_fraction", "threshold", "kept_energy"):
    np.testing.assert_allclose(
      getattr(telemetry, name), getattr(expected, name), rtol=1e-5, err_msg=name
    )
  # The shards' samples (128 entries each) make one sample of the whole tensor.
  full = [(a & b).sum() / (a | b).sum() for a, b in zip(masks[2], masks[1])]
  np.testing.assert_allclose(telemetry.jaccard, full, atol=0.06)
  np.testing.assert_allclose(
    telemetry.coverage, np.logical_or.reduce(masks).mean((1, 2)), atol=0.06
  )
  hlo = update.lower(sharded, state).compile().as_text()
  assert collectives_and_sorts(hlo) == []


def test_gmt_passes_telemetry_through_accumulation_and_mask_updates():
  grads = grads_tree(np.random.default_rng(8))
  for options in (dict(accumulation_steps=2), dict(mask_updates=True)):
    tx = gmt_optax.gmt(optax.adamw(1e-3), 0.5, stacked_axes=STACKED, telemetry=True, **options)
    state = tx.init(grads)
    for _ in range(2):
      _, state = jax.jit(tx.update)(grads, state, grads)
    telemetry = gmt_optax.mask_telemetry(state)
    assert telemetry.kept_energy.shape == (7,)
    assert float(gmt_optax.kept_fraction(state)) == pytest.approx(0.5, abs=0.01)
    assert (telemetry.coverage > 0).all()


def test_tree_map_params_maps_the_telemetry_state_like_counters():
  grads = grads_tree(np.random.default_rng(9))
  tx = gmt_optax.gmt(optax.adamw(1e-3), 0.5, stacked_axes=lambda p: STACKED, telemetry=True)
  state = tx.init(grads)
  mapped = optax.tree_map_params(
    tx, lambda p: "param", state, transform_non_params=lambda _: "other"
  )
  assert set(jax.tree.leaves(gmt_optax.mask_telemetry(mapped))) == {"other"}


def test_telemetry_must_be_a_bool_and_is_static_under_inject_hyperparams():
  with pytest.raises(ValueError, match="telemetry must be a Python bool, got 1"):
    gmt_optax.gradient_mask(0.5, telemetry=1)
  # inject_hyperparams keeps a bool static.
  injected = optax.inject_hyperparams(gmt_optax.gradient_mask)(mask_ratio=0.5, telemetry=True)
  grads = grads_tree(np.random.default_rng(10))
  _, state = jax.jit(injected.update)(grads, injected.init(grads))
  assert gmt_optax.mask_telemetry(state).kept_fraction.shape == (3,)


@pytest.fixture(scope="module")
def telemetry_run(tmp_path_factory):
  """A tiny GMT training (3 steps) with `optimizer.telemetry: true`: its output directory."""
  import train
  from tests.test_train import TINY

  out = tmp_path_factory.mktemp("telemetry") / "run"
  train.run(
    {
      **TINY,
      "train": {**TINY["train"], "steps": 3, "output_dir": str(out)},
      "optimizer": {**TINY["optimizer"], "method": "gmt", "telemetry": True},
    }
  )
  return out


def test_the_trainer_logs_per_layer_telemetry_to_jsonl_and_tensorboard(telemetry_run):
  from tests.test_tensorboard import _scalars

  records = [
    json.loads(line) for line in (telemetry_run / "train_log.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [1, 2, 3]
  down = [r["mask"]["layers/mlp/down_proj/kernel"] for r in records]
  # 2 layers
  assert all(len(d[name]) == 2 for d in down for name in _telemetry.TELEMETRY_STATISTICS)
  assert np.isnan(down[0]["jaccard"]).all() and np.isfinite(down[2]["jaccard"]).all()
  head = records[-1]["mask"]["lm_head/kernel"]  # an unstacked tensor: one value each
  assert isinstance(head["kept_energy"], float)
  for record in records:  # keeping the largest entries keeps at least their share of energy
    for statistics in record["mask"].values():
      assert np.all(
        np.asarray(statistics["kept_energy"]) >= np.asarray(statistics["kept_fraction"]) - 1e-6
      )

  tags = _scalars(telemetry_run / "tensorboard")  # {tag: {step: value}}
  for i, layer in enumerate(("layer_0", "layer_1")):
    kept_energy = tags[f"mask/kept_energy/layers/mlp/down_proj/kernel/{layer}"]
    assert sorted(kept_energy) == [1, 2, 3]
    for record in records:  # the same values as the JSONL log (TensorBoard keeps float32)
      logged = record["mask"]["layers/mlp/down_proj/kernel"]["kept_energy"][i]
      assert kept_energy[record["step"]] == pytest.approx(logged, rel=1e-6)
    assert sorted(tags[f"mask/coverage/layers/self_attn/q_proj/kernel/{layer}"]) == [1, 2, 3]
    jaccard = tags[f"mask/jaccard/layers/mlp/down_proj/kernel/{layer}"]
    assert sorted(jaccard) == [2, 3]  # none before
  assert sorted(tags["mask/threshold/lm_head/kernel"]) == [1, 2, 3]
  assert sorted(tags["train/kept_fraction"]) == [1, 2, 3]


def test_the_study_report_plots_telemetry_and_skips_runs_without(telemetry_run, tmp_path):
  from train.study_report import plot_telemetry, telemetry_curves

  plain = tmp_path / "sft"
  plain.mkdir()
  (plain / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
  rows = [
    {"method": "gmt_0.5", "mask_ratio": "0.5", "run_dir": str(telemetry_run)},
    {"method": "sft", "mask_ratio": "", "run_dir": str(plain)},
  ]
  curves = telemetry_curves(rows)
  assert list(curves) == [0.5]
  records = [
    json.loads(line) for line in (telemetry_run / "train_log.jsonl").read_text().splitlines()
  ]
  energy = [
    np.mean(np.concatenate([np.atleast_1d(s["kept_energy"]) for s in r["mask"].values()]))
    for r in records
  ]
  steps, values = curves[0.5]["kept_energy"]
  np.testing.assert_array_equal(steps, [1, 2, 3])
  np.testing.assert_allclose(values, energy)
  assert list(curves[0.5]["jaccard"][0]) == [2, 3]  # the first update has no previous mask
  assert plot_telemetry(tmp_path / "mask_telemetry.png", rows)
  assert (tmp_path / "mask_telemetry.png").read_bytes()[:4] == b"\x89PNG"
  assert (
    not plot_telemetry(tmp_path / "none.png", rows[1:]) and not (tmp_path / "none.png").exists()
  )


def test_bad_uses_are_refused_with_what_and_where():
  from train.config import ConfigError, load_config

  with pytest.raises(ConfigError, match="optimizer.method=sft has no such mask"):
    load_config("configs/default.yaml", ["optimizer.method=sft", "optimizer.telemetry=true"])
  grads = grads_tree(np.random.default_rng(11))
  tx = gmt_optax.gradient_mask(0.5, telemetry=True)
  with pytest.raises(ValueError, match="the updates have 3 masked rows, the state 1"):
    tx.update(grads, tx.init(grads["embed"]))
  mesh = jax.make_mesh((3,), ("x",), axis_types=(AUTO,), devices=jax.devices()[:3])
  local = gmt_optax.gradient_mask(0.5, axis_name="x", telemetry=True)
  update = jax.shard_map(local.update, mesh=mesh, in_specs=(P("x"), P()), out_specs=(P("x"), P()))
  w = jnp.ones((6, 4))
  with pytest.raises(ValueError, match="1024 entries per row, which 3 shards of axis 'x'"):
    jax.jit(update)(w, local.init(w))

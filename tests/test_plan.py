"""train.plan: the real XLA TPU compiler on this CPU (libtpu, no TPU), and local devices."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from train import plan
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("libtpu", reason="libtpu (in the test extra) compiles for TPU topologies")

SMALL = {
  "model": {
    "path": None,
    "dtype": "bfloat16",
    "remat": True,
    "hf_config": {
      "model_type": "llama",
      "vocab_size": 8192,
      "hidden_size": 512,
      "intermediate_size": 1536,
      "num_hidden_layers": 2,
      "num_attention_heads": 8,
      "num_key_value_heads": 4,
    },
  },
  "data": {"max_length": 256},
  "train": {"steps": 10, "batch_size": 8, "micro_batch_size": 8},
}


def _plan(config, overrides, topology):
  devices = plan.topology_devices(topology)
  return plan.plan(
    load_config(config, overrides), devices, plan.HBM_BYTES.get(devices[0].device_kind)
  )


def test_per_chip_memory_shrinks_as_fsdp_grows():
  # (fsdp=2 measured 61 MB of temporaries against 56 MB at fsdp=1: XLA picks another
  # layout there, while the total still halves.)
  reports = [
    _plan(SMALL, [f"mesh.data={8 // fsdp}", f"mesh.fsdp={fsdp}"], "v5e:2x4") for fsdp in (1, 4, 8)
  ]
  temporaries = [r["breakdown_bytes"]["temporaries"] for r in reports]
  totals = [r["per_device_bytes"] for r in reports]
  state = [r["breakdown_bytes"]["optimizer_state"] for r in reports]
  assert temporaries[0] > temporaries[1] > temporaries[2], temporaries
  assert totals[0] > totals[1] > totals[2], totals
  # AdamW moments shard with their parameters; a few replicated scalars do not.
  assert state[0] / state[1] == pytest.approx(4, rel=1e-2)
  assert state[0] / state[2] == pytest.approx(8, rel=1e-2)
  assert all(r["fits"] and r["devices"] == 8 for r in reports)


def test_llama3_8b_recipe_fits_v5p_and_gmt_costs_what_sft_costs():
  recipe = ROOT / "configs" / "llama3_8b_metamath_v5p-128.yaml"
  gmt = _plan(recipe, [], "v5p:4x4x4")
  sft = _plan(recipe, ["optimizer.method=sft"], "v5p:4x4x4")
  assert gmt["fits"] and gmt["hbm_fraction"] <= 0.6, gmt["hbm_fraction"]
  assert gmt["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  # The mask adds no gradient-sized all-gather, all-to-all or sort: at most a count or
  # sample vector (well under the 16 MiB of the smallest masked gradient, k_proj).
  for kind in ("all-gather", "all-to-all", "sort"):
    extra = gmt["collectives"].get(kind, {}).get("bytes", 0) - sft["collectives"].get(kind, {}).get(
      "bytes", 0
    )
    assert extra < 2**20, (kind, gmt["collectives"], sft["collectives"])
  assert abs(gmt["flops_per_step"] / sft["flops_per_step"] - 1) < 0.05
  # GMT as shipped (telemetry on) costs what SFT costs: its modeled step (train.plan's
  # roofline, loop trips counted) measured 1.0022x SFT's (docs/benchmarks.md, "GMT against SFT").
  ratio = gmt["step_model"]["step_s"] / sft["step_model"]["step_s"]
  assert 1 <= ratio <= 1.02, ratio
  assert gmt["per_device_bytes"] <= 1.05 * sft["per_device_bytes"]


def test_accumulating_micro_steps_costs_gradient_buffers_not_a_held_head():
  """Two micro-steps of rows against one: the scan adds gradient-sized buffers (the sum,
  the micro-step's gradient and the loop's copy of the sum) and nothing that lives through
  it besides. Left to itself, XLA hoists the parameters' bfloat16 casts and the gathered LM
  head out of the scan and schedules the chunked loss's forward scan after the backward
  pass, holding the head through both (libtpu 0.0.42: 4.8 gradient shards more, against
  3.3 with the parameters tied to the micro-batch and the log-sum-exp saved)."""
  long_rows = [
    "model.remat=full",
    "model.loss_chunk_tokens=512",
    "model.hf_config.vocab_size=32768",
    "data.max_length=2048",
    "mesh.data=1",
    "mesh.fsdp=8",
    "optimizer.method=sft",
  ]
  one, two = (_plan(SMALL, [*long_rows, f"train.batch_size={rows}"], "v5e:2x4") for rows in (8, 16))
  extra = two["breakdown_bytes"]["temporaries"] - one["breakdown_bytes"]["temporaries"]
  gradient = one["breakdown_bytes"]["gradients"]
  assert extra < 4 * gradient, extra / gradient


def test_cli_json_and_exit_codes(tmp_path):
  config = tmp_path / "small.yaml"
  config.write_text(json.dumps(SMALL))
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.plan",
      "--config",
      str(config),
      "--topology",
      "v5e:2x2",
      "--json",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert run.returncode == 0, run.stderr
  report = json.loads(run.stdout)
  assert report["fits"] and report["mesh"]["data"] == 4  # data=-1 filled the 4 chips
  for key in ("per_device_bytes", "hbm_bytes", "flops_per_step", "collectives"):
    assert key in report
  model = report["step_model"]
  assert {
    "step_s",
    "tokens_per_s_per_chip",
    "mfu",
    "flops_per_step",
    "hbm_bytes_per_step",
    "collective_s",
    "exposed_collective_s",
  } <= set(model)
  assert model["chip"] == "v5e" and model["step_s"] > 0
  assert model["tokens_per_s_per_chip"] == pytest.approx(8 * 256 / 4 / model["step_s"])
  assert set(report["collectives"]) <= set(plan.COLLECTIVES) | {"sort"}
  assert all(set(v) == {"count", "bytes", "bytes_per_step"} for v in report["collectives"].values())

  odd = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.plan",
      "--config",
      str(config),
      "--topology",
      "v5e:2x2",
      "train.micro_batch_size=6",
      "train.batch_size=6",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert odd.returncode == 2 and "micro_batch_size=6" in odd.stderr and "= 4" in odd.stderr

  too_big = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.plan",
      "--config",
      str(config),
      "--topology",
      "v5e:2x2",
      "data.max_length=8192",
      "model.loss_chunk_tokens=0",
      "train.batch_size=64",
      "train.micro_batch_size=64",
      "model.remat=false",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert too_big.returncode == 1, too_big.stderr[-2000:]
  assert "micro_batch_size" in too_big.stderr and "remat" in too_big.stderr


def test_local_plan_on_cpu_devices():
  import jax

  devices = jax.device_count()
  report = plan.plan(load_config(SMALL, ["mesh.fsdp=-1", "mesh.data=1"]), jax.devices(), None)
  assert report["fits"] and report["mesh"]["fsdp"] == devices
  # float32 weights and two AdamW moments, each 1/8 per chip (up to uneven shards' padding).
  breakdown = report["breakdown_bytes"]
  assert breakdown["parameters"] == pytest.approx(report["num_params"] * 4 / devices, rel=0.01)
  assert breakdown["optimizer_state"] == pytest.approx(2 * breakdown["parameters"], rel=0.01)
  # Every layer's trip counted: the chips' FLOPs come to the model's 6N-per-token count (less
  # the embedding lookup, which is not a product), which the scanned layers' body counted once
  # would miss.
  ratio = report["flops_per_step"] * devices / report["model_flops_per_step"]
  assert 0.75 < ratio < 1.05, ratio


def _vs_maxtext():
  spec = importlib.util.spec_from_file_location("vs_maxtext", ROOT / "benchmarks" / "vs_maxtext.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_vs_maxtext_names_the_slice_as_maxtext_does_and_prints_one_table():
  vs = _vs_maxtext()
  # MaxText counts TensorCores: a v5p chip has two, a v5e chip one.
  assert vs.maxtext_topology("v5p:4x4x4") == "v5p-128"
  assert vs.maxtext_topology("v5e:16x16") == "v5e-256"
  with pytest.raises(ValueError, match="v7x:2x2"):
    vs.maxtext_topology("v7x:2x2")
  side = {
    "per_device_bytes": 5e9,
    "arguments": 1.5e9,
    "temporaries": 3.5e9,
    "flops": 1e12,
    "hbm_bytes": 2e10,
    "step_model": {"step_s": 0.5, "tokens_per_s_per_chip": 4096.0, "exposed_collective_s": 0.01},
    "collectives": {
      "all-gather": {"count": 16, "bytes": 2e9, "bytes_per_step": 6e9},
      "sort": {"count": 1, "bytes": 8, "bytes_per_step": 8},
    },
    "compile_s": 70.0,
  }
  table = vs.table({"maxtext": [side, {**side, "compile_s": 80.0}], "sft": [side, side]})
  assert "| per chip | MaxText | ours, sft |" in table
  assert "| all-gather: count (bytes) | 16 (2.00 GB) | 16 (2.00 GB) |" in table
  assert (
    "| collective bytes, GB (each op once) | 2.00 | 2.00 |" in table
  )  # sorts are not collectives
  assert "| collective bytes per step, GB (loop bodies times their trips) | 6.00 | 6.00 |" in table
  assert "70.0 / 75.0 / 80.0" in table
  assert "| modeled step, s (train.plan.step_model) | 0.500 | 0.500 |" in table
  assert "| modeled tokens/s per chip | 4,096 | 4,096 |" in table
  misfit = vs.table({"maxtext": [{"error": "RESOURCE_EXHAUSTED: 9 GiB over"}], "sft": [side]})
  assert "| per chip | ours, sft |" in misfit
  assert misfit.endswith("MaxText: does not fit: RESOURCE_EXHAUSTED: 9 GiB over")


def test_vs_maxtext_divides_maxtexts_mfu_by_our_model_flops():
  """Both sides' MFU divide the same work: Llama-3-8B's 8,030,261,248 parameters, 6N per
  token plus causal attention, over the chip's 2048 tokens (v5e-256, 1 row per chip)."""
  from train.config import load_config

  config = load_config(str(ROOT / "configs" / "llama3_8b_metamath_v5e-256.yaml"))
  expected = 2048 * (6 * 8_030_261_248 + 6 * 32 * 2048 * 4096)
  assert _vs_maxtext().model_flops_per_chip(config, "v5e:16x16") == expected


def test_vs_maxtext_names_each_sides_fastest_policy_that_fits():
  """Over several remat policies: the shortest modeled step among the steps that leave the
  sweep's headroom of HBM free; a step that does not compile is a line, not a column."""
  vs = _vs_maxtext()

  def run(gb, step_s):
    return [
      {
        "per_device_bytes": gb * 1e9,
        "step_model": {"step_s": step_s, "tokens_per_s_per_chip": 2048 / step_s, "mfu": 0.4},
      }
    ]

  by_policy = {
    "full": {"maxtext": run(20, 1.2), "sft": run(19, 1.2)},
    "save_dot_except_mlp": {"maxtext": run(60, 1.0), "sft": run(90, 0.9)},  # 90 GB: no room
    "minimal": {
      "maxtext": [{"error": "RESOURCE_EXHAUSTED: Ran out of memory"}],
      "sft": run(50, 1.1),
    },
  }
  choice = vs.fastest(by_policy, hbm_bytes=100e9)
  assert choice == {"maxtext": "save_dot_except_mlp", "sft": "minimal"}
  table = vs.fastest_table(by_policy, choice)
  assert "| MaxText | save_dot_except_mlp | 60.00 | 1.000 | 2,048 | 40.0% |" in table
  assert "| ours, sft | minimal | 50.00 | 1.100 | 1,862 | 40.0% |" in table
  assert vs.fastest({"full": {"sft": [{"error": "RESOURCE_EXHAUSTED"}]}}, 100e9) == {"sft": None}


def test_vs_maxtext_gives_maxtext_our_mesh_and_rows_per_chip(monkeypatch, tmp_path):
  """MaxText compiles the recipe's mesh; with tensor parallelism a chip holds a fraction of
  a row (70B: 64 rows over 512 chips)."""
  import types

  from train.config import load_config

  monkeypatch.setitem(
    sys.modules, "maxtext", types.SimpleNamespace(__file__=str(tmp_path / "__init__.py"))
  )
  vs = _vs_maxtext()
  config = load_config(str(ROOT / "configs" / "llama3_70b_metamath_v5p-1024.yaml"))
  argv = vs.maxtext_argv(config, "v5p:8x8x8", "llama3-70b", None, str(tmp_path))
  for expected in (
    "compile_topology=v5p-1024",
    "per_device_batch_size=0.125",
    "ici_data_parallelism=1",
    "ici_fsdp_parallelism=64",
    "ici_tensor_parallelism=8",
    "gradient_accumulation_steps=2",
  ):
    assert expected in argv
  bad = load_config(
    str(ROOT / "configs" / "llama3_70b_metamath_v5p-1024.yaml"),
    ["train.micro_batch_size=32", "train.batch_size=64"],
  )
  with pytest.raises(
    ValueError, match="micro_batch_size=32 does not divide over mesh data x fsdp = 64"
  ):
    vs.maxtext_argv(bad, "v5p:8x8x8", "llama3-70b", None, str(tmp_path))


def test_collectives_per_step_count_loop_bodies_times_their_trips():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  def summed(x):
    def body(carry, _):  # one all-reduce of 4 float32 per trip
      return carry + jax.lax.psum(carry, "x"), None

    x = jax.lax.psum(x, "x")  # and one outside the loop
    return jax.lax.scan(body, x, length=5)[0]

  x = jax.ShapeDtypeStruct((32,), jnp.float32, sharding=jax.NamedSharding(mesh, P("x")))
  found = plan.collectives(summed.lower(x).compile().as_text())
  assert found["all-reduce"]["count"] == 2 and found["all-reduce"]["bytes"] == 2 * 16
  assert found["all-reduce"]["bytes_per_step"] == 16 + 5 * 16


def test_slices_compile_as_provisioned():
  # v4/v5p: one megacore device per chip, a torus when every side is a multiple of 4;
  # v5e/v6e: a side of 16 chips wraps around.
  assert plan.slice_links("v5p:4x4x4") == {"chip_config_name": "megacore", "wrap": (True,) * 3}
  assert plan.slice_links("v5p:2x4x4")["wrap"] == (False,) * 3
  assert plan.slice_links("v5e:8x16") == {
    "chip_config_name": "default",
    "wrap": (False, True, False),
  }
  # One chip (a Colab TPU) is a host of its own, not a part of libtpu's default 2x2 one.
  assert plan.slice_links("v5e:1x1")["chips_per_host_bounds"] == (1, 1, 1)
  assert len(plan.topology_devices("v5e:1x1")) == 1
  with pytest.raises(ValueError, match="v5p:4xx4"):
    plan.slice_links("v5p:4xx4")


def test_two_slices_add_a_dcn_gradient_reduction_and_keep_memory():
  """mesh.slices=2 (train.plan --slices): the data axis crosses the data-center network; only
  the gradient's reduction goes over it, and a chip holds at most one more gradient shard
  (the DCN all-reduce's buffer) than on one slice with the same rows per chip."""
  per_slice = ["mesh.data=1", "mesh.fsdp=-1"]
  one = _plan(SMALL, per_slice + ["train.micro_batch_size=4", "train.batch_size=4"], "v5p:2x2x1")
  devices = plan.topology_devices("v5p:2x2x1", slices=2)
  two = plan.plan(
    load_config(
      SMALL, per_slice + ["mesh.slices=2", "train.micro_batch_size=8", "train.batch_size=8"]
    ),
    devices,
    plan.HBM_BYTES[devices[0].device_kind],
    eval_step=False,
  )
  assert one["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert two["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  gradient_shard = two["breakdown_bytes"]["gradients"]
  assert two["per_device_bytes"] <= one["per_device_bytes"] + 1.1 * gradient_shard
  assert one["step_model"]["dcn_bytes_per_step"] == 0
  dcn = two["step_model"]["dcn_bytes_per_step"]
  # What crosses is of the gradient shard's size (libtpu 0.0.42 sends 7.9 MB of a 14.7 MB
  # float32 shard), not of the weights' gathers or the activations.
  assert 0.4 * gradient_shard <= dcn <= 1.2 * gradient_shard, (dcn, gradient_shard)
  assert two["step_model"]["step_s"] > one["step_model"]["step_s"]

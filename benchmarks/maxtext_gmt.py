"""MaxText's own train step with GMT as its optimizer, compiled ahead of time for a TPU slice.

MaxText's pre-training, SFT and DPO trainers all build their optimizer with
`maxtext.optimizers.optimizers.get_optimizer(config, learning_rate_schedule, ...)`, and its train
step accumulates `gradient_accumulation_steps` micro-batches before it calls the optimizer once.
So the whole change that makes MaxText train with GMT is to wrap what that function returns:

    tx = gmt_optax.gmt(tx, mask_ratio)

This script applies that wrap (`--optimizer gmt`) or not (`--optimizer adamw`, MaxText as
shipped), runs MaxText's unchanged `train_compile` on this host for the slice named by
`compile_topology`, and prints one line `MAXTEXT_GMT {...}`: the compiled step's per-chip bytes
(arguments + outputs - aliased + temporaries), arguments, temporaries, program size, compiler
FLOPs (while-loop bodies counted once), compile seconds and collectives by kind, counted with
`train.plan.collectives` as `python -m train.plan` counts its own step.

Needs Python >= 3.12 with `maxtext[tpu]` (jax >= 0.11.1, libtpu) and this project importable;
one compile of the Llama-3-8B step takes minutes and several GiB of host memory:

  JAX_PLATFORMS=cpu python benchmarks/maxtext_gmt.py --optimizer gmt -- \\
    compile_topology=v5p-128 compile_topology_num_slices=1 model_name=llama3-8b \\
    per_device_batch_size=1 max_target_length=2048 gradient_accumulation_steps=2 \\
    base_output_directory=/tmp/maxtext_gmt run_name=gmt dataset_type=synthetic \\
    enable_checkpointing=false
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import maxtext
from maxtext.optimizers import optimizers
from maxtext.trainers.pre_train import train_compile

import gmt_optax
from train.plan import collectives


def use_gmt(mask_ratio: float, **gradient_mask_options) -> None:
  """Makes every MaxText trainer in this process build GMT around its configured optimizer."""
  build_optimizer = optimizers.get_optimizer

  def get_optimizer(config, learning_rate_schedule, *args, **kwargs):
    tx = build_optimizer(config, learning_rate_schedule, *args, **kwargs)
    return gmt_optax.gmt(tx, mask_ratio, **gradient_mask_options)

  optimizers.get_optimizer = get_optimizer


def compile_train_step(maxtext_args: list[str]) -> dict:
  """Runs MaxText's `train_compile` with `maxtext_args`; returns the compiled step's figures."""
  compiled_steps = []
  jit_and_compile = train_compile.jit_and_compile

  def keep_compiled(*args, **kwargs):
    start = time.perf_counter()
    compiled = jit_and_compile(*args, **kwargs)
    compiled_steps.append((compiled, time.perf_counter() - start))
    return compiled

  train_compile.jit_and_compile = keep_compiled
  base_config = pathlib.Path(maxtext.__file__).parent / "configs" / "base.yml"
  train_compile.main(["train_compile", str(base_config), *maxtext_args])
  (compiled, compile_s), *_ = compiled_steps
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    "per_chip_bytes": memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes,
    "argument_bytes": memory.argument_size_in_bytes,
    "temporary_bytes": memory.temp_size_in_bytes,
    "program_bytes": memory.generated_code_size_in_bytes,
    "flops": cost.get("flops"),
    "compile_s": round(compile_s, 1),
    "collectives": collectives(compiled.as_text()),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--optimizer", choices=("adamw", "gmt"), required=True)
  parser.add_argument("--mask-ratio", type=float, default=0.5)
  parser.add_argument("maxtext_args", nargs="*", help="MaxText key=value overrides (after --)")
  args = parser.parse_args(argv)
  if args.optimizer == "gmt":
    use_gmt(args.mask_ratio)
  figures = compile_train_step(args.maxtext_args)
  print("MAXTEXT_GMT " + json.dumps({"optimizer": args.optimizer, **figures}), flush=True)


if __name__ == "__main__":
  main()

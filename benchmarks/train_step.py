"""Seconds per optimizer step of the training step, sft vs gmt, same process.

    python benchmarks/train_step.py [--config configs/default.yaml] [--steps 5] [key=value ...]

Sets up each method's run exactly as `python -m train` does (`train.run_setup`: one
model and one data preparation shared by all methods), compiles the jitted step of each method (compile time reported
separately), then times `--steps` updates after one warm-up, the methods taking
turns on the same batches. Prints a Markdown table: compile
s, s/step min / median / max, tokens/s at the median (non-padding tokens),
ratio of the medians to sft, and the peak RSS of the process. A method
`gmt+telemetry` is GMT with `optimizer.telemetry=true` (mask telemetry).
"""

import argparse
import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.config import load_config
from train.metrics import host_description
from train.run_setup import setup_run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/default.yaml")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--methods", default="sft,gmt")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = load_config(args.config, args.overrides)
  config = dataclasses.replace(
    config, train=dataclasses.replace(config.train, steps=args.steps + 1)
  )

  # Build and compile every method first, then interleave their timed steps
  # (round-robin), so that load from other processes hits all methods alike.
  methods, compile_s, states, steps, cache = args.methods.split(","), {}, {}, {}, {}
  for method in methods:
    name, _, option = method.partition("+")
    opt = dataclasses.replace(config.optimizer, method=name, telemetry=option == "telemetry")
    run = setup_run(dataclasses.replace(config, optimizer=opt), cache)  # params: its own copy
    params = run.model.params
    opt_state = jax.jit(run.steps.tx.init, out_shardings=run.steps.shardings["opt_state"])(params)
    batch = run.batches.global_batch(0, run.steps.shardings["batch"])
    tick = time.perf_counter()
    steps[method] = run.steps.train.lower(params, opt_state, batch, jnp.int32(0)).compile()
    compile_s[method] = time.perf_counter() - tick
    states[method] = (params, opt_state)
  t = config.train
  print(
    f"{jax.device_count()} {jax.devices()[0].platform} device(s); batch {t.batch_size} rows "
    f"x {config.data.max_length} tokens, micro-batch {t.micro_batch_size}"
  )
  times = {m: [] for m in methods}
  tokens = []
  for step in range(args.steps + 1):
    batch = run.batches.global_batch(step, run.steps.shardings["batch"])
    tokens.append(run.batches.tokens(step))
    for method in methods:
      tick = time.perf_counter()
      p, opt_state, metrics = steps[method](*states[method], batch, jnp.int32(step))
      jax.block_until_ready(metrics)
      times[method].append(time.perf_counter() - tick)
      states[method] = (p, opt_state)
  timed = {m: np.array(t[1:]) for m, t in times.items()}  # the first step is a warm-up
  sft = np.median(timed["sft"]) if "sft" in timed else None
  print(f"\nCPU: {host_description()}; {args.steps} timed steps per method")
  print("\n| method | compile s | s/step min / median / max | tokens/s | ratio to sft |")
  print("| --- | --- | --- | --- | --- |")
  for method, t in timed.items():
    median = np.median(t)
    ratio = f"{median / sft:.3f}" if sft else "-"
    print(
      f"| {method} | {compile_s[method]:.1f} | {t.min():.3f} / {median:.3f} / {t.max():.3f} | "
      f"{np.mean(tokens[1:]) / median:.0f} | {ratio} |"
    )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"\npeak RSS {peak:.2f} GiB")


if __name__ == "__main__":
  main()

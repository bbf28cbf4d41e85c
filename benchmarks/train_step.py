"""Seconds per optimizer step of the training step, sft vs gmt, same process.

    python benchmarks/train_step.py [--config configs/default.yaml] [--steps 5] [key=value ...]

Loads the config's model and data exactly as `python -m train` does, then for
each method builds the jitted step (compile time reported separately) and
times `--steps` updates after one warm-up. Prints a Markdown table: compile
s, median s/step, tokens/s (non-padding tokens), ratio to sft, and the peak
RSS of the process.
"""

import argparse
import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.config import load_config
from train.data import Batches, prepare
from train.loop import _global_batch, load_model
from train.step import (batch_sharding, build_optimizer, make_mesh, make_train_step,
                        opt_state_shardings)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", default="sft,gmt")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    mesh = make_mesh(config.mesh)
    graphdef, params, rest, p_shardings, tokenizer = load_model(config, mesh)
    train_rows, _, _, _ = prepare(config.data, tokenizer)
    t = config.train
    batches = Batches(train_rows, t.batch_size, t.micro_batch_size, config.data.shuffle_seed)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); batch {t.batch_size} rows "
          f"x {config.data.max_length} tokens, micro-batch {t.micro_batch_size}")

    rows = []
    for method in args.methods.split(","):
        opt = dataclasses.replace(config.optimizer, method=method)
        tx, schedule = build_optimizer(opt, args.steps + 1)
        o_shardings = opt_state_shardings(tx, params, p_shardings, mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_shardings)(params)
        shardings = {"params": p_shardings, "opt_state": o_shardings, "batch": batch_sharding(mesh)}
        step_fn = make_train_step(graphdef, rest, tx, schedule, shardings, mesh)
        # Donation consumes params: benchmark on a copy so every method starts the same.
        p = jax.tree.map(jnp.copy, params)
        tick = time.perf_counter()
        compiled = step_fn.lower(p, opt_state, _global_batch(batches, 0, shardings["batch"]),
                                 jnp.int32(0)).compile()
        compile_s = time.perf_counter() - tick
        times, tokens = [], []
        for step in range(args.steps + 1):
            batch = _global_batch(batches, step, shardings["batch"])
            tick = time.perf_counter()
            p, opt_state, metrics = compiled(p, opt_state, batch, jnp.int32(step))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - tick)
            tokens.append(int((train_rows["segment_ids"][batches.row_ids(step)] > 0).sum()))
        seconds = float(np.median(times[1:]))
        rows.append((method, compile_s, seconds, float(np.mean(tokens[1:])) / seconds))
        del p, opt_state
    sft = dict((r[0], r[2]) for r in rows).get("sft")
    print("\n| method | compile s | s/step (median) | tokens/s | ratio to sft |")
    print("| --- | --- | --- | --- | --- |")
    for method, compile_s, seconds, tps in rows:
        ratio = f"{seconds / sft:.3f}" if sft else "-"
        print(f"| {method} | {compile_s:.1f} | {seconds:.3f} | {tps:.0f} | {ratio} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()

"""Cost of gradient masking over plain AdamW, one jitted optimizer update.

Usage::

    python benchmarks/optimizer_step.py                 # SmolLM2-135M-shaped tree
    python benchmarks/optimizer_step.py --model 1b --grad-dtype bfloat16  # GPU

Every row is timed in the same process on the same random parameter tree
(Llama-shaped leaves: embedding, per-layer q/k/v/o, gate/up/down, norms), and
timed alternately with its own ``adamw`` runs (``--repeats`` each), and
reported as min / median / max seconds and as the ratio of the medians.
The accumulation rows time 4 calls (4 micro-steps, one update).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import gmt_optax
from train.metrics import host_description

# (vocab, d_model, d_ff, layers, q heads, kv heads)
SHAPES = {
  "tiny": (4096, 128, 384, 2, 4, 2),
  "135m": (49152, 576, 1536, 30, 9, 3),
  "1b": (128256, 2048, 8192, 16, 32, 8),
}


def llama_tree(name: str, dtype) -> dict:
  vocab, d, ff, layers, heads, kv_heads = SHAPES[name]
  head_dim = d // heads
  shapes = {"embed": (vocab, d), "final_norm": (d,)}
  for i in range(layers):
    shapes |= {
      f"layer{i}/q": (d, heads * head_dim),
      f"layer{i}/k": (d, kv_heads * head_dim),
      f"layer{i}/v": (d, kv_heads * head_dim),
      f"layer{i}/o": (heads * head_dim, d),
      f"layer{i}/gate": (d, ff),
      f"layer{i}/up": (d, ff),
      f"layer{i}/down": (ff, d),
      f"layer{i}/attn_norm": (d,),
      f"layer{i}/mlp_norm": (d,),
    }
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
  return {
    name: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)
    for k, (name, shape) in zip(keys, shapes.items())
  }


def compiled_update(tx, params, grads, calls: int):
  """A closure running ``calls`` jitted update+apply steps, compiled."""

  # Donated like a training step donates them: without donation XLA copies
  # the optimizer state through the accumulation wrapper's lax.cond.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  carry = [jax.tree_util.tree_map(jnp.copy, params), tx.init(params)]
  carry[:] = jax.block_until_ready(step(*carry, grads))  # compile

  def run():
    for _ in range(calls):
      carry[:] = step(*carry, grads)
    jax.block_until_ready(carry)

  return run


def paired_times(baseline, run, repeats: int):
  """Seconds of each call of ``baseline`` and ``run``, timed alternately so that
  load on the machine hits both alike."""
  times = ([], [])
  for _ in range(repeats):
    for timed, f in zip(times, (baseline, run)):
      start = time.perf_counter()
      f()
      timed.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=SHAPES, default="135m")
  parser.add_argument("--grad-dtype", default="float32")
  parser.add_argument("--mask-ratio", type=float, default=0.5)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default="", help="time only the rows whose name contains this")
  parser.add_argument(
    "--skip-exact", action="store_true", help="skip the sort-based reference (slow on CPU)"
  )
  args = parser.parse_args()

  params = llama_tree(args.model, jnp.float32)
  grads = jax.tree_util.tree_map(lambda p: (p * 0.1).astype(args.grad_dtype), params)
  n = sum(p.size for p in jax.tree_util.tree_leaves(params))
  adamw = optax.adamw(1e-4)
  r = args.mask_ratio
  single = {"adamw": adamw}  # the baseline, popped below
  selections = ["auto", "sample", "bisect"] + ([] if args.skip_exact else ["exact"])
  for selection in selections:
    single[f"gradient_mask({selection}) + adamw"] = optax.chain(
      gmt_optax.gradient_mask(r, selection=selection), adamw
    )
  single["gradient_mask(sample, telemetry) + adamw"] = optax.chain(
    gmt_optax.gradient_mask(r, selection="sample", telemetry=True), adamw
  )
  single["gradient_mask(auto, global) + adamw"] = optax.chain(
    gmt_optax.gradient_mask(r, granularity="global"), adamw
  )
  single["random_mask + adamw"] = optax.chain(gmt_optax.random_mask(r), adamw)
  accumulated = {
    "adamw, MultiSteps(4)": optax.MultiSteps(adamw, 4),
    "gmt(accumulation_steps=4)": gmt_optax.gmt(adamw, r, accumulation_steps=4),
    "MultiSteps(chain(gradient_mask, adamw), 4)": optax.MultiSteps(
      optax.chain(gmt_optax.gradient_mask(r), adamw), 4
    ),
  }

  print(
    f"# {args.model}: {n / 1e6:.1f}M parameters in "
    f"{len(params)} leaves, {args.grad_dtype} grads, mask_ratio {r}, "
    f"{jax.devices()[0].device_kind} x{jax.device_count()} ({host_description()}), "
    f"jax {jax.__version__}"
  )
  # Each row is timed against its own interleaved adamw runs (one
  # parameter copy and optimizer state per row: the 135M tree needs ~4 GB).
  baseline = compiled_update(single.pop("adamw"), params, grads, 1)
  print("| update | s min / median / max | adamw s, interleaved | × adamw (medians) |")
  print("| --- | --- | --- | --- |")
  spread = lambda t: f"{min(t):.3f} / {statistics.median(t):.3f} / {max(t):.3f}"
  rows = [(name, tx, 1) for name, tx in single.items()]
  rows += [(f"{name}, 4 calls", tx, 4) for name, tx in accumulated.items()]
  for name, tx, calls in rows:
    if args.only not in name:
      continue
    base, seconds = paired_times(
      lambda: [baseline() for _ in range(calls)],
      compiled_update(tx, params, grads, calls),
      args.repeats,
    )
    ratio = statistics.median(seconds) / statistics.median(base)
    print(f"| {name} | {spread(seconds)} | {spread(base)} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
  main()

"""SFT vs GMT train steps of a 1B-shaped model on whatever accelerator is present.

    python benchmarks/gpu_step.py [--steps 10] [--batch 8] [--length 2048] [--methods sft,gmt]
                                  [--attention auto] [--remat full]

The trainer's own step (`train.step.build_steps`: scanned layers, remat, chunked
loss, clip -> method -> AdamW) on a Llama-3.2-1B-shaped model with random
weights and tokens: float32 parameters and AdamW moments, bfloat16 compute.
Methods are compiled first, then timed round-robin, one step each in turn, so
load hits them alike. Prints the attention implementation used (``auto``: cuDNN's
fused kernel where it compiles, else XLA, with a log line saying why), then
min/median/max s/step, tokens/s and MFU (model FLOPs, 6N per token plus causal
attention, over the chip's peak bf16 rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.config import load_config  # noqa: E402
from train.mesh import make_mesh, shard_model  # noqa: E402
from train.metrics import flops_per_token, peak_flops_per_device  # noqa: E402
from train.models.decoder import ATTENTION_KINDS, REMAT_POLICIES, Llama, LlamaConfig  # noqa: E402
from train.step import build_steps  # noqa: E402

LLAMA_1B = LlamaConfig(
  vocab_size=128256,
  hidden_size=2048,
  intermediate_size=8192,
  num_layers=16,
  num_heads=32,
  num_kv_heads=8,
  head_dim=64,
  rope_theta=500000.0,
  max_position_embeddings=8192,
  tie_word_embeddings=True,
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=8, help="rows per step")
  parser.add_argument("--length", type=int, default=2048, help="tokens per row")
  parser.add_argument("--methods", default="sft,gmt")
  parser.add_argument("--remat", default="full", choices=list(REMAT_POLICIES))
  parser.add_argument("--attention", default="auto", choices=["auto", *ATTENTION_KINDS])
  parser.add_argument(
    "--layers", type=int, default=LLAMA_1B.num_layers, help="cut depth (smoke tests)"
  )
  args = parser.parse_args()

  device = jax.devices()[0]
  peak = peak_flops_per_device()
  config = load_config(
    {"mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "optimizer": {"warmup_steps": 1}}
  )
  mesh = make_mesh(config.mesh)
  shape = dataclasses.replace(LLAMA_1B, num_layers=args.layers)
  model = Llama(
    shape, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat=args.remat, attention=args.attention
  )
  attention = model.attention
  split = shard_model(model, mesh)
  del model
  num_params = split.num_params
  tokens = args.batch * args.length
  flops = tokens * flops_per_token(num_params, shape.num_layers, args.length, shape.hidden_size)
  print(
    f"{jax.device_count()} x {device.device_kind} ({jax.__version__}); "
    f"{num_params / 1e9:.2f}B parameters; batch {args.batch} x {args.length}; "
    f"attention {attention}, remat {args.remat}"
  )

  rng = np.random.default_rng(0)
  methods, compiled, states = args.methods.split(","), {}, {}
  for method in methods:
    optimizer = dataclasses.replace(config.optimizer, method=method)
    steps = build_steps(
      split, dataclasses.replace(config, optimizer=optimizer), mesh, args.steps + 2
    )
    opt_state = jax.jit(steps.tx.init, out_shardings=steps.shardings["opt_state"])(split.params)
    rows = (1, args.batch, args.length)
    batch = jax.device_put(
      {
        "inputs": rng.integers(0, shape.vocab_size, rows, np.int32),
        "targets": rng.integers(0, shape.vocab_size, rows, np.int32),
        "positions": np.broadcast_to(np.arange(args.length, dtype=np.int32), rows),
        "segment_ids": np.ones(rows, np.int32),
        "loss_mask": np.ones(rows, np.float32),
      },
      steps.shardings["batch"],
    )
    own = jax.tree.map(jnp.copy, split.params)  # the step donates its parameters
    tick = time.perf_counter()
    compiled[method] = steps.train.lower(own, opt_state, batch, jnp.int32(0)).compile()
    print(f"{method}: compiled in {time.perf_counter() - tick:.1f} s")
    states[method] = (own, opt_state, batch)

  times, losses = {m: [] for m in methods}, {}
  for step in range(args.steps + 1):
    for method in methods:
      own, opt_state, batch = states[method]
      tick = time.perf_counter()
      own, opt_state, metrics = compiled[method](own, opt_state, batch, jnp.int32(step))
      losses[method] = float(metrics["loss"])  # waits for the step
      if step:  # the first step is a warm-up
        times[method].append(time.perf_counter() - tick)
      states[method] = (own, opt_state, batch)
  print("last losses: " + ", ".join(f"{m} {losses[m]:.3f}" for m in methods))

  print("\n| method | s/step min | median | max | tokens/s | MFU | vs sft |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  base = np.median(times[methods[0]])
  for method in methods:
    t = np.asarray(times[method])
    mfu = f"{flops / np.median(t) / peak:.1%}" if peak else "-"
    print(
      f"| {method} | {t.min():.4f} | {np.median(t):.4f} | {t.max():.4f} | "
      f"{tokens / np.median(t):,.0f} | {mfu} | {np.median(t) / base:.3f} |"
    )


if __name__ == "__main__":
  main()

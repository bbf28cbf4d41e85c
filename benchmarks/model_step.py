"""Train-step, decode and load benchmarks: Flax NNX model vs PyTorch transformers.

Every measurement runs in its own subprocess so that peak RSS is its own; the
NNX and PyTorch subprocesses of a row take turns (``--rounds`` each), so load
from other jobs hits both alike. Shapes: SmolLM2-135M (random init), batch
4 x 256 for the train step.

    python benchmarks/model_step.py [--steps 3] [--rounds 2] [--skip-torch]

Prints a markdown table (recorded in docs/model.md): tokens/s at the median
step, s/step min/median/max over all timed steps of all rounds, peak RSS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = dict(
  vocab_size=49152,
  hidden_size=576,
  intermediate_size=1536,
  num_layers=30,
  num_heads=9,
  num_kv_heads=3,
  head_dim=64,
  rms_norm_eps=1e-5,
  rope_theta=100000.0,
  max_position_embeddings=8192,
  tie_word_embeddings=True,
)
BATCH, SEQ = 4, 256
PROMPT, NEW_TOKENS = 32, 128


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, steps):
  """Seconds of each of ``steps`` calls after one compile / warm-up call."""
  fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def jax_train(steps, optimizer, remat=False, dtype="float32"):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from train.models.decoder import Llama, LlamaConfig

  dtype = jnp.dtype(dtype)
  model = Llama(LlamaConfig(**SMOLLM2), rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
  ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, SMOLLM2["vocab_size"])

  graphdef, params = nnx.split(model, nnx.Param)
  del model

  def loss_fn(params, ids):
    logits = nnx.merge(graphdef, params)(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  if optimizer:
    tx = optax.adamw(1e-4)
    state = [params, tx.init(params)]

    # Donated buffers: params and moments are updated in place, as a trainer does.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids):
      loss, grads = jax.value_and_grad(loss_fn)(params, ids)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    def run():
      state[0], state[1], loss = step(state[0], state[1], ids)
      loss.block_until_ready()
  else:
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    run = lambda: jax.block_until_ready(grad_fn(params, ids))
  return {"times": _timed(run, steps), "tokens": BATCH * SEQ}


def jax_decode(steps, batch=1):
  from flax import nnx

  from train.eval.generate import generate
  from train.models.decoder import Llama, LlamaConfig

  model = Llama(LlamaConfig(**SMOLLM2), rngs=nnx.Rngs(0))
  prompts = [list(range(10, 10 + PROMPT))] * batch
  run = lambda: generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=-1)
  return {"times": _timed(run, max(1, steps // 2)), "tokens": batch * NEW_TOKENS}


def _torch_model():
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=SMOLLM2["vocab_size"],
    hidden_size=SMOLLM2["hidden_size"],
    intermediate_size=SMOLLM2["intermediate_size"],
    num_hidden_layers=SMOLLM2["num_layers"],
    num_attention_heads=SMOLLM2["num_heads"],
    num_key_value_heads=SMOLLM2["num_kv_heads"],
    rms_norm_eps=SMOLLM2["rms_norm_eps"],
    rope_theta=SMOLLM2["rope_theta"],
    max_position_embeddings=SMOLLM2["max_position_embeddings"],
    tie_word_embeddings=True,
  )
  return transformers.LlamaForCausalLM(config)


def torch_train(steps, optimizer):
  import torch

  model = _torch_model()
  ids = torch.randint(0, SMOLLM2["vocab_size"], (BATCH, SEQ))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if optimizer else None

  def run():
    loss = model(ids, labels=ids).loss
    loss.backward()
    if opt is not None:
      opt.step()
    model.zero_grad(set_to_none=True)

  return {"times": _timed(run, steps), "tokens": BATCH * SEQ}


def torch_decode(steps, batch=1):
  import torch

  model = _torch_model().eval()
  ids = torch.arange(10, 10 + PROMPT)[None].repeat(batch, 1)

  def run():
    with torch.no_grad():
      model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
      )

  return {"times": _timed(run, max(1, steps // 2)), "tokens": batch * NEW_TOKENS}


def load_gguf(steps):
  del steps
  import jax
  import jax.numpy as jnp

  from train.models.gguf_import import default_gguf_path
  from train.models.pretrained import load_pretrained

  jnp.zeros(1).block_until_ready()  # count the runtime itself in the baseline
  path = default_gguf_path()
  with open("/proc/self/status") as f:
    base = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
  start = time.perf_counter()
  model, _ = load_pretrained(path)
  seconds = time.perf_counter() - start
  model_mb = model.num_params * 4 / 2**20
  growth = _peak_rss_mb() - base
  return {
    "s_per_step": seconds,
    "model_mb": model_mb,
    "load_growth_mb": growth,
    "ratio": growth / model_mb,
    "devices": jax.device_count(),
  }


WORKERS = {
  "jax_fwd_bwd": lambda s: jax_train(s, optimizer=False),
  "jax_adamw": lambda s: jax_train(s, optimizer=True),
  "jax_adamw_remat": lambda s: jax_train(s, optimizer=True, remat=True),
  "jax_decode": jax_decode,
  "jax_decode_b4": lambda s: jax_decode(s, batch=4),
  "torch_fwd_bwd": lambda s: torch_train(s, optimizer=False),
  "torch_adamw": lambda s: torch_train(s, optimizer=True),
  "torch_decode": torch_decode,
  "torch_decode_b4": lambda s: torch_decode(s, batch=4),
  "load_gguf": load_gguf,
}
ROWS = [
  ("train step fwd+bwd, 4x256", "jax_fwd_bwd", "torch_fwd_bwd"),
  ("train step fwd+bwd+AdamW, 4x256", "jax_adamw", "torch_adamw"),
  ("train step + AdamW, remat", "jax_adamw_remat", None),
  (f"greedy decode, batch 1, {PROMPT}+{NEW_TOKENS}", "jax_decode", "torch_decode"),
  (f"greedy decode, batch 4, {PROMPT}+{NEW_TOKENS}", "jax_decode_b4", "torch_decode_b4"),
]


def _run_worker(name, steps):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [sys.executable, __file__, "--worker", name, "--steps", str(steps)],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  if proc.returncode != 0:
    print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--worker", choices=sorted(WORKERS))
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args()
  if args.worker:
    if args.worker.startswith("torch"):
      import torch

      torch.set_num_threads(os.cpu_count())
    result = WORKERS[args.worker](args.steps)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))
    return

  try:
    import torch  # noqa: F401  pylint: disable=unused-import
    import transformers  # noqa: F401  pylint: disable=unused-import

    have_torch = not args.skip_torch
  except ImportError:
    have_torch = False

  from train.metrics import host_description  # here: the torch workers must not import jax

  def cell(results):
    if not results:
      return "n/a"
    times = np.concatenate([r["times"] for r in results])
    low, median, high = np.min(times), np.median(times), np.max(times)
    peak = max(r["peak_rss_mb"] for r in results) / 1024
    return (
      f"{results[0]['tokens'] / median:.0f} tok/s, "
      f"{low:.2f} / {median:.2f} / {high:.2f} s, {peak:.2f} GB"
    )

  print(
    f"CPU: {host_description()}; SmolLM2-135M shape, float32, random init; "
    f"{args.rounds} rounds x {args.steps} steps per cell after one warm-up step a round; "
    "the two columns of a row take turns.\n"
  )
  print("| measurement | Flax NNX (this repo) | PyTorch transformers |")
  print("| --- | --- | --- |")
  print("| | tok/s at the median; s/step min / median / max; peak RSS | same |")
  for label, jax_name, torch_name in ROWS:
    results = {jax_name: [], torch_name: []}
    for _ in range(args.rounds):
      for name in (jax_name, torch_name if have_torch else None):
        if name and (result := _run_worker(name, args.steps)):
          results[name].append(result)
    print(f"| {label} | {cell(results[jax_name])} | {cell(results[torch_name])} |", flush=True)
  load = _run_worker("load_gguf", 1)
  if load:
    print(
      f"\nload_pretrained(SmolLM2-135M-Instruct.Q4_1.gguf): {load['s_per_step']:.1f} s, "
      f"RSS growth {load['load_growth_mb']:.0f} MB for a {load['model_mb']:.0f} MB float32 "
      f"model ({load['ratio']:.2f}x), peak RSS {load['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
  main()

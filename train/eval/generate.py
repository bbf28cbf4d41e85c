"""Batched KV-cache generation (greedy or temperature/top-p sampling) and a CLI.

Prompts are left-padded to a common length (rounded up to a multiple of 16 so
that similar batches reuse one compilation); padding has segment id 0, so it
is never attended to, and each row's RoPE positions start at 0. Prefill and the
whole decode loop (``lax.while_loop``, stopping once every row has produced
EOS) run in one jitted call.

CLI::

    python -m train.eval.generate --model PATH --prompt "..." [--chat] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.mesh import to_host
from train.models.gguf_import import default_gguf_path
from train.models.pretrained import load_pretrained

_PROMPT_BUCKET = 16


def _sample(logits, key, temperature, top_p, *, greedy: bool, use_top_p: bool):
  """One token per row from float32 logits [B, V]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if use_top_p:
    # Keep the smallest set of top tokens whose mass reaches top_p (the most
    # likely token always survives).
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class _Sampling(NamedTuple):
  """The traced sampling values: a new seed or temperature reuses the compiled call."""

  seed: np.uint32
  temperature: np.float32
  top_p: np.float32
  pad_id: np.int32


@dataclasses.dataclass(frozen=True)
class _Decoding:
  """The static choices (hashed into jit's cache key): each new value compiles anew."""

  max_new_tokens: int
  eos_ids: tuple[int, ...]
  greedy: bool
  use_top_p: bool


@functools.partial(jax.jit, static_argnames=("graphdef", "decoding"))
def _generate(graphdef, state, tokens, segment_ids, sampling: _Sampling, *, decoding: _Decoding):
  """New tokens [B, max_new_tokens] after left-padded prompts `tokens` [B, P] (segment ids 1
  on prompt tokens, 0 on padding)."""
  model = nnx.merge(graphdef, state)
  key = jax.random.key(sampling.seed)
  batch, prompt_len = tokens.shape
  sample = functools.partial(
    _sample,
    temperature=sampling.temperature,
    top_p=sampling.top_p,
    greedy=decoding.greedy,
    use_top_p=decoding.use_top_p,
  )
  max_new_tokens, pad_id = decoding.max_new_tokens, sampling.pad_id
  eos = jnp.asarray(decoding.eos_ids, jnp.int32)

  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
  logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)
  key, sub = jax.random.split(key)
  token = sample(logits[:, -1], sub)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(carry):
    step, _, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, position, cache, done, out, key = carry
    logits, cache = model(
      token[:, None],
      positions=position[:, None],
      segment_ids=jnp.ones((batch, 1), jnp.int32),
      cache=cache,
    )
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_id, sample(logits[:, 0], sub))
    out = out.at[:, step].set(token)
    return step + 1, token, position + 1, cache, done | jnp.isin(token, eos), out, key

  carry = (jnp.asarray(1), token, segment_ids.sum(axis=1), cache, done, out, key)
  return jax.lax.while_loop(cond, body, carry)[5]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
  """Raises ValueError for values that would silently sample garbage (top_p 0 keeps no token)."""
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus cut)")


# Eight parameters on purpose: the keyword-only ones are Hugging Face's `generate` arguments
# (same names and meaning), so a call reads the same against either library.
def generate(
  model,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int],
  pad_token_id: int = 0,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
) -> list[list[int]]:
  """Continues each prompt; returns only the new tokens, cut before EOS.

  Args:
    model: a :class:`train.models.decoder.Llama`.
    prompts: token ids per prompt (lengths may differ).
    eos_token_id: one id or several; generation of a row stops at the
      first of them (not included in the output).
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus sampling mass in (0, 1] (1.0 disables it).
  """
  check_sampling(max_new_tokens, temperature, top_p)
  if not prompts:
    return []
  if max_new_tokens == 0:
    return [[] for _ in prompts]
  if any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  eos_ids = tuple(int(e) for e in np.atleast_1d(eos_token_id))
  longest = max(len(p) for p in prompts)
  prompt_len = -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET
  tokens = np.full((len(prompts), prompt_len), pad_token_id, np.int32)
  segment_ids = np.zeros((len(prompts), prompt_len), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, prompt_len - len(prompt) :] = prompt
    segment_ids[row, prompt_len - len(prompt) :] = 1
  graphdef, state = nnx.split(model)
  # Host (numpy) inputs: with a model sharded over several processes, each
  # process passes the same values and jit treats them as replicated.
  out = _generate(
    graphdef,
    state,
    tokens,
    segment_ids,
    _Sampling(
      np.uint32(seed), np.float32(max(temperature, 1e-6)), np.float32(top_p), np.int32(pad_token_id)
    ),
    decoding=_Decoding(max_new_tokens, eos_ids, greedy=temperature == 0.0, use_top_p=top_p < 1.0),
  )
  results = []
  for row in to_host(out).tolist():
    stops = [i for i, t in enumerate(row) if t in eos_ids]
    results.append(row[: stops[0]] if stops else row)
  return results


def greedy_texts(
  model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
  """Greedy completions of token-id prompts, `batch_size` prompts per call, decoded to text
  (each stops at the tokenizer's EOS)."""
  texts = []
  for start in range(0, len(prompts), batch_size):
    outputs = generate(
      model,
      prompts[start : start + batch_size],
      max_new_tokens=max_new_tokens,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id or 0,
    )
    # A model vocabulary larger than the tokenizer's can produce ids it cannot decode.
    texts += [
      tokenizer.decode([i for i in ids if i < tokenizer.vocab_size], skip_special_tokens=True)
      for ids in outputs
    ]
  return texts


def instruction_prompts(tokenizer, instructions: list[str]) -> list[list[int]]:
  """Token ids of single-turn user instructions through the tokenizer's chat template, with
  the generation prompt."""
  return [
    tokenizer.encode(
      tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
      ),
      add_special_tokens=False,
    )
    for text in instructions
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description="Generate a completion with a pretrained model.")
  parser.add_argument(
    "--model",
    default=None,
    help="HF directory or .gguf file (default: the SmolLM2-135M-Instruct GGUF)",
  )
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
  except ValueError as e:
    parser.error(str(e).replace("_", "-"))  # exit code 2, before loading the model

  model, tokenizer = load_pretrained(args.model or default_gguf_path())
  if args.chat:
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    ids = tokenizer.encode(text, add_special_tokens=False)
  else:
    ids = tokenizer.encode(args.prompt, add_special_tokens=True)
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id
  new = generate(
    model,
    [ids],
    max_new_tokens=args.max_new_tokens,
    eos_token_id=eos if eos is not None else -1,
    pad_token_id=pad if pad is not None else 0,
    temperature=args.temperature,
    top_p=args.top_p,
    seed=args.seed,
  )[0]
  print(tokenizer.decode(new))


if __name__ == "__main__":
  main()

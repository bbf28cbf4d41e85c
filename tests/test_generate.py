"""KV-cache generation against step-by-step full forward passes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.eval import generate as generate_module
from train.eval.generate import generate
from train.models.pretrained import load_pretrained

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def model():
  return load_pretrained(os.path.join(FIXTURES, "llama"))[0]


_forward = jax.jit(lambda m, x: m(x))


def greedy_reference(model, prompt, steps):
  """Greedy argmax by re-running the full forward pass each step (no cache).

  Ids are right-padded to a fixed length (causal attention ignores what
  follows) so one compilation serves every step.
  """
  ids = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, 32), np.int32)
    padded[0, : len(ids)] = ids
    ids.append(int(jnp.argmax(_forward(model, jnp.asarray(padded))[0, len(ids) - 1])))
  return ids[len(prompt) :]


PROMPTS = [
  [5, 17, 200, 42, 9],
  [100, 3],
  [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
]


def test_batched_greedy_equals_full_forward(model):
  out = generate(model, PROMPTS, max_new_tokens=6, eos_token_id=-1)
  for prompt, new in zip(PROMPTS, out):
    assert new == greedy_reference(model, prompt, 6)


def test_cut_at_eos(model):
  reference = greedy_reference(model, PROMPTS[0], 6)
  eos = reference[3]
  out = generate(model, PROMPTS[:1], max_new_tokens=6, eos_token_id=eos)[0]
  assert out == reference[: reference.index(eos)]
  both = generate(model, PROMPTS[:2], max_new_tokens=6, eos_token_id=[eos, -5])
  assert both[0] == out and eos not in both[1]


def test_sampling_is_seeded_and_top_p_small_is_greedy(model):
  kw = dict(max_new_tokens=5, eos_token_id=-1, temperature=1.0)
  a = generate(model, PROMPTS, seed=1, **kw)
  assert a == generate(model, PROMPTS, seed=1, **kw)
  assert all(len(x) == 5 and all(0 <= t < 288 for t in x) for x in a)
  nucleus = generate(model, PROMPTS, top_p=1e-6, seed=3, **kw)
  assert nucleus == generate(model, PROMPTS, max_new_tokens=5, eos_token_id=-1)


def test_edge_cases(model):
  assert generate(model, [], max_new_tokens=3, eos_token_id=2) == []
  assert generate(model, [[1, 2]], max_new_tokens=0, eos_token_id=2) == [[]]
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, [[]], max_new_tokens=3, eos_token_id=2)


def test_cli(model, capsys):
  generate_module.main(
    [
      "--model",
      os.path.join(FIXTURES, "llama"),
      "--prompt",
      "hello",
      "--chat",
      "--max-new-tokens",
      "4",
    ]
  )
  printed = capsys.readouterr().out
  tok = load_pretrained(os.path.join(FIXTURES, "llama"))[1]
  prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
  expected = greedy_reference(model, prompt, 4)
  assert tok.eos_token_id not in expected  # the random fixture model never stops early
  assert printed == tok.decode(expected) + "\n"


def test_sharded_model_generates_the_same(model):
  mesh = jax.make_mesh(
    (1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  sharded, _ = load_pretrained(os.path.join(FIXTURES, "llama"), mesh=mesh)
  expected = generate(model, PROMPTS, max_new_tokens=4, eos_token_id=-1)
  with jax.set_mesh(mesh):
    assert generate(sharded, PROMPTS, max_new_tokens=4, eos_token_id=-1) == expected


@pytest.mark.parametrize(
  "flag, value, message",
  [
    ("--top-p", "0", "top-p=0.0 must be in"),
    ("--top-p", "1.5", "top-p=1.5 must be in"),
    ("--temperature", "-1", "temperature=-1.0 must be >= 0"),
    ("--max-new-tokens", "-5", "max-new-tokens=-5 must be >= 0"),
  ],
)
def test_cli_rejects_bad_sampling_values(capsys, flag, value, message):
  with pytest.raises(SystemExit) as exit_info:
    generate_module.main(["--model", "/nonexistent", "--prompt", "hi", flag, value])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_rejects_top_p_zero(model):
  with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
    generate(model, PROMPTS, max_new_tokens=3, eos_token_id=-1, temperature=1.0, top_p=0)

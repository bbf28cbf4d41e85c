"""DPO: the loss and its gradient against the formula, beta -> 0, the reference options,
accumulation and processes, preference-pair data."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train
from tests.test_step import TINY as TINY_MODEL
from tests.test_train import TINY, _close, _launch_two_processes, _losses, _summaries
from train.config import ConfigError, load_config
from train.data import Batches, prepare
from train.mesh import make_mesh, shard_model
from train.models.decoder import Llama
from train.models.tokenizer import ByteTokenizer
from train.step import build_steps, dpo_loss_sum, reference_copy, sequence_logps

TOK = ByteTokenizer()
PAIRS, LENGTH = 3, 12


def _pair_rows(pairs=PAIRS, seed=0) -> dict:
  """[2 * pairs, LENGTH] rows, chosen and rejected interleaved: a prompt shared by the pair,
  responses of different lengths, padding at the end."""
  rng = np.random.default_rng(seed)
  rows = 2 * pairs
  prompt = np.repeat(rng.integers(3, 64, (pairs, 4)), 2, axis=0)
  inputs = np.concatenate([prompt, rng.integers(3, 64, (rows, LENGTH - 4))], axis=1)
  ends = rng.integers(7, LENGTH + 1, rows)
  segment_ids = (np.arange(LENGTH) < ends[:, None]).astype(np.int32)
  return {
    "inputs": inputs.astype(np.int32),
    "targets": np.roll(inputs, -1, axis=1).astype(np.int32),
    "loss_mask": ((np.arange(LENGTH) >= 3) * segment_ids).astype(np.float32),
    "segment_ids": segment_ids,
    "positions": np.broadcast_to(np.arange(LENGTH), (rows, LENGTH)).astype(np.int32),
  }


def _numpy_logps(model, rows) -> np.ndarray:
  """Each row's summed log-probability of its loss tokens, in float64 from the logits."""
  logits = np.asarray(
    model(rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"]),
    np.float64,
  )
  top = logits.max(-1, keepdims=True)
  log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, rows["targets"][..., None], -1)[..., 0]
  return (picked * rows["loss_mask"]).sum(-1)


def _dpo_cfg(beta=0.1, label_smoothing=0.0, precompute=False):
  values = {"beta": beta, "label_smoothing": label_smoothing, "precompute_reference": precompute}
  return load_config({"dpo": values}).dpo


def _models():
  """The policy and a reference that differs from it, so that margins are not zero."""
  return Llama(TINY_MODEL, rngs=nnx.Rngs(0)), Llama(TINY_MODEL, rngs=nnx.Rngs(1))


def _mean_loss_and_grads(policy, reference, rows, cfg):
  """Mean DPO loss over pairs and its gradient in the policy's parameters."""
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

  def mean_loss(params):
    total, sums = dpo_loss_sum(nnx.merge(graphdef, params, rest), rows, reference, cfg)
    return total / sums["pairs"], sums

  (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  return float(loss), sums, grads, (graphdef, params, rest)


def _logps_jacobian(split, rows):
  """d(row log-probability)/d(params) for every row: a pytree of [rows, ...] arrays."""
  graphdef, params, rest = split
  return jax.jacrev(lambda p: sequence_logps(nnx.merge(graphdef, p, rest), rows))(params)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_loss_and_gradient_equal_the_formula(label_smoothing):
  policy, reference = _models()
  rows = {k: jnp.asarray(v) for k, v in _pair_rows().items()}
  cfg = _dpo_cfg(beta=0.5, label_smoothing=label_smoothing)
  loss, sums, grads, split = _mean_loss_and_grads(policy, reference, rows, cfg)
  # The formula in float64 from each model's logits.
  logps, ref_logps = _numpy_logps(policy, rows), _numpy_logps(reference, rows)
  h = (logps[0::2] - ref_logps[0::2]) - (logps[1::2] - ref_logps[1::2])
  z = cfg.beta * h
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
  expected = np.mean(-(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z))
  assert abs(z).max() > 0.1  # the reference differs enough for the test to mean something
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(float(sums["rewards/margins"]) / PAIRS, np.mean(z), rtol=1e-5)
  assert float(sums["rewards/accuracies"]) == np.sum(z > 0)
  # Chain rule: dL/dlogp of each row (the formula's derivative) times d(logp)/d(params).
  dloss_dz = (1 / (1 + np.exp(-z)) - (1 - label_smoothing)) / PAIRS
  dloss_dlogp = np.stack([cfg.beta * dloss_dz, -cfg.beta * dloss_dz], axis=1).reshape(-1)
  jacobian = _logps_jacobian(split, rows)
  for got, jac in zip(jax.tree.leaves(grads), jax.tree.leaves(jacobian)):
    want = np.tensordot(dloss_dlogp, np.asarray(jac, np.float64), axes=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_small_beta_gradient_is_half_the_log_prob_margin_gradient():
  """At beta -> 0: loss = log 2 - (beta/2) mean(h) + O(beta^2) and
  grad = -(beta/2) mean(grad(logp(y_w) - logp(y_l))) + O(beta^2)."""
  policy, reference = _models()
  rows = {k: jnp.asarray(v) for k, v in _pair_rows().items()}
  beta = 1e-5  # margins beta * h stay below 1e-3: the O(beta^2) terms are ~1e-4 relative
  loss, sums, grads, split = _mean_loss_and_grads(policy, reference, rows, _dpo_cfg(beta=beta))
  h_mean = float(sums["rewards/margins"]) / PAIRS / beta
  np.testing.assert_allclose(loss, np.log(2) - beta / 2 * h_mean, rtol=1e-6)
  jacobian = _logps_jacobian(split, rows)
  for got, jac in zip(jax.tree.leaves(grads), jax.tree.leaves(jacobian)):
    margin_grad = np.mean(np.asarray(jac[0::2] - jac[1::2], np.float64), axis=0)
    big = np.abs(margin_grad) > 1e-2 * np.abs(margin_grad).max()  # no cancellation
    ratio = np.asarray(got, np.float64)[big] / (-beta / 2 * margin_grad[big])
    np.testing.assert_allclose(ratio, 1.0, atol=1e-3)


def _train_step_run(dpo_cfg, accumulation=1, mesh=None, steps=2):
  """Metrics and parameters after `steps` DPO updates of 4 pairs (SFT optimizer)."""
  cfg = load_config(
    {"optimizer": {"method": "sft", "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"}}
  )
  mesh = make_mesh(load_config({"mesh": mesh or {"data": 2, "tensor": 4}}).mesh)
  split = shard_model(Llama(TINY_MODEL, rngs=nnx.Rngs(0)), mesh)
  params = split.params
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="dpo"), dpo=dpo_cfg)
  built = build_steps(split, cfg, mesh, steps)
  reference = reference_copy(params, split.shardings, jnp.float32)
  opt_state = jax.jit(built.tx.init, out_shardings=built.shardings["opt_state"])(params)
  history = []
  for step in range(steps):
    rows = _pair_rows(pairs=4, seed=step)
    extra = (reference,)
    if dpo_cfg.precompute_reference:
      rows["reference_logps"] = np.asarray(built.logps(reference, rows))
      extra = ()
    batch = {k: v.reshape(accumulation, -1, *v.shape[1:]) for k, v in rows.items()}
    batch = jax.device_put(batch, built.shardings["batch"])
    params, opt_state, metrics = built.train(params, opt_state, batch, jnp.int32(step), *extra)
    history.append({k: float(v) for k, v in metrics.items()})
  return history, jax.tree.map(np.asarray, params)


def test_precomputed_reference_accumulation_and_mesh_give_the_same_steps():
  live, live_params = _train_step_run(_dpo_cfg())
  assert live[1]["rewards/margins"] != 0  # the second step moved away from the reference
  for dpo_cfg, accumulation, mesh in [
    (_dpo_cfg(precompute=True), 1, None),
    (_dpo_cfg(), 2, None),
    (_dpo_cfg(precompute=True), 2, {"data": 1, "fsdp": 2, "tensor": 4}),
  ]:
    other, params = _train_step_run(dpo_cfg, accumulation, mesh)
    for a, b in zip(live, other):
      assert a.keys() == b.keys()
      for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(live_params)):
      np.testing.assert_allclose(a, b, atol=1e-4)  # 1% of an lr=1e-2 Adam step


DPO_RUN = {
  **TINY,
  "data": {**TINY["data"], "pack": False},
  "optimizer": {**TINY["optimizer"], "schedule": "constant", "selection": "bisect"},
  "train": {**TINY["train"], "objective": "dpo", "steps": 3, "batch_size": 8},
  "eval": {"accuracy": False},
}


def test_two_processes_match_one(tmp_path):
  """2 processes x 4 devices with a precomputed reference give what 1 process x 8 devices
  gives with a live one: step losses and held-out preference metrics."""
  multi = tmp_path / "multi"
  procs = _launch_two_processes(
    {**DPO_RUN, "train": {**DPO_RUN["train"], "output_dir": str(multi)}},
    tmp_path / "multi.json",
    "dpo.precompute_reference=true",
  )
  single = train.run(
    {**DPO_RUN, "train": {**DPO_RUN["train"], "output_dir": str(tmp_path / "one")}}
  )
  first, second = _summaries(procs)
  assert first == second
  for tag in ("before", "after"):
    for name in ("eval_loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
      assert _close(single[tag][name], first[tag][name]), (tag, name, single[tag], first[tag])
  assert single["after"]["rewards/margins"] != 0
  one, two = _losses(tmp_path / "one"), _losses(multi)
  assert one.keys() == two.keys() == {1, 2, 3}
  assert all(_close(one[s], two[s]) for s in one), (one, two)


# ----------------------------------------------------------------------------
# Data


def _pairs_cfg(tmp_path, records, **data):
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records))
  values = {"tokenizer": "bytes", "source": "files", "train_files": [str(path)], "pack": False}
  return load_config({"data": {**values, **data}}).data


def _decoded_answers(rows, r):
  return TOK.decode(rows["targets"][r][rows["loss_mask"][r] > 0], skip_special_tokens=False)


def test_message_list_pairs_become_adjacent_rows(tmp_path):
  """UltraFeedback's layout: chosen and rejected are conversations ending in the answer."""
  records = [
    {
      "prompt": f"q{i}",
      "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"y{i}"}],
      "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "no"}],
    }
    for i in range(20)
  ]
  rows, _, held_out, report = prepare(_pairs_cfg(tmp_path, records, eval_size=2), TOK, True)
  assert report["train_pairs"] == 18 and report["eval_pairs"] == 2 and len(held_out) == 2
  assert len(rows["inputs"]) == 36
  for pair in range(18):
    chosen, rejected = _decoded_answers(rows, 2 * pair), _decoded_answers(rows, 2 * pair + 1)
    assert chosen.startswith("y") and chosen.endswith("</s>") and rejected == "no</s>"
    prompt = rows["inputs"][2 * pair][rows["loss_mask"][2 * pair] == 0][:5]
    np.testing.assert_array_equal(prompt, rows["inputs"][2 * pair + 1][:5])  # same prompt
  batches = Batches(rows, batch_size=4, micro_batch_size=2, seed=0, rows_per_item=2)
  assert batches.shape == (2, 4, rows["inputs"].shape[1])
  ids = batches.row_ids(3).reshape(-1, 2)
  assert (ids[:, 0] % 2 == 0).all() and (ids[:, 1] == ids[:, 0] + 1).all()


@pytest.mark.parametrize(
  "record, message",
  [
    ({"prompt": "q", "chosen": "a"}, r"missing field\(s\) \['rejected'\]"),
    ({"question": "q", "chosen": "a", "rejected": "b"}, r"missing field\(s\) \['prompt'\]"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, r"pairs.jsonl:1: field 'chosen' is empty"),
    (
      {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
      },
      r"pairs.jsonl:1: field 'rejected' has an empty response",
    ),
  ],
)
def test_bad_pairs_are_named(tmp_path, record, message):
  with pytest.raises(ValueError, match=message):
    prepare(_pairs_cfg(tmp_path, [record], prompt_field="prompt"), TOK, True)


def test_too_long_pairs_are_dropped_or_truncated_and_counted(tmp_path):
  records = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 9
  records.append({"prompt": "q", "chosen": "a", "rejected": "b" * 40})  # too long: its pair
  records.append({"prompt": "q" * 40, "chosen": "a", "rejected": "b"})  # prompt fills the row
  cfg = dict(prompt_field="prompt", max_length=30, eval_size=0)
  _, _, _, report = prepare(_pairs_cfg(tmp_path, records, **cfg), TOK, True)
  assert (report["train_pairs"], report["too_long_dropped"]) == (9, 2)
  rows, _, _, report = prepare(_pairs_cfg(tmp_path, records, too_long="truncate", **cfg), TOK, True)
  assert (report["train_pairs"], report["too_long_truncated"], report["prompt_too_long"]) == (
    10,
    2,
    1,
  )
  assert len(rows["inputs"]) == 20 and (rows["loss_mask"].reshape(10, 2, -1).sum(-1) > 0).all()


def test_reasoning_gym_pairs_reject_a_near_miss():
  cfg = load_config({"data": {"tokenizer": "bytes", "train_size": 20, "eval_size": 5}}).data
  from train.examples import load_examples

  train_pairs, held_out, _ = load_examples(cfg, pairs=True)
  again, _, _ = load_examples(cfg, pairs=True)
  assert [p.rejected for p in train_pairs] == [p.rejected for p in again]  # from the seed
  for pair in train_pairs + held_out:
    answer = int(pair.messages[-1]["content"])
    assert int(pair.rejected) - answer in (-10, -2, -1, 1, 2, 10)


def test_config_checks():
  with pytest.raises(ConfigError, match="set data.pack=false"):
    load_config({"train": {"objective": "dpo"}})
  with pytest.raises(ConfigError, match=r"dpo.beta=0.0 must be > 0"):
    load_config({"dpo": {"beta": 0}})
  with pytest.raises(ConfigError, match=r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"):
    load_config({"dpo": {"label_smoothing": 0.5}})


def test_plan_compiles_the_dpo_step():
  """train.plan compiles the DPO step: a live reference is an argument as large as the
  parameters (f32 compute here); a precomputed one adds none."""
  from train import plan

  reports = {
    precompute: plan.plan(
      load_config(DPO_RUN, [f"dpo.precompute_reference={precompute}"]), jax.devices(), None
    )
    for precompute in ("false", "true")
  }
  live, precomputed = reports["false"], reports["true"]
  assert live["breakdown_bytes"]["reference"] == live["breakdown_bytes"]["parameters"]
  assert "reference" not in precomputed["breakdown_bytes"]
  assert live["objective"] == "dpo" and live["batch"]["rows"] == 2 * DPO_RUN["train"]["batch_size"]
  assert live["model_flops_per_step"] == pytest.approx(4 / 3 * precomputed["model_flops_per_step"])

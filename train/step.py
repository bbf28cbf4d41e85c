"""The jitted training and eval steps: accumulate over micro-batches, then one update.

One optimizer update = a `lax.scan` over the micro-batches of the global batch
(summing token losses and their gradients), then ONE `tx.update` on the mean
gradient: the mask selection of GMT runs once per update, not per micro-batch.
The loss is the mean over all loss tokens of the global batch, so it does not
depend on how the batch is split into micro-batches, devices or hosts.

Parameters are a pure dict (`nnx.split` + `to_pure_dict`), merged back into
the NNX module inside the loss: the step is a plain function of arrays that
jit can shard, donate and checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gmt_optax
from train.config import OptimizerConfig
from train.mesh import BATCH_AXES, batch_sharding, replicated
from train.model import project_to_vocab
from train.optimizer import build_optimizer, opt_state_shardings


def merge(graphdef, params: dict, rest) -> nnx.Module:
  return nnx.merge(graphdef, nnx.State(params), rest)


def _under_mesh(mesh):
  """Traces the decorated function with `mesh` as the abstract mesh (for `model.constrain`)."""

  def decorate(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args)

    return wrapped

  return decorate


def token_loss_sum(
  model: nnx.Module, batch: dict, chunk_tokens: int = 0
) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropy over loss tokens, number of loss tokens) of [M, L] rows.

  With `chunk_tokens`, the float32 logits exist one sequence chunk at a
  time, in the forward and the backward pass (see `chunked_cross_entropy`).
  """
  hidden, _ = model.hidden_states(
    batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]
  )
  mask = batch["loss_mask"]
  total = chunked_cross_entropy(hidden, *model.head(), batch["targets"], mask, chunk_tokens)
  return total, jnp.sum(mask)


def chunked_cross_entropy(hidden, head, dims, targets, mask, chunk_tokens: int) -> jax.Array:
  """Sum of masked cross-entropy of `hidden` [M, L, D] projected by `head`.

  The sequence is cut into chunks of at most `chunk_tokens` (a divisor of L;
  0 = one chunk) that a `lax.scan` visits with the chunk's loss under
  `jax.checkpoint`: the [M, L, V] float32 logits (67 GB for 64 rows of 2048
  tokens of Llama 3) never exist at once, only [M, chunk, V].
  """
  rows, length = targets.shape

  def chunk_loss(hidden, targets, mask):
    logits = project_to_vocab(hidden, head, dims)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

  chunk = max(
    (c for c in range(1, min(chunk_tokens, length) + 1) if length % c == 0), default=length
  )
  if chunk == length:
    return chunk_loss(hidden, targets, mask)

  def by_chunk(x):  # [M, L, ...] -> [L / chunk, M, chunk, ...]
    return jnp.moveaxis(x.reshape(rows, length // chunk, chunk, *x.shape[2:]), 1, 0)

  checkpointed = jax.checkpoint(chunk_loss)  # the backward recomputes one chunk's logits

  def add_chunk(total, chunk_inputs):
    return total + checkpointed(*chunk_inputs), None

  total, _ = jax.lax.scan(
    add_chunk, jnp.zeros((), jnp.float32), (by_chunk(hidden), by_chunk(targets), by_chunk(mask))
  )
  return total


def make_train_step(
  graphdef, rest, tx, schedule, shardings: dict, mesh, loss_chunk_tokens: int = 0
) -> Callable:
  """jit(step)(params, opt_state, batch, step) -> (params, opt_state, metrics).

  `shardings` holds "params", "opt_state" and "batch"; params and optimizer
  state are donated, so an update needs no second copy of them. The step
  traces under the mesh, so the model's activation constraints apply.
  """

  def loss_sum(params, micro_batch):
    return token_loss_sum(merge(graphdef, params, rest), micro_batch, loss_chunk_tokens)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  @_under_mesh(mesh)
  def step(params, opt_state, batch, step_number):
    def accumulate(carry, micro_batch):
      grad_sum, loss_total, tokens = carry
      (loss, count), grads = grad_fn(params, micro_batch)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      grad_sum = jax.lax.with_sharding_constraint(grad_sum, shardings["params"])
      return (grad_sum, loss_total + loss, tokens + count), None

    if batch["inputs"].shape[0] == 1:  # no accumulation: a plain step compiles simpler
      (loss_total, tokens), grad_sum = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
    else:
      zeros = jax.tree.map(jnp.zeros_like, params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      (grad_sum, loss_total, tokens), _ = jax.lax.scan(accumulate, init, batch)
    denominator = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grad_sum)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {
      "loss": loss_total / denominator,
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(step_number),
      "loss_tokens": tokens,
    }
    kept = gmt_optax.kept_fraction(opt_state)
    if kept is not None:
      metrics["kept_fraction"] = kept
    return params, opt_state, metrics

  return jax.jit(
    step,
    in_shardings=(
      shardings["params"],
      shardings["opt_state"],
      shardings["batch"],
      replicated(mesh),
    ),
    out_shardings=(shardings["params"], shardings["opt_state"], replicated(mesh)),
    donate_argnums=(0, 1),
  )


def make_eval_step(
  graphdef, rest, params_shardings: dict, mesh, loss_chunk_tokens: int = 0
) -> Callable:
  """jit(eval)(params, rows [M, L]) -> (loss sum, loss tokens)."""

  @_under_mesh(mesh)
  def evaluate(params, rows):
    return token_loss_sum(merge(graphdef, params, rest), rows, loss_chunk_tokens)

  rows_sharding = NamedSharding(mesh, P(BATCH_AXES, None))
  return jax.jit(
    evaluate, in_shardings=(params_shardings, rows_sharding), out_shardings=replicated(mesh)
  )


@dataclasses.dataclass(frozen=True)
class Steps:
  """What a run needs to train and evaluate: the optimizer, shardings and jitted steps."""

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: dict  # "params", "opt_state", "batch"
  train: Callable
  eval: Callable


def build_steps(
  graphdef,
  rest,
  params,
  params_shardings: dict,
  cfg: OptimizerConfig,
  total_steps: int,
  mesh,
  loss_chunk_tokens: int = 0,
) -> Steps:
  """optimizer -> state shardings -> jitted train and eval steps, for concrete or abstract params."""
  tx, schedule = build_optimizer(cfg, total_steps)
  shardings = {
    "params": params_shardings,
    "opt_state": opt_state_shardings(tx, params, params_shardings, mesh),
    "batch": batch_sharding(mesh),
  }
  return Steps(
    tx,
    schedule,
    shardings,
    make_train_step(graphdef, rest, tx, schedule, shardings, mesh, loss_chunk_tokens),
    make_eval_step(graphdef, rest, params_shardings, mesh, loss_chunk_tokens),
  )

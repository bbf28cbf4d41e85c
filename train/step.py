"""The jitted training and eval steps: accumulate over micro-batches, then one update.

One optimizer update = a `lax.scan` over the micro-batches of the global batch
(summing token losses and their gradients), then ONE `tx.update` on the mean
gradient: the mask selection of GMT runs once per update, not per micro-batch.
The loss is the mean over all loss tokens of the global batch (SFT) or over its
preference pairs (DPO, `train/dpo.py`), so it does not depend on how the batch is
split into micro-batches, devices or hosts.

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
from train import dpo
from train.config import Config, DPOConfig
from train.data import ROW_FIELDS
from train.mesh import BATCH_AXES, batch_sharding, replicated, rows_sharding
from train.models.decoder import OutputHead, SplitModel, constrain_head, project_to_vocab
from train.optimizer import build_optimizer, opt_state_shardings


def _under_mesh(mesh):
  """Traces the decorated function with `mesh` as the abstract mesh (for `model.constrain`)."""

  def decorate(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args)

    return wrapped

  return decorate


def sequence_logps(model: nnx.Module, rows: dict, chunk_tokens: int = 0) -> jax.Array:
  """Log-probability of each row's loss tokens, summed: [M] float32 for [M, L] rows.

  With `chunk_tokens`, the float32 logits exist one sequence chunk at a
  time, in the forward and the backward pass (see `chunked_cross_entropy`).
  """
  hidden, _ = model.hidden_states(
    rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"]
  )
  return -chunked_cross_entropy(
    hidden, model.head(), rows["targets"], rows["loss_mask"], chunk_tokens
  )


def token_loss_sum(
  model: nnx.Module, batch: dict, chunk_tokens: int = 0
) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropy over loss tokens, number of loss tokens) of [M, L] rows."""
  return -jnp.sum(sequence_logps(model, batch, chunk_tokens)), jnp.sum(batch["loss_mask"])


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``logsumexp(logits) - logits[target]`` over the last axis: [..., V] -> [...].

  The target's logit is picked by comparing the vocabulary index with the target inside a sum,
  not by a gather as in ``optax.softmax_cross_entropy_with_integer_labels``: a gather needs
  its operand in memory, so the float32 cast of bfloat16 logits would be materialised (1 GB
  per 2048 tokens of Llama 3) beside them; the compare fuses into the reductions that read
  the product's output. The values are optax's to the bit.
  """
  return jax.nn.logsumexp(logits, axis=-1) - _target_logits(logits, targets)


def _is_target(logits: jax.Array, targets: jax.Array) -> jax.Array:
  vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
  return vocab == targets[..., None]


def _target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(_is_target(logits, targets), logits, 0.0), axis=-1)


def chunked_cross_entropy(hidden, head: OutputHead, targets, mask, chunk_tokens: int) -> jax.Array:
  """Per-row sums [M] of masked cross-entropy of `hidden` [M, L, D] projected by `head`.

  The sequence is cut into chunks of at most `chunk_tokens` (a divisor of L;
  0 = one chunk) that a `lax.scan` visits, in the forward and again in the backward
  pass (`_chunked_loss`): the [M, L, V] float32 logits (67 GB for 64 rows of 2048
  tokens of Llama 3) never exist at once, only [M, chunk, V].
  """
  rows, length = targets.shape
  chunk = max(
    (c for c in range(1, min(chunk_tokens, length) + 1) if length % c == 0), default=length
  )
  if chunk == length:
    logits = project_to_vocab(hidden, head)
    return jnp.sum(cross_entropy(logits, targets) * mask, axis=-1)

  def by_chunk(x):  # [M, L, ...] -> [L / chunk, M, chunk, ...]
    return jnp.moveaxis(x.reshape(rows, length // chunk, chunk, *x.shape[2:]), 1, 0)

  # Gathered once for every chunk, forward and backward (as MaxText's unchunked loss does):
  # otherwise the backward's recomputation gathers the [D, V] head a second time.
  kernel = constrain_head(head.kernel, head.dims, hidden_axis=None)
  return _chunked_loss(
    by_chunk(hidden), kernel, by_chunk(targets), by_chunk(mask), head.dims, head.product_dtype
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_loss(hidden, kernel, targets, mask, dims, product_dtype) -> jax.Array:
  """Per-row sums [M] of masked cross-entropy over [C, M, chunk, ...] chunks: a scan.

  Its backward scan recomputes each chunk's logits and takes the softmax from the
  log-sum-exp the forward scan saved ([C, M, chunk] float32): besides sparing the
  reductions, that residual orders the forward loss before the backward pass. With
  `jax.checkpoint` instead, the loss value is needed by nothing in the backward, and XLA
  schedules its scan after it, keeping the gathered head alive through the whole
  backward pass (262 MB per chip for Llama 3 70B on v5p-1024).
  """
  return _chunked_loss_forward(hidden, kernel, targets, mask, dims, product_dtype)[0]


def _chunked_loss_forward(hidden, kernel, targets, mask, dims, product_dtype):
  head = OutputHead(kernel, dims, product_dtype)

  def add_chunk(total, chunk):
    hidden, targets, mask = chunk
    logits = project_to_vocab(hidden, head)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    losses = log_normalizer - _target_logits(logits, targets)
    return total + jnp.sum(losses * mask, axis=-1), log_normalizer

  rows = targets.shape[1]
  total, log_normalizers = jax.lax.scan(
    add_chunk, jnp.zeros((rows,), jnp.float32), (hidden, targets, mask)
  )
  return total, (hidden, kernel, targets, mask, log_normalizers)


def _chunked_loss_backward(dims, product_dtype, residuals, row_cotangents):
  hidden, kernel, targets, mask, log_normalizers = residuals

  def chunk_gradients(d_kernel, chunk):
    hidden, targets, mask, log_normalizer = chunk
    logits, pullback = jax.vjp(
      lambda h, k: project_to_vocab(h, OutputHead(k, dims, product_dtype)), hidden, kernel
    )
    # d loss / d logits = softmax - one-hot(target), per token scaled by its row's cotangent
    probabilities = jnp.exp(logits - log_normalizer[..., None])
    d_logits = jnp.where(_is_target(logits, targets), probabilities - 1.0, probabilities)
    d_hidden, d_chunk_kernel = pullback(d_logits * (mask * row_cotangents[:, None])[..., None])
    return d_kernel + d_chunk_kernel, d_hidden

  zeros = constrain_head(jnp.zeros(kernel.shape, kernel.dtype), dims, hidden_axis="fsdp")
  d_kernel, d_hidden = jax.lax.scan(
    chunk_gradients, zeros, (hidden, targets, mask, log_normalizers)
  )
  return d_hidden, d_kernel, None, None


_chunked_loss.defvjp(_chunked_loss_forward, _chunked_loss_backward)


def dpo_loss_sum(
  model: nnx.Module,
  micro_batch: dict,
  reference: nnx.Module | None,
  cfg: DPOConfig,
  chunk_tokens: int = 0,
) -> tuple[jax.Array, dict]:
  """(sum of the DPO losses of the micro-batch's pairs, sums of their statistics and "pairs").

  The reference log-probs are `micro_batch["reference_logps"]` when precomputed, else
  those of the frozen `reference` model.
  """
  policy = sequence_logps(model, micro_batch, chunk_tokens)
  if reference is None:
    reference_logps = micro_batch["reference_logps"]
  else:
    reference_logps = sequence_logps(reference, micro_batch, chunk_tokens)
  losses, statistics = dpo.pair_losses(policy, reference_logps, cfg.beta, cfg.label_smoothing)
  sums = {name: jnp.sum(values) for name, values in statistics.items()}
  return jnp.sum(losses), {"pairs": jnp.float32(losses.shape[0]), **sums}


def _accumulate(grad_fn, params, batch, reference_params, params_shardings):
  """(sum of the micro-batches' gradients, sums of "loss" and the loss's statistics) over
  the [A, ...] micro-batches of `batch`: a `lax.scan`, sharded like the parameters."""

  def accumulate(carry, micro_batch):
    grad_sum, sums = carry
    # Tied to the micro-batch, the parameters are no loop invariant that XLA could hoist:
    # their bfloat16 casts and the gathered LM head would otherwise be made once before the
    # scan and live through all of it, beside the gradient sums (0.29 GB per chip for
    # Llama 3 70B on v5p-1024 at full remat).
    step_params, micro_batch = jax.lax.optimization_barrier((params, micro_batch))
    (loss, micro_sums), grads = grad_fn(step_params, micro_batch, reference_params)
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    grad_sum = jax.lax.with_sharding_constraint(grad_sum, params_shardings)
    return (grad_sum, jax.tree.map(jnp.add, sums, {"loss": loss, **micro_sums})), None

  first = jax.tree.map(lambda x: x[0], batch)
  if batch["inputs"].shape[0] == 1:  # no accumulation: a plain step compiles simpler
    (loss, sums), grad_sum = grad_fn(params, first, reference_params)
    return grad_sum, {"loss": loss, **sums}
  zeros = jax.tree.map(jnp.zeros_like, params)
  shapes = jax.eval_shape(grad_fn, params, first, reference_params)[0]
  init_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), {"loss": shapes[0], **shapes[1]})
  (grad_sum, sums), _ = jax.lax.scan(accumulate, (zeros, init_sums), batch)
  return grad_sum, sums


def make_train_step(
  model: SplitModel,
  tx,
  schedule,
  shardings: dict,
  mesh,
  loss_chunk_tokens: int = 0,
  dpo_cfg: DPOConfig | None = None,
) -> Callable:
  """jit(step)(params, opt_state, batch, step, [reference params]) -> (params, opt_state, metrics).

  `shardings` holds "params", "opt_state", "batch" and, for DPO with a live reference,
  "reference"; params and optimizer state are donated, so an update needs no second
  copy of them. The step traces under the mesh, so the model's activation constraints
  apply. The loss is a mean over the global batch's loss tokens (SFT) or pairs (DPO,
  `dpo_cfg` given): per-micro-batch sums are accumulated and divided once, so the
  gradient does not depend on the micro-batching.
  """
  live_reference = dpo_cfg is not None and not dpo_cfg.precompute_reference
  count_name = "loss_tokens" if dpo_cfg is None else "pairs"

  def loss_sum(params, micro_batch, reference_params):
    policy = model.merged(params)
    if dpo_cfg is None:
      total, tokens = token_loss_sum(policy, micro_batch, loss_chunk_tokens)
      return total, {"loss_tokens": tokens}
    reference = None if reference_params is None else model.merged(reference_params)
    return dpo_loss_sum(policy, micro_batch, reference, dpo_cfg, loss_chunk_tokens)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  @_under_mesh(mesh)
  def step(params, opt_state, batch, step_number, reference_params=None):
    grad_sum, sums = _accumulate(grad_fn, params, batch, reference_params, shardings["params"])
    denominator = jnp.maximum(sums[count_name], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grad_sum)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {
      name: value if name == count_name else value / denominator for name, value in sums.items()
    }
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(step_number))
    kept = gmt_optax.kept_fraction(opt_state)
    if kept is not None:
      metrics["kept_fraction"] = kept
    telemetry = gmt_optax.mask_telemetry(opt_state)
    if telemetry is not None:  # per-row arrays: the Meter names them on the host
      metrics["mask"] = telemetry
    return params, opt_state, metrics

  in_shardings = (
    shardings["params"],
    shardings["opt_state"],
    shardings["batch"],
    replicated(mesh),
  )
  return jax.jit(
    step,
    in_shardings=in_shardings + ((shardings["reference"],) if live_reference else ()),
    out_shardings=(shardings["params"], shardings["opt_state"], replicated(mesh)),
    donate_argnums=(0, 1),
  )


def make_rows_step(model: SplitModel, mesh, of_rows: Callable) -> Callable:
  """jit(fn)(params, rows [M, L]) -> of_rows(model, rows), replicated: the eval steps.

  The parameters may be in any dtype, sharded like the policy's (the DPO reference)."""

  @_under_mesh(mesh)
  def on_rows(params, rows):
    return of_rows(model.merged(params), rows)

  return jax.jit(
    on_rows, in_shardings=(model.shardings, rows_sharding(mesh)), out_shardings=replicated(mesh)
  )


def reference_copy(params: dict, params_shardings: dict, dtype) -> dict:
  """A frozen copy of `params` in the compute `dtype`, sharded like them (never donated)."""
  copy = jax.jit(
    lambda p: jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), p), out_shardings=params_shardings
  )
  return copy(params)


@dataclasses.dataclass(frozen=True)
class Steps:
  """What a run needs to train and evaluate: the optimizer, shardings and jitted steps."""

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: dict  # "params", "opt_state", "batch" (per field), DPO's "reference"
  train: Callable
  eval: Callable  # (params, rows) -> (loss sum, loss tokens)
  logps: Callable  # (params, rows) -> [M] sequence log-probs (DPO: reference, held-out pairs)


def build_steps(model: SplitModel, config: Config, mesh, total_steps: int) -> Steps:
  """optimizer -> state shardings -> jitted steps of `config`, for concrete or abstract params.

  `config.train.objective` selects SFT or DPO. DPO's batch has per-row "reference_logps"
  [A, M] when the reference is precomputed; otherwise the train step takes the reference
  parameters (`reference_copy`) as a fifth argument.
  """
  dpo_cfg = config.dpo_objective
  chunk_tokens = config.model.loss_chunk_tokens
  tx, schedule = build_optimizer(config.optimizer, total_steps)
  batch = {name: batch_sharding(mesh) for name in ROW_FIELDS}
  shardings = {
    "params": model.shardings,
    "opt_state": opt_state_shardings(tx, model.params, model.shardings, mesh),
    "batch": batch,
  }
  if dpo_cfg is not None and dpo_cfg.precompute_reference:
    batch["reference_logps"] = NamedSharding(mesh, P(None, BATCH_AXES))
  elif dpo_cfg is not None:
    shardings["reference"] = model.shardings
  return Steps(
    tx,
    schedule,
    shardings,
    make_train_step(model, tx, schedule, shardings, mesh, chunk_tokens, dpo_cfg),
    make_rows_step(model, mesh, lambda m, rows: token_loss_sum(m, rows, chunk_tokens)),
    make_rows_step(model, mesh, lambda m, rows: sequence_logps(m, rows, chunk_tokens)),
  )

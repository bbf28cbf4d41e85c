"""The jitted training step, its optimizer, the device mesh and multi-host start-up.

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

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import gmt_optax
from train.config import MeshConfig, OptimizerConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every axis that is not tensor


# ----------------------------------------------------------------------------
# Multi-host and mesh


def _launched_multi_host() -> bool:
    """True when a launcher set the environment jax.distributed reads."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed(cfg: MeshConfig) -> bool:
    """Calls `jax.distributed.initialize` when the config or the launch asks for it.

    Must run before anything touches a JAX device. Returns whether it did.
    """
    wanted = cfg.distributed == "true" or (cfg.distributed == "auto" and (
        cfg.coordinator_address is not None or _launched_multi_host()))
    if not wanted:
        return False
    # CPU processes exchange collectives over gloo (tests, CPU clusters); GPU/TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)
    return True


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes; one axis may be -1 (fill)."""
    devices = jax.device_count()
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh {sizes}: sizes must be >= 1, with at most one -1 (fill)")
    if fill:
        if devices % known:
            raise ValueError(f"mesh {sizes}: {known} does not divide the {devices} devices")
        sizes[fill[0]] = devices // known
    if math.prod(sizes.values()) != devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are "
                         f"{devices}; set one axis to -1 to fill")
    # Auto axes: shardings are given to jit explicitly and XLA propagates the rest.
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh) -> NamedSharding:
    """[accumulation, micro-batch, length]: micro-batch rows split over data and fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------
# Model <-> pure parameter dict


def _fit(spec: tuple, shape: tuple, mesh) -> P:
    """Drops mesh axes that do not divide their dimension (that dimension is replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(params: nnx.State, mesh) -> dict:
    """NamedShardings from the parameters' partitioning metadata, as a pure dict.

    Works on abstract (`nnx.eval_shape`) or concrete parameters; an axis that
    does not divide its dimension (e.g. an odd vocabulary) is dropped, as the
    checkpoint loader does.
    """
    def sharding(variable):
        spec = variable.get_metadata().get("out_sharding") or ()
        return NamedSharding(mesh, _fit(spec, variable.shape, mesh))

    return nnx.to_pure_dict(jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def shard_model(model: nnx.Module, mesh) -> tuple[nnx.GraphDef, dict, nnx.State, dict]:
    """(graph, params placed by their metadata on `mesh`, rest, param shardings)."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    shardings = param_shardings(state, mesh)
    return graphdef, jax.device_put(nnx.to_pure_dict(state), shardings), rest, shardings


def merge(graphdef, params: dict, rest) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params), rest)


# ----------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
            [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.final_lr_fraction)


def _not_embeddings(params: dict) -> dict:
    """Leaf mask: True except the token embeddings and the LM head."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) in ("embed_tokens", "lm_head") for k in path),
        params)


def build_optimizer(cfg: OptimizerConfig, total_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip by global norm -> method (mask / freeze) -> AdamW with warmup + cosine.

    Clipping comes first so that every method clips the same full gradient
    (the mask is scale invariant per tensor, so its choice is unaffected);
    the mask then acts on the accumulated, clipped gradient before AdamW, as in
    the paper.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    leaf_mask = None if cfg.mask_embeddings else _not_embeddings
    if cfg.method == "sft":
        method = adamw
    elif cfg.method == "gmt":
        method = gmt_optax.gmt(adamw, cfg.mask_ratio, mask_updates=cfg.mask_updates,
                               granularity=cfg.granularity, selection=cfg.selection,
                               sample_size=cfg.sample_size, mask=leaf_mask, seed=cfg.seed)
    elif cfg.method == "random_mask":
        method = optax.chain(gmt_optax.random_mask(cfg.mask_ratio, seed=cfg.seed, mask=leaf_mask), adamw)
    else:
        method = gmt_optax.hft(adamw, freeze_fraction=cfg.hft_freeze_fraction,
                               period=cfg.hft_period, seed=cfg.seed)
    if cfg.clip_norm > 0:
        method = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), method)
    return method, schedule


def opt_state_shardings(tx, params_abstract: dict, params_shardings: dict, mesh) -> Any:
    """Moments shard like their parameters; counters and keys are replicated."""
    state = jax.eval_shape(tx.init, params_abstract)
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, state, params_shardings,
        transform_non_params=lambda _: replicated(mesh))


# ----------------------------------------------------------------------------
# Loss and steps


def token_loss_sum(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over loss tokens, number of loss tokens) of [M, L] rows."""
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.sum((log_normalizer - target_logits) * mask), jnp.sum(mask)


def make_train_step(graphdef, rest, tx, schedule, shardings: dict, mesh) -> Callable:
    """jit(step)(params, opt_state, batch, step) -> (params, opt_state, metrics).

    `shardings` holds "params", "opt_state" and "batch"; params and optimizer
    state are donated, so an update needs no second copy of them.
    """

    def loss_sum(params, micro_batch):
        return token_loss_sum(merge(graphdef, params, rest), micro_batch)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

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
        metrics = {"loss": loss_total / denominator, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(step_number), "loss_tokens": tokens}
        kept = gmt_optax.kept_fraction(opt_state)
        if kept is not None:
            metrics["kept_fraction"] = kept
        return params, opt_state, metrics

    return jax.jit(
        step,
        in_shardings=(shardings["params"], shardings["opt_state"], shardings["batch"], replicated(mesh)),
        out_shardings=(shardings["params"], shardings["opt_state"], replicated(mesh)),
        donate_argnums=(0, 1))


def make_eval_step(graphdef, rest, params_shardings: dict, mesh) -> Callable:
    """jit(eval)(params, rows [M, L]) -> (loss sum, loss tokens)."""

    def evaluate(params, rows):
        return token_loss_sum(merge(graphdef, params, rest), rows)

    rows_sharding = NamedSharding(mesh, P(BATCH_AXES, None))
    return jax.jit(evaluate, in_shardings=(params_shardings, rows_sharding),
                   out_shardings=replicated(mesh))

"""A Flax NNX decoder for the Llama family (Llama 2/3/3.1, Mistral, Qwen2/3, SmolLM2, Gemma 3).

One flat file: config, layers, model and KV cache. Parameter names mirror the
Hugging Face module names so that checkpoint mapping stays a table of regexes
(see :mod:`train.models.params`). What sets the families apart are fields of
:class:`LlamaConfig` (:data:`FAMILIES`); what sets a model's layers apart (sliding-window
or global attention, each with its RoPE) is data scanned along the stacked layers.

Scale, as MaxText and Levanter do it:

* The decoder layers are stacked (every layer parameter has a leading
  ``[num_layers]`` axis) and run by ``lax.scan``, so compile time and program
  size do not grow with depth; ``remat`` names what each scanned layer keeps for
  the backward pass (:data:`REMAT_POLICIES`, MaxText's names).
* Every parameter carries ``out_sharding`` metadata naming the mesh axes
  ``"fsdp"`` and ``"tensor"``: kernels that produce heads/features are
  ``("fsdp", "tensor")``, kernels that consume them ``("tensor", "fsdp")``
  (Megatron-style), norms are replicated, the layer axis is never sharded.
* Activations are pinned where propagation would otherwise guess: the batch
  over ``("data", "fsdp")``, heads, MLP features and vocabulary over
  ``"tensor"``. Without these, XLA keeps the weights sharded and replicates the
  activations of the whole global batch on every chip. They apply only when an
  abstract mesh is set (:func:`train.step.make_train_step` sets it), so the
  model runs unchanged on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

# model_type -> (the transformers class, the LlamaConfig fields every checkpoint of the family has).
FAMILIES = {
  "llama": ("LlamaForCausalLM", {}),
  "mistral": ("MistralForCausalLM", {}),
  "qwen2": ("Qwen2ForCausalLM", {"attention_bias": True}),
  "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
  "gemma3_text": (
    "Gemma3ForCausalLM",
    {"qk_norm": True, "norm_unit_offset": True, "sandwich_norms": True, "scale_embeddings": True},
  ),
}
# gemma3 (multimodal): the text model of its text_config; the vision tower is not loaded.
SUPPORTED_MODEL_TYPES = (*FAMILIES, "gemma3")
# Gemma3TextConfig's defaults, for the keys Gemma 3 config.json files leave out (a multimodal
# text_config lists little more than what differs from them).
_GEMMA3_TEXT_DEFAULTS = {
  "vocab_size": 262_208,
  "hidden_size": 2304,
  "intermediate_size": 9216,
  "num_hidden_layers": 26,
  "num_attention_heads": 8,
  "num_key_value_heads": 4,
  "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh",
  "max_position_embeddings": 131_072,
  "rms_norm_eps": 1e-6,
  "tie_word_embeddings": True,
  "query_pre_attn_scalar": 256,
  "sliding_window": 4096,
}
# MLP activations by their transformers name (ACT2FN): the gate of SwiGLU / GeGLU.
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-family decoder (Llama, Mistral, Qwen2/3, Gemma 3)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  model_type: str = "llama"
  hidden_act: str = "silu"  # an ACTIVATIONS name
  qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
  # Gemma: norm weights stored as w - 1 (the norm scales by 1 + w, in float32); a norm after
  # each sub-layer's output as well as before its input; embeddings times sqrt(hidden_size).
  norm_unit_offset: bool = False
  sandwich_norms: bool = False
  scale_embeddings: bool = False
  query_pre_attn_scalar: int | None = None  # queries scaled by its -1/2 power; None: head_dim
  # A sliding layer's query sees itself and the sliding_window - 1 tokens before it;
  # layer_types names each layer's kind (LAYER_TYPES). None: every layer attends to all.
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  # The RoPE base of sliding layers (Gemma 3's rope_local_base_freq, no scaling); None: the
  # global layers' RoPE.
  rope_local_theta: float | None = None

  def __hash__(self):
    # rope_scaling is a dict; the config is static jit/graph metadata, so it
    # must hash.
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

  @property
  def sliding_layers(self) -> np.ndarray:
    """bool [num_layers]: which layers attend within the sliding window."""
    types = self.layer_types or ("full_attention",) * self.num_layers
    return np.array([t == "sliding_attention" for t in types])

  @classmethod
  def from_hf(cls, hf: dict) -> "LlamaConfig":
    """Builds a config from a Hugging Face ``config.json`` dict.

    :raises ValueError: naming the unknown ``model_type`` or the field whose
      value this implementation does not support.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"config.json: unsupported model_type {model_type!r}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
      )
    if model_type == "gemma3":
      hf = {**(hf.get("text_config") or {}), "model_type": "gemma3_text"}
      model_type = "gemma3_text"
    if model_type == "gemma3_text":
      hf = {**_GEMMA3_TEXT_DEFAULTS, **hf}

    def unsupported(field, why):
      raise ValueError(f"config.json ({model_type}): unsupported {field}={hf.get(field)!r}: {why}")

    act_field = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
    hidden_act = hf.get(act_field, "silu")
    if hidden_act not in ACTIVATIONS:
      unsupported(act_field, f"implemented: {', '.join(ACTIVATIONS)}")
    if hf.get("mlp_bias", False):
      unsupported("mlp_bias", "MLP biases are not implemented")
    if model_type != "qwen2" and hf.get("attention_bias", False):
      unsupported("attention_bias", "o_proj bias is not implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      unsupported("partial_rotary_factor", "only full rotary embeddings")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
      if hf.get(field) is not None:
        unsupported(field, "soft-capping (Gemma 2) is not implemented")
    if hf.get("use_bidirectional_attention"):
      unsupported("use_bidirectional_attention", "only causal attention is implemented")

    num_layers = hf["num_hidden_layers"]
    sliding_window, layer_types = _sliding_window(hf, model_type, num_layers, unsupported)
    rope_theta, rope_scaling, rope_local_theta = _rope(hf, model_type, unsupported)
    num_heads = hf["num_attention_heads"]
    return cls(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      model_type=model_type,
      hidden_act=hidden_act,
      query_pre_attn_scalar=hf["query_pre_attn_scalar"] if model_type == "gemma3_text" else None,
      sliding_window=sliding_window,
      layer_types=layer_types,
      rope_local_theta=rope_local_theta,
      **FAMILIES[model_type][1],
    )

  def to_hf(self) -> dict:
    """The Hugging Face ``config.json`` dict (float32 weights)."""
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope.update(self.rope_scaling)
    hf = {
      "architectures": [FAMILIES[self.model_type][0]],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": self.hidden_act,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": rope if self.rope_scaling else None,
      "rope_parameters": rope,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": self.attention_bias,
      "torch_dtype": "float32",
      "dtype": "float32",
    }
    layer_types = list(self.layer_types or ("full_attention",) * self.num_layers)
    if self.model_type in ("qwen2", "qwen3"):
      hf.update(
        use_sliding_window=self.sliding_window is not None,
        sliding_window=self.sliding_window,
        max_window_layers=self.num_layers,  # unused: layer_types names each layer
        layer_types=layer_types,
      )
    elif self.model_type == "mistral":
      hf["sliding_window"] = self.sliding_window
    elif self.model_type == "gemma3_text":
      del hf["hidden_act"]
      hf.update(
        hidden_activation=self.hidden_act,
        query_pre_attn_scalar=self.query_pre_attn_scalar,
        sliding_window=self.sliding_window,
        layer_types=layer_types,
        rope_local_base_freq=self.rope_local_theta,
        rope_parameters={
          "full_attention": rope,
          "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta},
        },
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
      )
    else:
      hf["mlp_bias"] = False
    return hf


def _sliding_window(hf: dict, model_type: str, num_layers: int, unsupported) -> tuple:
  """``(sliding_window, layer_types)`` as transformers reads them for ``model_type``:
  Mistral slides in every layer, Qwen2/3 (``use_sliding_window``) in the layers from
  ``max_window_layers`` on, Gemma 3 in all but every ``sliding_window_pattern``-th."""
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None
  if window is None:
    return None, None
  if model_type == "llama":
    unsupported("sliding_window", "LlamaForCausalLM has no sliding window (model_type mistral has)")
  if not isinstance(window, int) or window < 1:
    unsupported("sliding_window", "expected a positive number of tokens")
  layer_types = hf.get("layer_types")
  if model_type == "mistral":
    layer_types = ["sliding_attention"] * num_layers
  elif layer_types is None and model_type == "gemma3_text":
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    layer_types = [
      "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    ]
  elif layer_types is None:
    first = hf.get("max_window_layers", num_layers)
    layer_types = [
      "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
    ]
  if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
    unsupported("layer_types", f"expected {num_layers} of {LAYER_TYPES}")
  return window, tuple(layer_types)


def _rope(hf: dict, model_type: str, unsupported) -> tuple:
  """``(rope_theta, rope_scaling, rope_local_theta)``: transformers 5 writes
  ``rope_parameters`` (Gemma 3: one per layer type), older files ``rope_scaling`` and
  ``rope_theta`` (Gemma 3: and ``rope_local_base_freq``). A top-level key comes first."""
  parameters = hf.get("rope_parameters") or {}
  by_layer_type = "full_attention" in parameters
  rope = hf.get("rope_scaling") or (parameters["full_attention"] if by_layer_type else parameters)
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
  theta = hf.get("rope_theta") or rope.get("rope_theta") or default_theta
  scaling = _rope_scaling(rope, field, unsupported)
  if model_type != "gemma3_text":
    return float(theta), scaling, None
  local = parameters.get("sliding_attention") or {}
  if _rope_scaling(local, "rope_parameters", unsupported):
    unsupported("rope_parameters", "RoPE scaling of the sliding layers is not implemented")
  local_theta = hf.get("rope_local_base_freq") or local.get("rope_theta") or 10000.0
  return float(theta), scaling, float(local_theta)


def _rope_scaling(rope: dict, field: str, unsupported) -> dict | None:
  """The ``rope_scaling`` of a RoPE mapping: None for the default, else its keys."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  keys = _ROPE_SCALING_KEYS.get(rope_type)
  if keys is None:
    unsupported(field, f"rope type {rope_type!r} (implemented: {', '.join(_ROPE_SCALING_KEYS)})")
  missing = [key for key in keys if key not in rope]
  if missing:
    unsupported(field, f"rope type {rope_type!r} needs {missing}")
  if not keys:
    return None
  return {"rope_type": rope_type, **{key: cast(rope[key]) for key, cast in keys.items()}}


# The keys of each implemented rope_type (see rope_inv_freq).
_ROPE_SCALING_KEYS = {
  "default": {},
  "linear": {"factor": float},
  "llama3": {
    "factor": float,
    "low_freq_factor": float,
    "high_freq_factor": float,
    "original_max_position_embeddings": int,
  },
}


BATCH = ("data", "fsdp")  # mesh axes the batch is split over (every axis but tensor)


def fit_spec(spec: tuple, shape: tuple, mesh) -> P:
  """Drops mesh axes that do not divide their dimension (that dimension is replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def constrain(x: jax.Array, *spec) -> jax.Array:
  """Pins the sharding of activation ``x`` to ``spec`` under an abstract mesh; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))


def _mesh_active() -> bool:
  return not jax.sharding.get_abstract_mesh().empty


# What each decoder layer keeps for the backward pass, by MaxText's `remat_policy` names
# (its decoders.py): the layer outputs tagged with `checkpoint_name` that are saved;
# everything else is recomputed. "none": no rematerialisation (all activations kept);
# "full": nothing but the layer's input (the scan carry). (MaxText's save_dot_except_mlpwi
# would equal save_dot_except_mlp here: down_proj's output is not needed by the backward pass.)
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
REMAT_POLICIES = {  # from the most kept to the least
  "none": None,
  # every matmul output of the layer (MaxText's save-dots-without-batch "minimal")
  "minimal": _ATTENTION_PROJECTIONS + ("o_proj", "gate_proj", "up_proj", "down_proj"),
  "save_dot_except_mlp": _ATTENTION_PROJECTIONS + ("o_proj",),
  "save_qkv_proj": _ATTENTION_PROJECTIONS,
  "full": (),
}


def remat_policy_name(remat: bool | str) -> str:
  """The :data:`REMAT_POLICIES` name of ``remat``: ``True`` is ``"full"``, ``False`` ``"none"``.

  :raises ValueError: listing the allowed names for anything else.
  """
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected true, false or one of {list(REMAT_POLICIES)}")
  return remat


def _param(rngs, init, shape, sharding, param_dtype):
  # Shard eagerly only inside a mesh context, so the model also builds on a
  # single device without one.
  return nnx.Param(
    init(rngs.params(), shape, param_dtype), out_sharding=sharding, eager_sharding=_mesh_active()
  )


def gathered(x: jax.Array, spec: tuple) -> jax.Array:
  """``x`` (a weight in the compute dtype) all-gathered over ``fsdp`` just before use:
  FSDP. Its gradient is reduce-scattered back. Without it, XLA may keep the weight
  sharded and move (all-reduce) activations instead."""
  return constrain(x, *(None if axis == "fsdp" else axis for axis in spec))


class Linear(nnx.Module):
  """``y = x @ kernel (+ bias)``; kernel is ``[in, out]``."""

  def __init__(self, din, dout, *, sharding, use_bias=False, rngs, dtype, param_dtype):
    self.kernel = _param(rngs, nnx.initializers.normal(0.02), (din, dout), sharding, param_dtype)
    self.bias = (
      _param(rngs, nnx.initializers.zeros, (dout,), sharding[1:], param_dtype) if use_bias else None
    )
    self.sharding = sharding
    self.dtype = dtype

  def __call__(self, x):
    # A 2-D matmul: XLA:CPU runs the weight gradient of a [B, S, D] dot
    # (two contracting dims) several times slower.
    kernel = gathered(self.kernel[...].astype(self.dtype), self.sharding)
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[1])
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, as the reference implementation does.

  ``unit_offset`` (Gemma): the weight stores ``w - 1`` (initialised to zeros), and the scale
  ``1 + w`` multiplies in float32 before the cast, as transformers' Gemma3RMSNorm does;
  otherwise the normed input is cast first, then scaled (Llama).
  """

  def __init__(self, dim, eps, *, unit_offset=False, rngs, dtype, param_dtype):
    init = nnx.initializers.zeros if unit_offset else nnx.initializers.ones
    self.weight = _param(rngs, init, (dim,), (None,), param_dtype)
    self.eps = eps
    self.unit_offset = unit_offset
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(self.dtype)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(config: LlamaConfig, sliding: bool = False) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2] of the global layers, with their scaling
  (linear, Llama 3.1) if set; ``sliding``: of the sliding layers (``rope_local_theta``)."""
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  if sliding and config.rope_local_theta is not None:
    return (1.0 / (np.float32(config.rope_local_theta) ** exponent)).astype(np.float32)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  scaling = config.rope_scaling
  if scaling and scaling["rope_type"] == "linear":
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
  if scaling:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
  """Rotates ``x`` [B, S, heads, head_dim] (half-split layout, as in HF)."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x * cos + _rotate_half(x) * sin).astype(x.dtype)


def _scores(q, k, mask):
  s = jnp.einsum("bkqh,bkth->bkqt", q, k, preferred_element_type=jnp.float32)
  return jnp.where(mask, s, jnp.finfo(jnp.float32).min)


def _probs(scores, lse, mask):
  # Explicit zeros: a fully masked (padding) row would otherwise get
  # exp(min - min) = 1 everywhere, since min + log(T) rounds to min.
  return jnp.where(mask, jnp.exp(scores - lse), 0.0)


def attention(q, k, v, mask):
  """Softmax attention of grouped queries; k/v heads are never repeated.

  Args:
    q: [B, S, K, G, H] queries (already scaled), G query heads per kv head.
    k: [B, T, K, H]; ``v`` likewise.
    mask: bool [B, S, T], True where query s may attend to key t.

  Returns:
    [B, S, K, G, H]; zeros for a query that may attend to nothing.
  """
  b, s, k_heads, groups, h = q.shape
  # Batch-major layouts ([B, K, G*S, H] against [B, K, T, H]) keep every
  # [.., S, T] array in the plain row-major layout of a batched matmul.
  q = q.transpose(0, 2, 3, 1, 4).reshape(b, k_heads, groups * s, h)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  mask = jnp.broadcast_to(mask[:, None, None], (b, 1, groups, s, mask.shape[-1]))
  out = _attention(q, k, v, mask.reshape(b, 1, groups * s, -1))
  return out.reshape(b, k_heads, groups, s, h).transpose(0, 3, 1, 2, 4)


@jax.custom_vjp
def _attention(q, k, v, mask):
  """The backward pass recomputes the probabilities from the saved log-sum-exp
  (as flash attention does) instead of keeping [.., S, T] float32
  intermediates alive."""
  return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
  scores = _scores(q, k, mask)
  lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
  probs = _probs(scores, lse, mask).astype(v.dtype)
  out = jnp.einsum("bkqt,bkth->bkqh", probs, v)
  return out, (q, k, v, mask, lse, out)


def _attention_bwd(res, d_out):
  q, k, v, mask, lse, out = res
  probs = _probs(_scores(q, k, mask), lse, mask)
  d_v = jnp.einsum("bkqt,bkqh->bkth", probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum("bkqh,bkth->bkqt", d_out, v, preferred_element_type=jnp.float32)
  # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = <dO, O>.
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs * (d_probs - row)).astype(q.dtype)
  d_q = jnp.einsum("bkqt,bkth->bkqh", d_scores, k)
  d_k = jnp.einsum("bkqt,bkqh->bkth", d_scores, q)
  return d_q, d_k, d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)

ATTENTION_KINDS = ("xla", "splash", "cudnn")


def splash_attention(q, k, v, segment_ids, *, window: int | None = None, interpret: bool = False):
  """Causal attention within packed segments by the TPU splash kernel (Pallas).

  Same contract as :func:`attention` with the mask of ``segment_ids`` [B, S]
  (0 = padding, whose outputs are unspecified), within a sliding ``window`` if given
  (:func:`packing_mask`; the kernel then skips the blocks outside it). The kernel is not
  auto-partitioned, so under a mesh it runs in ``shard_map``: rows over the
  batch axes, kv heads over ``tensor``. ``interpret`` runs it on any backend
  (tests).
  """
  # Here: the Pallas TPU kernels load only when splash attention is chosen.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  b, s, k_heads, groups, h = q.shape

  def local(q, k, v, segment_ids):
    # One kv head serves its group of query heads: the kernel's multi-query form.
    # LocalMask's window counts the keys before the query: window - 1 of them, then itself.
    mask = (
      masks.CausalMask((s, s)) if window is None else masks.LocalMask((s, s), (window - 1, 0), 0)
    )
    kernel = splash.make_splash_mqa_single_device(
      masks.MultiHeadMask([mask] * groups), interpret=interpret
    )

    def one_row(q, k, v, segment_ids):  # q [K, G, S, H], k/v [K, S, H], segment_ids [S]
      ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(
      q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids
    )
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)

  return _per_shard(local, q, k, v, segment_ids)


def _per_shard(local, q, k, v, segment_ids):
  """``local(q, k, v, segment_ids)`` on each shard: a kernel that XLA does not partition
  runs in ``shard_map`` under a mesh, rows over the batch axes and kv heads over ``tensor``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, segment_ids)
  heads = fit_spec((BATCH, None, "tensor", None, None), q.shape, mesh)
  kv = fit_spec((BATCH, None, "tensor", None), k.shape, mesh)
  rows = P(heads[0], None)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(heads, kv, kv, rows), out_specs=heads, check_vma=False
  )(q, k, v, segment_ids)


def packing_mask(q_segment_ids, kv_segment_ids, q_slots, kv_slots, window: int | None = None):
  """bool [B, S, T]: query s may attend to key t, an earlier (or the same) slot of the same
  nonzero segment, and with a sliding ``window`` fewer than ``window`` slots before it (as
  transformers' sliding-window mask). Segment ids are [B, S] and [B, T], slots (positions in
  the row or cache) [S] and [T]."""
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  distance = q_slots[:, None] - kv_slots[None, :]
  causal = (distance >= 0) if window is None else (distance >= 0) & (distance < window)
  return same_segment & (kv_segment_ids[:, None, :] != 0) & causal[None]


def cudnn_attention(q, k, v, segment_ids, *, window: int | None = None, implementation="cudnn"):
  """Causal attention within packed segments by cuDNN's fused (flash) kernel.

  Same contract as :func:`splash_attention`: the :func:`packing_mask` of
  ``segment_ids`` [B, S] (and ``window``) goes to the kernel as its mask, with ``is_causal``
  (and ``local_window_size``) so that it skips the blocks above the diagonal (and before
  the window); outputs at padding (segment 0) are unspecified. Needs an NVIDIA GPU (see :func:`resolve_attention`);
  ``implementation="xla"`` makes the same call on any backend (tests).
  """

  def local(q, k, v, segment_ids):
    b, s, _, _, h = q.shape
    slots = jnp.arange(s)
    mask = packing_mask(segment_ids, segment_ids, slots, slots, window)[:, None]  # [B, 1, S, S]
    # Query head k * G + g is the g-th of kv head k: the grouping the kernel assumes.
    out = jax.nn.dot_product_attention(
      q.reshape(b, s, -1, h),
      k,
      v,
      mask=mask,
      scale=1.0,
      is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation,
    )
    return out.reshape(q.shape)

  return _per_shard(local, q, k, v, segment_ids)


@functools.cache
def cudnn_unavailable() -> str | None:
  """Why cuDNN's fused attention does not compile on this host's default backend, or None."""
  if jax.default_backend() != "gpu":
    return f"the default backend is {jax.default_backend()}, not an NVIDIA GPU"
  probe = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
  try:
    jax.jit(attend).lower(probe, probe, probe).compile()
  except Exception as e:  # any failure (no cuDNN, old GPU or cuDNN): say which
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def resolve_attention(kind: str, platform: str) -> str:
  """The attention implementation for ``kind`` on devices of ``platform``.

  Args:
    kind: one of :data:`ATTENTION_KINDS` or ``"auto"``: :func:`splash_attention`
      on TPU, :func:`cudnn_attention` on a GPU where cuDNN's fused kernel
      compiles, :func:`attention` (XLA) otherwise; one log line says which.
    platform: ``jax.Device.platform`` of the devices that run the model
      (``"tpu"``, ``"gpu"``, ``"cpu"``).

  :raises ValueError: for an unknown ``kind``, and for ``"cudnn"`` where it
    does not compile, with the reason.
  """
  if kind not in ATTENTION_KINDS + ("auto",):
    raise ValueError(f"attention={kind!r}: expected auto or one of {ATTENTION_KINDS}")
  if kind not in ("auto", "cudnn"):
    return kind
  if platform == "gpu":
    why_not = cudnn_unavailable()
  else:
    why_not = f"the devices are {platform}, not NVIDIA GPUs"
  if kind == "cudnn":
    if why_not:
      raise ValueError(
        f"attention='cudnn': cuDNN fused attention is unavailable ({why_not}); "
        "use attention=auto (falls back to xla) or xla"
      )
    return kind
  chosen = {"tpu": "splash", "gpu": "xla" if why_not else "cudnn"}.get(platform, "xla")
  if platform == "gpu" and why_not:
    log.warning("attention=auto: cuDNN fused attention unavailable (%s); using xla", why_not)
  else:
    log.info("attention=auto: %s on %s", chosen, platform)
  return chosen


class Attention(nnx.Module):
  """Grouped-query attention; k/v heads are never repeated in memory."""

  def __init__(self, config: LlamaConfig, *, rngs, dtype, param_dtype):
    d, h = config.hidden_size, config.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    bias = config.attention_bias
    self.q_proj = Linear(d, config.num_heads * h, sharding=("fsdp", "tensor"), use_bias=bias, **kw)
    self.k_proj = Linear(
      d, config.num_kv_heads * h, sharding=("fsdp", "tensor"), use_bias=bias, **kw
    )
    self.v_proj = Linear(
      d, config.num_kv_heads * h, sharding=("fsdp", "tensor"), use_bias=bias, **kw
    )
    self.o_proj = Linear(config.num_heads * h, d, sharding=("tensor", "fsdp"), **kw)
    if config.qk_norm:
      norm = functools.partial(
        RMSNorm, h, config.rms_norm_eps, unit_offset=config.norm_unit_offset, **kw
      )
      self.q_norm, self.k_norm = norm(), norm()
    self.qk_norm = config.qk_norm
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, h
    self.query_scale = (config.query_pre_attn_scalar or h) ** -0.5
    self.dtype = dtype

  def __call__(self, x, cos, sin, attend, layer_cache=None, cache_index=None):
    """``attend(q, k, v)``: :func:`attention` with its mask bound, or a kernel with the segments bound."""
    b, s, _ = x.shape
    k_heads, groups, h = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
    heads = (BATCH, None, "tensor", None)
    q, k, v = (
      constrain(checkpoint_name(proj(x), name).reshape(b, s, -1, h), *heads)
      for proj, name in ((self.q_proj, "q_proj"), (self.k_proj, "k_proj"), (self.v_proj, "v_proj"))
    )
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if layer_cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    q = q.reshape(b, s, k_heads, groups, h) * jnp.asarray(self.query_scale, self.dtype)
    out = attend(q, k, v).reshape(b, s, self.num_heads * h)
    return checkpoint_name(self.o_proj(out), "o_proj"), new_cache


class MLP(nnx.Module):
  """Gated: ``down(act(gate(x)) * up(x))``, SwiGLU (silu) or GeGLU (tanh GELU, Gemma)."""

  def __init__(self, config: LlamaConfig, *, rngs, dtype, param_dtype):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Linear(d, f, sharding=("fsdp", "tensor"), **kw)
    self.up_proj = Linear(d, f, sharding=("fsdp", "tensor"), **kw)
    self.down_proj = Linear(f, d, sharding=("tensor", "fsdp"), **kw)
    self.hidden_act = config.hidden_act

  def __call__(self, x):
    features = (BATCH, None, "tensor")
    gate = constrain(checkpoint_name(self.gate_proj(x), "gate_proj"), *features)
    up = constrain(checkpoint_name(self.up_proj(x), "up_proj"), *features)
    act = ACTIVATIONS[self.hidden_act]
    return checkpoint_name(self.down_proj(act(gate) * up), "down_proj")


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks with residual connections.

  With ``sandwich_norms`` (Gemma) each block's output is normed too before it joins the
  residual: then ``post_attention_layernorm`` norms the attention output (in Llama it is the
  MLP's input norm) and ``pre_feedforward_layernorm`` the MLP's input.
  """

  def __init__(self, config: LlamaConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm = functools.partial(
      RMSNorm, config.hidden_size, config.rms_norm_eps, unit_offset=config.norm_unit_offset, **kw
    )
    self.input_layernorm = norm()
    self.self_attn = Attention(config, **kw)
    self.post_attention_layernorm = norm()
    if config.sandwich_norms:
      self.pre_feedforward_layernorm = norm()
      self.post_feedforward_layernorm = norm()
    self.sandwich_norms = config.sandwich_norms
    self.mlp = MLP(config, **kw)

  def __call__(self, x, cos, sin, attend, layer_cache=None, cache_index=None):
    attn, new_cache = self.self_attn(
      self.input_layernorm(x), cos, sin, attend, layer_cache, cache_index
    )
    if self.sandwich_norms:
      x = x + self.post_attention_layernorm(attn)
      x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    else:
      x = x + attn
      x = x + self.mlp(self.post_attention_layernorm(x))
    return x, new_cache


class Llama(nnx.Module):
  """Llama-family causal LM.

  Args:
    config: model shape and numerics.
    rngs: parameter initialisation keys.
    dtype: compute dtype (activations); logits are always float32.
    param_dtype: parameter storage dtype.
    remat: what each decoder layer keeps for the backward pass: a
      :data:`REMAT_POLICIES` name, or ``True`` (``"full"``: only the layer
      inputs) / ``False`` (``"none"``: everything).
    attention: ``"xla"`` (:func:`attention`, any backend), ``"splash"``
      (the TPU Pallas kernel, :func:`splash_attention`), ``"cudnn"``
      (:func:`cudnn_attention`, NVIDIA GPUs) or ``"auto"`` (see
      :func:`resolve_attention`, for this host's default backend). The kernels
      serve training and prefill; decoding with a cache uses the XLA path.
    logits_dot_in_fp32: the output projection's product in float32; ``False``
      (MaxText's default) keeps it in the compute dtype, then casts the logits to float32.
  """

  def __init__(
    self,
    config: LlamaConfig,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    attention: str = "xla",
    logits_dot_in_fp32: bool = False,
  ):
    self.config = config
    self.dtype = dtype
    self.logits_dot_in_fp32 = logits_dot_in_fp32
    self.remat = remat_policy_name(remat)
    self.attention = resolve_attention(attention, jax.default_backend())
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = _param(
      rngs,
      nnx.initializers.normal(0.02),
      (config.vocab_size, config.hidden_size),
      ("tensor", "fsdp"),
      param_dtype,
    )

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def stacked_layers(rngs):
      return DecoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.layers = stacked_layers(rngs)  # every parameter [num_layers, ...]
    self.norm = RMSNorm(
      config.hidden_size, config.rms_norm_eps, unit_offset=config.norm_unit_offset, **kw
    )
    self.lm_head = (
      None
      if config.tie_word_embeddings
      else Linear(config.hidden_size, config.vocab_size, sharding=("fsdp", "tensor"), **kw)
    )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens.

    ``index`` is the next slot to write; ``segment_ids`` marks filled slots
    (0 = empty or padding), so left-padded rows never attend to padding.
    """
    c = self.config
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    dtype = dtype or self.dtype
    return {
      "index": jnp.zeros((), jnp.int32),
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
    }

  @property
  def num_params(self) -> int:
    """Number of parameter entries."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  def __call__(self, input_ids, *, positions=None, segment_ids=None, cache=None):
    """Logits [B, S, V] float32, or ``(logits, new_cache)`` when ``cache`` is given.

    Arguments as in :meth:`hidden_states`.
    """
    hidden, new_cache = self.hidden_states(
      input_ids, positions=positions, segment_ids=segment_ids, cache=cache
    )
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)

  def head(self) -> OutputHead:
    """The output projection in the compute dtype, as the logits contract it."""
    product_dtype = jnp.float32 if self.logits_dot_in_fp32 else self.dtype
    if self.lm_head is None:  # tied: contract with the [V, D] embedding directly
      kernel, dims = self.embed_tokens[...], (((1,), (1,)), ((), ()))
    else:
      kernel, dims = self.lm_head.kernel[...], (((1,), (0,)), ((), ()))
    return OutputHead(kernel.astype(self.dtype), dims, product_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final hidden states [..., D], vocabulary over tensor."""
    return project_to_vocab(hidden, self.head())

  def hidden_states(self, input_ids, *, positions=None, segment_ids=None, cache=None):
    """``(final normed hidden states [B, S, D], new cache or None)``.

    Args:
      input_ids: int32 [B, S].
      positions: int32 [B, S] RoPE positions; default ``arange(S)``
        (offset by the cache index when decoding).
      segment_ids: int32 [B, S] for packing: a token attends to earlier
        tokens of the same nonzero segment only; 0 marks padding.
      cache: a pytree from :meth:`init_cache`.
    """
    b, s = input_ids.shape
    start = 0 if cache is None else cache["index"]
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    q_seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
    q_slot = start + jnp.arange(s)
    if cache is None:
      kv_seg, kv_slot = q_seg, q_slot
    else:
      kv_seg = jax.lax.dynamic_update_slice(
        cache["segment_ids"], q_seg.astype(jnp.int32), (0, start)
      )
      kv_slot = jnp.arange(kv_seg.shape[1])
    window = self.config.sliding_window
    kernels = {"splash": splash_attention, "cudnn": cudnn_attention}
    if self.attention in kernels and cache is None:
      full = functools.partial(kernels[self.attention], segment_ids=q_seg)
      sliding = functools.partial(full, window=window)
    else:
      full = functools.partial(attention, mask=packing_mask(q_seg, kv_seg, q_slot, kv_slot))
      sliding = functools.partial(
        attention, mask=packing_mask(q_seg, kv_seg, q_slot, kv_slot, window)
      )
    attend = _by_layer_kind(self.config.sliding_layers, full, sliding)

    def rope(inv_freq):
      freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
      freqs = jnp.concatenate([freqs, freqs], axis=-1)
      return jnp.cos(freqs).astype(self.dtype), jnp.sin(freqs).astype(self.dtype)

    full_rope = rope(rope_inv_freq(self.config))
    sliding_rope = rope(rope_inv_freq(self.config, sliding=True))

    # Cast before the lookup (the same values): the table's gradient then reaches the
    # parameter in the compute dtype, and its all-to-all moves half the bytes.
    table = constrain(self.embed_tokens[...].astype(self.dtype), None, "fsdp")
    x = constrain(jnp.take(table, input_ids, axis=0), None, None, "fsdp")
    if self.config.scale_embeddings:  # the scale rounded to the compute dtype, as transformers
      x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
    x = constrain(x, BATCH, None, "tensor")
    layers_graph, layers_state = nnx.split(self.layers)

    def layer_step(x, layer_inputs):
      layer_state, layer_cache, is_sliding = layer_inputs
      layer = nnx.merge(layers_graph, layer_state)
      # The layer's kind is scanned data, so one layer body serves sliding and full layers.
      cos, sin = (jnp.where(is_sliding, s, f) for s, f in zip(sliding_rope, full_rope))
      layer_attend = functools.partial(attend, is_sliding=is_sliding)
      x, new_layer_cache = layer(x, cos, sin, layer_attend, layer_cache, start)
      return constrain(x, BATCH, None, "tensor"), new_layer_cache

    saved = REMAT_POLICIES[self.remat]
    if saved is not None:
      layer_step = jax.checkpoint(
        layer_step,
        prevent_cse=False,
        policy=jax.checkpoint_policies.save_only_these_names(*saved),
      )
    layer_caches = None if cache is None else cache["layers"]
    is_sliding = jnp.asarray(self.config.sliding_layers)
    x, new_layer_caches = jax.lax.scan(layer_step, x, (layers_state, layer_caches, is_sliding))
    x = self.norm(x)
    if cache is None:
      return x, None
    return x, {"index": start + s, "segment_ids": kv_seg, "layers": new_layer_caches}


def _by_layer_kind(sliding_layers: np.ndarray, full, sliding):
  """``attend(q, k, v, is_sliding)``: ``sliding`` in the sliding layers, ``full`` in the others.

  ``is_sliding`` is a traced bool scanned along the layers, so ``lax.cond`` picks the
  attention of each layer; a model whose layers are all of one kind compiles only that one.
  """
  if sliding_layers.all() or not sliding_layers.any():
    only = sliding if sliding_layers.all() else full
    return lambda q, k, v, is_sliding: only(q, k, v)
  return lambda q, k, v, is_sliding: jax.lax.cond(is_sliding, sliding, full, q, k, v)


def abstract_model(config: LlamaConfig, **options) -> tuple:
  """``(graphdef, abstract params, rest)`` of ``Llama(config, **options)``, allocating nothing.

  The params are ``jax.ShapeDtypeStruct`` leaves with their sharding metadata: what
  shardings, optimizer state and ahead-of-time compiles are derived from.
  """
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), **options))
  return nnx.split(abstract, nnx.Param, ...)


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model as the jitted steps take it: its graph, its parameters as a pure dict
  (arrays, or ``ShapeDtypeStruct``s for an ahead-of-time plan), the rest of its state,
  and the parameters' shardings."""

  graphdef: nnx.GraphDef
  params: dict
  rest: nnx.State
  shardings: dict

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params))

  def merged(self, params: dict | None = None) -> Llama:
    """The module with ``params`` (default: this model's own)."""
    return nnx.merge(self.graphdef, nnx.State(self.params if params is None else params), self.rest)


class OutputHead(NamedTuple):
  """The output projection as the logits contract it (:meth:`Llama.head`)."""

  kernel: jax.Array  # [D, V], or the tied [V, D] embedding; in the compute dtype
  dims: tuple  # dot_general dimension numbers of flat hidden states [N, D] with `kernel`
  product_dtype: Any  # the product's output dtype, before the logits' cast to float32


def constrain_head(kernel: jax.Array, dims: tuple, hidden_axis: str | None) -> jax.Array:
  """Pins the output projection (or its gradient) as :meth:`Llama.head` contracts it with
  ``dims``: the vocabulary over ``tensor``, the hidden dimension over ``hidden_axis``
  (``"fsdp"``: the parameter's own sharding; ``None``: gathered)."""
  contracted = dims[0][1][0]
  return constrain(
    kernel, *(hidden_axis if d == contracted else "tensor" for d in range(kernel.ndim))
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _vocab_product(flat: jax.Array, kernel: jax.Array, dims: tuple, product_dtype) -> jax.Array:
  """``flat @ kernel`` out in ``product_dtype``, whose gradients come out in ``kernel.dtype``.

  JAX's own transpose of a float32-output product would make the head's gradient a float32
  [D, V] product (2 GB for Llama 3) from upcast operands. Here the cotangent is cast to the
  compute dtype first and both gradient products come out in it, as with MaxText's
  bfloat16 logits; in float32 nothing changes.
  """
  return jax.lax.dot_general(flat, kernel, dims, preferred_element_type=product_dtype)


def _vocab_product_forward(flat, kernel, dims, product_dtype):
  return _vocab_product(flat, kernel, dims, product_dtype), (flat, kernel)


def _vocab_product_backward(dims, product_dtype, residuals, cotangent):
  flat, kernel = residuals
  _, pullback = jax.vjp(lambda f, k: jax.lax.dot_general(f, k, dims), flat, kernel)
  d_flat, d_kernel = pullback(cotangent.astype(kernel.dtype))
  # Reduced to the head's own sharding here, once per projection: left replicated, the head's
  # gradient would be summed over the loss chunks and micro-steps as a full [D, V] copy.
  d_kernel = constrain_head(d_kernel, dims, hidden_axis="fsdp")
  if jax.sharding.get_abstract_mesh().size > 1:
    # The barrier makes the shard now: TPU reduces it as an all-reduce of the full [D, V]
    # and a slice, which XLA would otherwise fuse into the gradient sum at the end of the
    # micro-step, holding the full product through the backward pass (262 MB per chip at
    # 70B). On one device there is nothing to reduce, and the barrier would only keep the
    # product from fusing into the sum (a 1.4% slower step for the Colab recipe).
    d_kernel = jax.lax.optimization_barrier(d_kernel)
  return d_flat, d_kernel


_vocab_product.defvjp(_vocab_product_forward, _vocab_product_backward)


def project_to_vocab(hidden: jax.Array, head: OutputHead) -> jax.Array:
  """Float32 logits of ``hidden`` [..., D] against ``head``.

  The product comes out in ``head.product_dtype`` and is cast to float32 after: with a
  bfloat16 product (``model.logits_dot_in_fp32: false``, MaxText's default) the [tokens, V]
  buffer in memory is bfloat16, and the float32 cast fuses into the loss's reductions.
  """
  flat = hidden.reshape(-1, hidden.shape[-1])  # a 2-D matmul (fast weight gradient on CPU)
  logits = _vocab_product(flat, head.kernel, head.dims, head.product_dtype)
  logits = logits.reshape(*hidden.shape[:-1], logits.shape[-1])
  spec = (BATCH,) + (None,) * (hidden.ndim - 2) + ("tensor",)
  return constrain(logits, *spec).astype(jnp.float32)

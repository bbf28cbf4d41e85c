"""Parameters by name: the Hugging Face <-> NNX name table and building a sharded model from it.

Names are mapped by one table (:data:`NAME_TABLE`) used in both directions:
Hugging Face ``model.layers.3.mlp.up_proj.weight`` <-> slice 3 of the stacked
NNX ``layers.mlp.up_proj.kernel`` (``[num_layers, in, out]``). HF linear
weights are ``[out, in]``, NNX kernels ``[in, out]``, hence the transpose flag.
Checkpoint formats (`train.models.pretrained` for HF safetensors, `train.models.gguf_import`
for llama.cpp GGUF) only produce ``(name, read)`` streams; :func:`build_model`
turns a stream into a model whose every tensor sits in its ``NamedSharding``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models.decoder import Llama, LlamaConfig, fit_spec

# (Hugging Face name, NNX path, transpose). ``{i}`` is a layer index: slice
# ``i`` of the stacked NNX parameter; ``{p}`` a projection name.
NAME_TABLE = [
  ("model.embed_tokens.weight", "embed_tokens", False),
  ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.self_attn.{p}_proj.kernel", True),
  ("model.layers.{i}.self_attn.{p}_proj.bias", "layers.self_attn.{p}_proj.bias", False),
  ("model.layers.{i}.self_attn.{p}_norm.weight", "layers.self_attn.{p}_norm.weight", False),
  ("model.layers.{i}.mlp.{p}_proj.weight", "layers.mlp.{p}_proj.kernel", True),
  ("model.layers.{i}.{p}_layernorm.weight", "layers.{p}_layernorm.weight", False),
  ("model.norm.weight", "norm.weight", False),
  ("lm_head.weight", "lm_head.kernel", True),
]
# HF tensors that carry no parameters of the decoder: RoPE buffers (old checkpoints), the
# vision tower of a multimodal Gemma 3 (model_type gemma3), whose text model is loaded.
_IGNORED_HF = re.compile(
  r".*rotary_emb\.inv_freq$|(model\.)?(vision_tower|multi_modal_projector)\."
)
# The text model's tensors in multimodal Gemma 3 checkpoints (transformers 5, then 4), read
# as the names of the text-only model (Gemma3ForCausalLM).
_HF_ALIASES = (
  (re.compile(r"^(model\.language_model|language_model\.model)\."), "model."),
  (re.compile(r"^language_model\.lm_head\."), "lm_head."),
)


def _template_regex(template: str) -> re.Pattern:
  pattern = (
    re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z_]+?)")
  )
  return re.compile(pattern + "$")


def translate_name(name: str, table, src: int, dst: int, **fields):
  """Maps ``name`` through a name table (here or in `train.models.gguf_import`) from ``src`` to ``dst``:
  ``(mapped name, row, fields matched in name)``; ``fields`` fill the
  placeholders that ``name`` does not have (the layer index)."""
  for row in table:
    m = _template_regex(row[src]).match(name)
    if m:
      matched = m.groupdict()
      return row[dst].format(**fields, **matched), row, matched
  return None, None, {}


def hf_to_nnx_name(name: str) -> tuple[str | None, int | None, bool]:
  """``(NNX dotted path, layer index or None, transpose)`` for a Hugging Face tensor name."""
  for alias, replacement in _HF_ALIASES:
    name = alias.sub(replacement, name, count=1)
  path, row, matched = translate_name(name, NAME_TABLE, 0, 1)
  layer = int(matched["i"]) if "i" in matched else None
  return path, layer, bool(row and row[2])


def nnx_to_hf_name(path: str, layer: int | None = None) -> tuple[str, bool]:
  """``(Hugging Face name, transpose)`` for an NNX dotted path (and layer of a stacked one)."""
  name, row, _ = translate_name(path, NAME_TABLE, 1, 0, i=layer)
  if name is None:
    raise ValueError(f"no Hugging Face name for parameter {path!r}")
  return name, row[2]


# ---------------------------------------------------------------------------
# Building a model from a stream of HF-named tensors


def _place(array: np.ndarray, variable, mesh):
  if mesh is None:
    return jnp.asarray(array)
  spec = fit_spec(variable.get_metadata().get("out_sharding") or (), array.shape, mesh)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  # Each device receives only its slice of the host tensor.
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def build_model(config: LlamaConfig, tensors, *, mesh=None, dtype=None, source: str = ""):
  """Fills an abstract :class:`Llama` from ``(hf_name, read)`` pairs.

  A stacked layer parameter is assembled on the host slice by slice and placed
  once its last layer arrives. Checkpoints list tensors layer by layer, so the
  stacks complete together at the last layer: host memory peaks at about 1.6x
  the model (docs/model.md).

  Args:
    dtype: parameter and compute dtype (default float32).
  :raises ValueError: naming ``source`` and the tensor on unknown names,
    shape mismatches or missing parameters.
  """
  dtype = jnp.dtype(dtype or jnp.float32)
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  graphdef, state = nnx.split(abstract)
  variables = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
  filled, stacks = set(), {}  # stacks: path -> (host array [L, ...], layers still missing)
  for name, read in tensors:
    path, layer, transpose = hf_to_nnx_name(name)
    if path is None:
      if _IGNORED_HF.match(name):
        continue
      raise ValueError(f"{source}: unexpected tensor {name!r}")
    if path not in variables:
      if path == "lm_head.kernel" and config.tie_word_embeddings:
        continue  # some tied checkpoints also store the head
      raise ValueError(f"{source}: tensor {name!r} has no parameter {path!r} in this config")
    variable = variables[path]
    expected = variable.shape if layer is None else variable.shape[1:]
    array = read()
    if transpose:
      array = array.T
    if array.shape != expected or (layer is not None and layer >= variable.shape[0]):
      raise ValueError(
        f"{source}: tensor {name!r} has shape {array.shape[::-1] if transpose else array.shape}, "
        f"expected {expected[::-1] if transpose else expected}"
        + (f" for one of {variable.shape[0]} layers" if layer is not None else "")
      )
    if layer is not None:
      if path not in stacks:
        stacks[path] = (np.empty(variable.shape, dtype), set(range(variable.shape[0])))
      stack, missing_layers = stacks[path]
      stack[layer] = array
      missing_layers.discard(layer)
      if missing_layers:
        continue
      array = stacks.pop(path)[0]
    variable.set_value(_place(array.astype(dtype, copy=False), variable, mesh))
    filled.add(path)
    del array
  missing = sorted(set(variables) - filled - set(stacks))
  missing += [f"{path} (layers {sorted(layers)[:8]})" for path, (_, layers) in stacks.items()]
  if missing:
    raise ValueError(
      f"{source}: missing tensors for parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}"
    )
  return nnx.merge(graphdef, state)

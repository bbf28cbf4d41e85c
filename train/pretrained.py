"""Pretrained checkpoints: Hugging Face directories in and out (GGUF: `train.gguf_import`).

Loading builds the model abstractly (``nnx.eval_shape``), then reads one tensor
at a time (nothing stays memory-mapped, so the file never counts twice in
resident memory) and places it straight into its target device or
``NamedSharding``. Peak host memory is the model plus its largest tensor.

Names are mapped by one table (:data:`NAME_TABLE`) used in both directions:
Hugging Face ``model.layers.3.mlp.up_proj.weight`` <-> slice 3 of the stacked
NNX ``layers.mlp.up_proj.kernel`` (``[num_layers, in, out]``). HF linear
weights are ``[out, in]``, NNX kernels ``[in, out]``, hence the transpose flag.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from flax import nnx
from jax.experimental import multihost_utils

from train.mesh import to_host
from train.model import Llama, ModelConfig, fit_spec
from train.tokenizer import Tokenizer

# (Hugging Face name, NNX path, transpose). ``{i}`` is a layer index: slice
# ``i`` of the stacked NNX parameter; ``{p}`` a projection name.
NAME_TABLE = [
  ("model.embed_tokens.weight", "embed_tokens", False),
  ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.self_attn.{p}_proj.kernel", True),
  ("model.layers.{i}.self_attn.{p}_proj.bias", "layers.self_attn.{p}_proj.bias", False),
  ("model.layers.{i}.mlp.{p}_proj.weight", "layers.mlp.{p}_proj.kernel", True),
  ("model.layers.{i}.{p}_layernorm.weight", "layers.{p}_layernorm.weight", False),
  ("model.norm.weight", "norm.weight", False),
  ("lm_head.weight", "lm_head.kernel", True),
]
# HF tensors that carry no parameters (old checkpoints store RoPE buffers).
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


def _template_regex(template: str) -> re.Pattern:
  pattern = (
    re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z_]+?)")
  )
  return re.compile(pattern + "$")


def translate_name(name: str, table, src: int, dst: int, **fields):
  """Maps ``name`` through a name table (here or in `train.gguf_import`) from ``src`` to ``dst``:
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
# safetensors

# Writing only: reading goes through ``safetensors.safe_open``.
_ST_NAMES = {
  np.dtype(np.float64): "F64",
  np.dtype(np.float32): "F32",
  np.dtype(np.float16): "F16",
  np.dtype(ml_dtypes.bfloat16): "BF16",
  np.dtype(np.int64): "I64",
  np.dtype(np.int32): "I32",
  np.dtype(np.int16): "I16",
  np.dtype(np.int8): "I8",
  np.dtype(np.uint8): "U8",
  np.dtype(np.bool_): "BOOL",
}


def safetensors_keys(path: str) -> list[str]:
  """Tensor names of a safetensors file.

  :raises FileNotFoundError: naming ``path`` if it does not exist.
  :raises ValueError: naming ``path`` if the header is corrupt.
  """
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return list(f.keys())
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path}: corrupt safetensors header: {e}") from None


def read_safetensor(path: str, name: str) -> np.ndarray:
  """One tensor of a safetensors file (bf16 as ``ml_dtypes.bfloat16``).

  ``safe_open`` memory-maps the whole file and the pages it copies from stay
  resident while the map is open, so the file is opened per tensor (SmolLM2
  f32 load, 513 MB file: peak RSS 995 MiB opened per tensor, 1576 MiB held
  open).
  """
  with safetensors.safe_open(path, framework="numpy") as f:
    return f.get_tensor(name)


def write_safetensors(
  path: str,
  tensors: list[tuple[str, Callable[[], np.ndarray]]],
  shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
  metadata=None,
):
  """Writes tensors one at a time (each produced by its callable).

  Not ``safetensors.numpy.save_file``: it takes a dict of in-memory arrays, so
  a 7B export would hold the whole model on the host at once.
  """
  header, offset = {}, 0
  for name, _ in tensors:
    shape, dtype = shapes[name]
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": _ST_NAMES[np.dtype(dtype)],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, produce in tensors:
      array = np.ascontiguousarray(produce())
      assert array.shape == tuple(shapes[name][0]) and array.dtype == shapes[name][1], name
      f.write(array.tobytes())


def _hf_tensors(path: str) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
  """``(name, read)`` for every tensor of a HF directory (single or sharded)."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(single):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(
      f"{path}: neither model.safetensors nor model.safetensors.index.json found"
    )
  for file in files:
    full = os.path.join(path, file)
    if not os.path.exists(full):
      raise FileNotFoundError(f"{full}: shard listed in the index is missing")
    for name in safetensors_keys(full):
      yield name, (lambda full=full, name=name: read_safetensor(full, name))


# ---------------------------------------------------------------------------
# Building a model from a stream of HF-named tensors


def _place(array: np.ndarray, variable, mesh):
  if mesh is None:
    return jnp.asarray(array)
  spec = fit_spec(variable.get_metadata().get("out_sharding") or (), array.shape, mesh)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  # Each device receives only its slice of the host tensor.
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def build_model(config: ModelConfig, tensors, *, mesh=None, dtype=None, source: str = ""):
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


# ---------------------------------------------------------------------------
# Public entry points


def load_pretrained(path: str, *, mesh=None, dtype=None):
  """Loads ``(model, tokenizer)`` from a HF directory or a ``.gguf`` file.

  Args:
    path: a directory with ``config.json``, ``model.safetensors`` (or a
      sharded ``model.safetensors.index.json``) and ``tokenizer.json``; or a
      ``.gguf`` file.
    mesh: a ``jax.sharding.Mesh`` with ``fsdp``/``tensor`` axes; each
      tensor is placed straight into its ``NamedSharding``.
    dtype: parameter and compute dtype (default float32).
  :raises FileNotFoundError: naming the missing path.
  :raises ValueError: naming the file/field for corrupt or unsupported input.
  """
  path = os.fspath(path)
  if path.endswith(".gguf"):
    from train.gguf_import import load_gguf  # here: that module imports this one

    return load_gguf(path, mesh=mesh, dtype=dtype)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory or .gguf file")
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{config_file}: not found")
  with open(config_file) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_file}: corrupt JSON: {e}") from None
  config = ModelConfig.from_hf(hf_config)
  tokenizer = Tokenizer.from_dir(path, hf_config)
  model = build_model(config, _hf_tensors(path), mesh=mesh, dtype=dtype, source=path)
  return model, tokenizer


def export_pretrained(model: Llama, tokenizer: Tokenizer | None, out_dir: str):
  """Writes a Hugging Face directory that transformers loads.

  Files are written into a temporary sibling directory that replaces
  ``out_dir`` only once complete. On several processes every process calls
  it: each tensor is gathered to the hosts one at a time, and only process 0
  writes; all return once the directory is in place.
  """
  out_dir = os.path.abspath(out_dir)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  tensors, shapes = [], {}
  for path, var in params:
    path = ".".join(map(str, path))
    stacked = path.startswith("layers.")
    for layer in range(var.shape[0]) if stacked else [None]:
      name, transpose = nnx_to_hf_name(path, layer)
      shape = var.shape[1:] if stacked else var.shape
      shapes[name] = (tuple(shape[::-1] if transpose else shape), np.dtype(var.dtype))

      def produce(var=var, layer=layer, transpose=transpose):
        value = var[...] if layer is None else var[...][layer]
        array = to_host(value)  # one tensor (one layer's slice) at a time
        return array.T if transpose else array

      tensors.append((name, produce))
  if jax.process_index() == 0:
    _write_hf_dir(model, tokenizer, tensors, shapes, out_dir)
  else:
    for _, produce in tensors:
      produce()  # take part in each gather, in process 0's order
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("export_pretrained")
  return out_dir


def _write_hf_dir(model: Llama, tokenizer: Tokenizer | None, tensors, shapes, out_dir: str):
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would be surprising on an export
  try:
    hf_config = model.config.to_hf()
    if tokenizer is not None:
      for key in ("bos", "eos", "pad"):
        value = getattr(tokenizer, f"{key}_token_id")
        if value is not None:
          hf_config[f"{key}_token_id"] = value
    hf_config["torch_dtype"] = hf_config["dtype"] = np.dtype(model.embed_tokens.dtype).name
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=1)
    write_safetensors(
      os.path.join(tmp, "model.safetensors"), tensors, shapes, metadata={"format": "pt"}
    )
    if tokenizer is not None:
      tokenizer.save(tmp)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "d"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

"""Pretrained checkpoints: Hugging Face directories in and out (GGUF: `train.models.gguf_import`).

Loading builds the model abstractly (``nnx.eval_shape``), then reads one tensor
at a time (nothing stays memory-mapped, so the file never counts twice in
resident memory) and places it straight into its target device or
``NamedSharding``. Peak host memory is the model plus its largest tensor.
Names map through `train.models.params`' table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
import safetensors
from flax import nnx
from jax.experimental import multihost_utils

from train.disk import disk_errors
from train.mesh import to_host
from train.models.decoder import Llama, LlamaConfig
from train.models.gguf_import import load_gguf
from train.models.params import build_model, nnx_to_hf_name
from train.models.tokenizer import Tokenizer

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
  """One floating-point tensor of a safetensors file (bf16 as ``ml_dtypes.bfloat16``).

  ``safe_open`` memory-maps the whole file and the pages it copies from stay
  resident while the map is open, so the file is opened per tensor (SmolLM2
  f32 load, 513 MB file: peak RSS 995 MiB opened per tensor, 1576 MiB held
  open).

  :raises ValueError: naming ``path``, the tensor and its dtype for an integer or
    boolean tensor, whose values cast to weights would be meaningless.
  """
  with safetensors.safe_open(path, framework="numpy") as f:
    dtype = f.get_slice(name).get_dtype()  # from the header: nothing read yet
    if not dtype.startswith(("F", "BF")):  # F64, F32, F16, BF16, F8_*
      raise ValueError(
        f"{path}: tensor {name!r} is stored as {dtype}, not a floating-point type: refused "
        "rather than cast to weights (a quantized or damaged checkpoint?)"
      )
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
  config = LlamaConfig.from_hf(hf_config)
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


def _unfinished_prefix(out_dir: str, kind: str) -> str:
  """The name, beside `out_dir`, of an export being written ("tmp") or of the one it replaces
  while the new one is renamed into place ("old", holding it as `d`)."""
  return f".{os.path.basename(out_dir)}.{kind}-"


def remove_unfinished_exports(out_dir) -> list[str]:
  """Cleans up after exports into `out_dir` that were killed part-way: each left a temporary
  folder (up to a whole model). A previous export caught between the two renames is put back.

  Only for a directory that no live process is exporting into. Returns what it did, a line each.
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  if not os.path.isdir(parent):
    return []
  done = []
  for kind in ("old", "tmp"):  # "old" first: the previous export is the one to put back
    for name in sorted(os.listdir(parent)):
      path = os.path.join(parent, name)
      if not name.startswith(_unfinished_prefix(out_dir, kind)) or not os.path.isdir(path):
        continue
      previous = os.path.join(path, "d")
      if kind == "old" and os.path.isdir(previous) and not os.path.exists(out_dir):
        os.rename(previous, out_dir)
        done.append(f"put back {out_dir} from {path}: the export replacing it did not finish")
      shutil.rmtree(path)
      done.append(f"removed {path}, left by an export into {out_dir} that did not finish")
  return done


def _write_hf_dir(model: Llama, tokenizer: Tokenizer | None, tensors, shapes, out_dir: str):
  # A full disk is reported with the weights' bytes against those free once `tmp` is gone.
  needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
  with disk_errors(out_dir, needed):
    _write_hf_files(model, tokenizer, tensors, shapes, out_dir)


def _write_hf_files(model: Llama, tokenizer: Tokenizer | None, tensors, shapes, out_dir: str):
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=_unfinished_prefix(out_dir, "tmp"), dir=parent)
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
      old = tempfile.mkdtemp(prefix=_unfinished_prefix(out_dir, "old"), dir=parent)
      os.rename(out_dir, os.path.join(old, "d"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

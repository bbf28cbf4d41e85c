"""Tokenizers: a Hugging Face fast tokenizer with its chat template, a byte tokenizer
for tests and smoke runs, and the Alpaca template for base models.

All three give ``encode``/``decode``, the special-token ids and
``apply_chat_template``; :func:`encode_with_offsets` adds each token's character
span, from which `train.data` derives the loss mask of one encoding per example.
"""

from __future__ import annotations

import functools
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


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


class ByteTokenizer:
  """A dependency-free byte tokenizer with a tiny chat template (tests, smoke runs)."""

  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  vocab_size = 259
  _EOS_TEXT = "</s>"

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return [self.bos_token_id] * add_special_tokens + self.encode_with_offsets(text)[0]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and the character span of each (every byte of a character spans that character)."""
    ids, offsets, at = [], [], 0
    for i, piece in enumerate(text.split(self._EOS_TEXT)):
      if i:
        ids.append(self.eos_token_id)
        offsets.append((at, at + len(self._EOS_TEXT)))
        at += len(self._EOS_TEXT)
      for char in piece:
        encoded = char.encode("utf-8")
        ids.extend(b + 3 for b in encoded)
        offsets.extend([(at, at + 1)] * len(encoded))
        at += 1
    return ids, offsets

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    out = bytearray()
    for i in ids:
      if i >= 3:
        out.append(i - 3)
      elif i == self.eos_token_id and not skip_special_tokens:
        out.extend(self._EOS_TEXT.encode())
    return out.decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
    text = "".join(f"<{m['role']}>{m['content']}{self._EOS_TEXT}" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


class AlpacaTemplate:
  """A tokenizer whose chat template is the Alpaca instruction format.

  For base models without a chat template: each user turn becomes
  "### Instruction:" and each assistant turn "### Response:" text ending in
  EOS; system messages are dropped.
  """

  HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
  )

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __getattr__(self, name):  # encode, decode, token ids: the wrapped tokenizer's
    return getattr(self.tokenizer, name)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
    text = getattr(self.tokenizer, "bos_token", None) or ""
    for message in messages:
      if message["role"] == "user":
        text += f"{self.HEADER}### Instruction:\n{message['content']}\n\n### Response:\n"
      elif message["role"] == "assistant":
        text += message["content"] + (getattr(self.tokenizer, "eos_token", None) or "")
    return text


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Ids of `text` (no special tokens added) and each token's character span."""
  plain = tokenizer.tokenizer if isinstance(tokenizer, AlpacaTemplate) else tokenizer
  if isinstance(plain, ByteTokenizer):
    return plain.encode_with_offsets(text)
  encoding = plain.tokenizer.encode(text, add_special_tokens=False)  # a pretrained.Tokenizer
  return encoding.ids, encoding.offsets

"""Instruction and preference data: apply the chat template, mask the prompt, pack, batch.

Pipeline: a source (`train.examples`: reasoning-gym task, local files, hub dataset) gives
examples as chat `messages`; `tokenize` renders them with the tokenizer's chat
template and marks the assistant tokens as the only ones with loss; `pack`
concatenates examples into fixed-length rows with per-example `segment_ids`
(0 = padding) and positions that restart at 0 for each example; `Batches`
serves the rows for optimizer step `s` as a pure function of (seed, s), so the
data position in a checkpoint is just the step number.

Preference pairs (`pairs=True`, for DPO) carry a `rejected` answer next to the chosen
one; both are tokenized as whole conversations and padded to a row each, the chosen
row of a pair just before its rejected row, and batches take whole pairs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from train.config import DataConfig
from train.examples import Example, load_examples
from train.models.tokenizer import encode_with_offsets

# ----------------------------------------------------------------------------
# Examples -> tokens with a loss mask


def tokenize(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
  """Token ids of the chat and a 0/1 mask that is 1 on assistant tokens only.

  The whole conversation is encoded once, so the training tokens are those
  of the full text (encoding the prompt and the answer apart changes the
  tokens at their boundary with SentencePiece, e.g. a `▁`-prefixed first
  answer token). Each assistant span is the text the template adds between
  the prompt (with the generation prompt) and the conversation including
  that turn, so the end-of-turn marker is trained too and the model learns
  to stop; a token is masked in when its characters overlap a span.
  """
  spans = []
  rendered = ""
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
    if not prompt.startswith(rendered) or not full.startswith(prompt):
      raise ValueError(
        "the chat template does not render conversations as prefixes of "
        "each other; cannot locate the assistant tokens"
      )
    spans.append((len(prompt), len(full)))
    rendered = full
  if not spans:
    raise ValueError(f"example has no assistant turn: {messages}")
  ids, offsets = encode_with_offsets(tokenizer, rendered)
  mask = [
    int(any(start < finish and begin < end for begin, finish in spans)) for start, end in offsets
  ]
  return ids, mask


def tokenize_all(tokenizer, examples: list[Example], max_length: int, too_long: str):
  """Tokenizes examples (each conversation of a pair); those with a conversation longer than
  max_length + 1 tokens are dropped or truncated, a pair's two conversations together.

  Returns a flat list of (ids, mask), a pair's chosen conversation just before its
  rejected one, and the counts. `prompt_too_long` counts truncated examples left without a
  loss token; such a pair is dropped, as one response without tokens has no log-probability.
  """
  out, dropped, truncated, prompt_too_long = [], 0, 0, 0
  for example in examples:
    sequences = [tokenize(tokenizer, messages) for messages in example.conversations()]
    if any(len(ids) > max_length + 1 for ids, _ in sequences):  # a row: max_length targets
      if too_long == "drop":
        dropped += 1
        continue
      sequences = [(ids[: max_length + 1], mask[: max_length + 1]) for ids, mask in sequences]
      truncated += 1
      empty = not all(any(mask[1:]) for _, mask in sequences)  # mask[1:]: the targets' mask
      prompt_too_long += empty
      if empty and len(sequences) > 1:
        continue
    out.extend(sequences)
  return out, {
    "too_long_dropped": dropped,
    "too_long_truncated": truncated,
    "prompt_too_long": prompt_too_long,
  }


# ----------------------------------------------------------------------------
# Tokens -> packed rows

ROW_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def pack(
  tokenized: list[tuple[list[int], list[int]]], max_length: int, pack_rows: bool, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """Packs examples (in order) into rows of max_length (input, target) pairs.

  Targets are shifted inside each example, so no example predicts its
  neighbour's first token; loss_mask is the target's mask.
  """
  rows: list[list[tuple]] = []
  used = max_length  # forces a new row for the first example
  for ids, mask in tokenized:
    n = len(ids) - 1
    if n < 1:
      continue
    if not pack_rows or used + n > max_length:
      rows.append([])
      used = 0
    rows[-1].append((ids, mask))
    used += n
  if not rows:
    raise ValueError("no example fits: every example was empty or too long")
  shape = (len(rows), max_length)
  out = {
    "inputs": np.full(shape, pad_id, np.int32),
    "targets": np.full(shape, pad_id, np.int32),
    "loss_mask": np.zeros(shape, np.float32),
    "segment_ids": np.zeros(shape, np.int32),
    "positions": np.zeros(shape, np.int32),
  }
  for r, row in enumerate(rows):
    start = 0
    for segment, (ids, mask) in enumerate(row, 1):
      n = len(ids) - 1
      span = slice(start, start + n)
      out["inputs"][r, span] = ids[:-1]
      out["targets"][r, span] = ids[1:]
      out["loss_mask"][r, span] = mask[1:]
      out["segment_ids"][r, span] = segment
      out["positions"][r, span] = np.arange(n)
      start += n
  return out


def prepare(
  cfg: DataConfig, tokenizer, pairs: bool = False
) -> tuple[dict, dict, list[Example], dict]:
  """Returns (train rows, held-out rows, held-out examples, report).

  With `pairs` (DPO), every row holds one response, a pair's chosen row just before its
  rejected row (`cfg.pack` is false).
  """
  train, held_out, report = load_examples(cfg, pairs)
  if not train:
    raise ValueError("empty training dataset")
  # Shuffle examples before packing (deterministic by seed), so rows mix examples.
  order = np.random.default_rng(cfg.shuffle_seed).permutation(len(train))
  train_tokens, train_stats = tokenize_all(
    tokenizer, [train[i] for i in order], cfg.max_length, cfg.too_long
  )
  eval_tokens, eval_stats = tokenize_all(tokenizer, held_out, cfg.max_length, cfg.too_long)
  train_rows = pack(train_tokens, cfg.max_length, cfg.pack, tokenizer.pad_token_id or 0)
  eval_rows = (
    pack(eval_tokens, cfg.max_length, cfg.pack, tokenizer.pad_token_id or 0)
    if eval_tokens
    else None
  )
  for name, rows, stats, tokens in (
    ("training", train_rows, train_stats, train_tokens),
    ("held-out", eval_rows, eval_stats, eval_tokens),
  ):
    if rows is not None and not rows["loss_mask"].any():  # the loss would be 0/0, reported as 0
      raise ValueError(
        f"the {name} set has no loss tokens: {stats['prompt_too_long']} of "
        f"{len(tokens)} examples have a prompt longer than "
        f"data.max_length={cfg.max_length}, so data.too_long=truncate cut off the whole "
        "response; raise data.max_length or set data.too_long=drop"
      )
  per_example = 2 if pairs else 1
  report.update(
    {
      ("train_pairs" if pairs else "train_examples"): len(train_tokens) // per_example,
      "train_rows": len(train_rows["inputs"]),
      "train_loss_tokens": int(train_rows["loss_mask"].sum()),
      ("eval_pairs" if pairs else "eval_examples"): len(eval_tokens) // per_example,
      "too_long_dropped": train_stats["too_long_dropped"] + eval_stats["too_long_dropped"],
      "too_long_truncated": train_stats["too_long_truncated"] + eval_stats["too_long_truncated"],
      "prompt_too_long": train_stats["prompt_too_long"] + eval_stats["prompt_too_long"],
    }
  )
  return train_rows, eval_rows, held_out, report


# ----------------------------------------------------------------------------
# Rows -> global batches


class Batches:
  """Global batch for step s = items at positions [s*B, (s+1)*B) of an endless stream.

  An item is `rows_per_item` consecutive rows: one row (SFT), or the chosen and rejected
  rows of a preference pair (DPO), which then always share a micro-batch and a device.
  The stream visits every item once per epoch in an order drawn from (seed, epoch), so
  any step's batch is computable without replaying the earlier ones: resuming at step s
  needs nothing but s.
  """

  def __init__(
    self,
    rows: dict[str, np.ndarray],
    batch_size: int,
    micro_batch_size: int,
    seed: int,
    rows_per_item: int = 1,
  ):
    self.rows = rows
    self.rows_per_item = rows_per_item
    self.num_items = len(rows["inputs"]) // rows_per_item
    self.batch_size = batch_size
    self.micro_batch_size = micro_batch_size
    self.seed = seed
    self._orders: dict[int, np.ndarray] = {}
    self._step_ids: tuple[int, np.ndarray] | None = None  # the last step's rows, [A, M]

  @property
  def shape(self) -> tuple[int, int, int]:
    """[accumulation steps, micro-batch rows, sequence length]."""
    accumulation = self.batch_size // self.micro_batch_size
    micro_rows = self.micro_batch_size * self.rows_per_item
    return (accumulation, micro_rows, self.rows["inputs"].shape[1])

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_items)}
    return self._orders[epoch]

  def row_ids(self, step: int) -> np.ndarray:
    positions = step * self.batch_size + np.arange(self.batch_size)
    items = np.array([self._order(p // self.num_items)[p % self.num_items] for p in positions])
    return (items[:, None] * self.rows_per_item + np.arange(self.rows_per_item)).reshape(-1)

  def epoch(self, step: int) -> float:
    return step * self.batch_size / self.num_items

  def _ids(self, step: int) -> np.ndarray:
    """[A, M] row ids of step `step`, computed once for the step's fields and devices."""
    if self._step_ids is None or self._step_ids[0] != step:
      self._step_ids = (step, self.row_ids(step).reshape(self.shape[:2]))
    return self._step_ids[1]

  def local(self, step: int, field: str, index: tuple[slice, ...]) -> np.ndarray:
    """The part `index` of the [A, M, L] (or, for a per-row field, [A, M]) global batch.

    Only the rows that this process's devices hold are gathered, so each
    host touches only its share of the batch.
    """
    return self.rows[field][self._ids(step)[index[0], index[1]]][(..., *index[2:])]

  def global_batch(self, step: int, shardings: dict) -> dict:
    """Step `step`'s global batch, one sharded array per field of `shardings` ([A, M, L]
    token fields, [A, M] per-row values); each process fills only its own devices."""
    return {
      name: jax.make_array_from_callback(
        self.shape[: self.rows[name].ndim + 1],
        sharding,
        lambda index, name=name: self.local(step, name, index),
      )
      for name, sharding in shardings.items()
    }

  def tokens(self, step: int) -> int:
    """The number of non-padding tokens in step `step`'s batch (for tokens per second)."""
    return int((self.rows["segment_ids"][self._ids(step)] > 0).sum())


def examples_for_generation(tokenizer, examples: list[Example]) -> list[dict[str, Any]]:
  """Prompt ids (with the generation prompt) and the reference answer of each example."""
  out = []
  for example in examples:
    prompt = tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True)
    out.append(
      {
        "prompt_ids": tokenizer.encode(prompt, add_special_tokens=False),
        "reference": example.messages[-1]["content"],
        "entry": example.entry,
        "question": example.messages[-2]["content"] if len(example.messages) > 1 else "",
      }
    )
  return out

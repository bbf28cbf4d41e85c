"""Instruction and preference data: load, apply the chat template, mask the prompt, pack, batch.

Pipeline: a source (reasoning-gym task, local files, hub dataset) gives
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

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import numpy as np

from train.config import ConfigError, DataConfig
from train.tokenizer import encode_with_offsets


@dataclasses.dataclass
class Example:
  messages: list[dict]  # [{"role": ..., "content": ...}], ends with the assistant turn
  entry: dict | None = None  # the reasoning-gym item, for its score_answer
  rejected: str | None = None  # preference pairs: the dispreferred answer to the same prompt

  def conversations(self) -> list[list[dict]]:
    """The chat, then for a preference pair the chat with the rejected answer instead."""
    if self.rejected is None:
      return [self.messages]
    return [self.messages, self.messages[:-1] + [{"role": "assistant", "content": self.rejected}]]


# ----------------------------------------------------------------------------
# Sources -> Examples


def _messages(prompt: str, response: str, system: str | None) -> list[dict]:
  head = [{"role": "system", "content": system}] if system else []
  return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def canonical_problem(item: dict) -> str:
  """A problem's identity up to reordering: whitespace normalised and, when the problem is an
  arithmetic expression, the terms of each +/- chain and the factors of each * chain sorted.

  "Calculate 3 + 45." and "Calculate 45 + 3." (or "a - b + c" and "c - b + a") get the same form.
  """
  import ast

  text = " ".join(str((item.get("metadata") or {}).get("expression") or item["question"]).split())

  def form(node) -> str:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
      terms = []

      def flatten(n, sign):
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub)):
          flatten(n.left, sign)
          flatten(n.right, sign if isinstance(n.op, ast.Add) else -sign)
        else:
          terms.append(("+" if sign > 0 else "-") + form(n))

      flatten(node, 1)
      return "(" + " ".join(sorted(terms)) + ")"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
      factors = []

      def gather(n):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
          gather(n.left)
          gather(n.right)
        else:
          factors.append(form(n))

      gather(node)
      return "(" + " * ".join(sorted(factors)) + ")"
    if isinstance(node, ast.BinOp):  # division and the rest: operands in place
      return f"({form(node.left)} {type(node.op).__name__} {form(node.right)})"
    if isinstance(node, ast.UnaryOp):
      return type(node.op).__name__ + form(node.operand)
    return ast.unparse(node)

  try:
    return form(ast.parse(text, mode="eval").body)
  except (SyntaxError, ValueError, RecursionError):  # not an expression: the normalised text
    return text


# Set by data.train_seed/eval_seed and data.train_size/eval_size, never by task_options.
_RESERVED_TASK_OPTIONS = {"seed": "data.train_seed/eval_seed", "size": "data.train_size/eval_size"}


def check_task_options(cfg: DataConfig) -> None:
  """Refuses, as a ConfigError, a reasoning-gym task that does not exist, `task_options` that
  its config dataclass does not take (listing those it does) and values its `validate()`
  rejects, instead of reasoning-gym's TypeError or AssertionError."""
  from reasoning_gym.factory import DATASETS  # an optional heavy import: this source only

  if cfg.task not in DATASETS:
    close = difflib.get_close_matches(cfg.task, DATASETS, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"data.task={cfg.task!r} is not a reasoning-gym task{hint}")
  options_class = DATASETS[cfg.task][1]
  taken = [
    f.name for f in dataclasses.fields(options_class) if f.name not in _RESERVED_TASK_OPTIONS
  ]
  for name in cfg.task_options:
    if name in _RESERVED_TASK_OPTIONS:
      raise ConfigError(f"data.task_options.{name}: set {_RESERVED_TASK_OPTIONS[name]} instead")
  unknown = [name for name in cfg.task_options if name not in taken]
  if unknown:
    raise ConfigError(
      f"data.task_options {unknown}: not options of reasoning-gym task {cfg.task!r} "
      f"({options_class.__name__}), which takes {taken}. (An override of data.task keeps "
      "the file's task_options: replace them too, e.g. data.task_options={})"
    )
  try:
    options = options_class(**cfg.task_options)
    if hasattr(options, "validate"):
      options.validate()
  except (AssertionError, ValueError, TypeError) as e:
    raise ConfigError(
      f"data.task_options {cfg.task_options} for reasoning-gym task {cfg.task!r}: "
      f"{e or type(e).__name__}"
    ) from None


def reasoning_gym_examples(cfg: DataConfig) -> tuple[list[Example], list[Example], dict]:
  """Train items from `train_seed`, held-out items from `eval_seed`; a held-out item whose
  problem is a training problem up to reordering (`canonical_problem`) is dropped, as is a
  repeat of an earlier held-out problem."""
  import reasoning_gym

  check_task_options(cfg)

  def make(seed: int, size: int):  # items are generated one at a time, as iterated
    return reasoning_gym.create_dataset(cfg.task, seed=seed, size=size, **cfg.task_options)

  train_items = list(make(cfg.train_seed, cfg.train_size or 2000))
  # Draw held-out candidates (up to 20x eval_size) until eval_size survive the filter.
  train_forms = {canonical_problem(item) for item in train_items}
  held_out, held_out_forms, overlap, repeats = [], set(), 0, 0
  for item in make(cfg.eval_seed, 20 * cfg.eval_size):
    if len(held_out) == cfg.eval_size:
      break
    form = canonical_problem(item)
    if form in train_forms:
      overlap += 1
    elif form in held_out_forms:
      repeats += 1
    else:
      held_out.append(item)
      held_out_forms.add(form)

  def to_example(item):
    return Example(_messages(item["question"], str(item["answer"]), cfg.system_prompt), item)

  report = {"eval_overlap_removed": overlap, "eval_repeats_removed": repeats}
  return [to_example(i) for i in train_items], [to_example(i) for i in held_out], report


NEAR_MISS_OFFSETS = (-10, -2, -1, 1, 2, 10)


def with_near_misses(examples: list[Example], seed: int) -> list[Example]:
  """Preference pairs from examples with integer answers: the correct answer is chosen, a
  near miss (the answer plus one of `NEAR_MISS_OFFSETS`, drawn from `seed`) rejected."""
  offsets = np.random.default_rng(seed).choice(NEAR_MISS_OFFSETS, len(examples))
  pairs = []
  for example, offset in zip(examples, offsets):
    answer = example.messages[-1]["content"]
    try:
      wrong = str(int(answer) + int(offset))
    except ValueError:
      raise ValueError(
        f"a near-miss rejected answer needs an integer answer, got {answer!r}: use a "
        "reasoning-gym task with integer answers, or pairs from data.source=files/hub"
      ) from None
    pairs.append(dataclasses.replace(example, rejected=wrong))
  return pairs


_BOM = "\ufeff"


def _utf8_lines(path: Path):
  """Yields (line number, line) of a text data file decoded strictly as UTF-8, without the
  byte-order mark that may open the file. A byte that is not UTF-8, or a byte-order mark at the
  start of a later line (files that each had one, concatenated), is an error naming
  file:line:column: HF datasets reports neither with a place, or reads the mark into a value."""
  with path.open("rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8")) + 1  # in characters, as editors count
        raise ValueError(
          f"{path}:{number}:{column}: byte 0x{raw[e.start]:02x} is not UTF-8 ({e.reason}): "
          "the file is in another encoding (e.g. Latin-1 or Windows-1252); convert it, e.g. "
          f"`iconv -f WINDOWS-1252 -t UTF-8 {path} > fixed{path.suffix}`"
        ) from None
      if line.startswith(_BOM):
        if number > 1:
          raise ValueError(
            f"{path}:{number}:1: a byte-order mark (U+FEFF) starts this line: files that each "
            "begin with one were concatenated; remove the marks, e.g. "
            f"`sed -i 's/^\\xEF\\xBB\\xBF//' {path}`"
          )
        line = line[1:]
      yield number, line


def _jsonl_lines(path: Path) -> list[int]:
  """The line number of each record; HF datasets reports malformed JSON without one."""
  lines = []
  for line_number, line in _utf8_lines(path):
    if line.strip():
      try:
        json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: malformed JSON line: {e.msg}") from None
      lines.append(line_number)
  return lines


def _file_examples(paths: tuple[str, ...], cfg: DataConfig, pairs: bool) -> list[Example]:
  """Each file is loaded on its own, so a bad record is named by file and line (or row)."""
  import datasets

  formats = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
  for name in paths:
    path = Path(name)
    if not path.is_file():
      raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix not in formats:
      raise ValueError(
        f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(formats)}"
      )
  kinds = {formats[Path(name).suffix] for name in paths}
  if len(kinds) > 1:
    raise ValueError(f"data files mix formats {sorted(kinds)}: {list(paths)}")
  examples = []
  for name in paths:
    path = Path(name)
    lines = _jsonl_lines(path) if path.suffix == ".jsonl" else None
    if path.suffix in (".json", ".csv"):  # text read by datasets: checked line by line first
      for _ in _utf8_lines(path):
        pass
    if lines == [] or path.stat().st_size == 0:
      raise ValueError(f"empty dataset: {path} holds no records")
    try:
      rows = datasets.load_dataset(formats[path.suffix], data_files=[str(path)], split="train")
    except ValueError as e:  # e.g. a CSV with only a header: "corresponds to no data"
      raise ValueError(f"empty dataset or unreadable file {path}: {e}") from e
    if lines is not None:
      where = lambda i, path=path, lines=lines: f"{path}:{lines[i]}"
    elif path.suffix == ".csv":
      where = lambda i, path=path: f"{path}:{i + 2}"  # after the header line
    else:
      where = lambda i, path=path: f"{path} row {i}"
    examples += _rows_to_examples(rows, cfg, str(path), where, pairs)
  return examples


def _check_present(record: dict, field: str, where: str) -> None:
  """Raises for a null or empty value (str(None) would train on the text "None")."""
  value = record[field]
  if value is None or (isinstance(value, str) and not value.strip()) or value == []:
    state = "missing or null" if value is None else "empty"
    raise ValueError(f"{where}: field '{field}' is {state}")


def _pair_example(record: dict, cfg: DataConfig, head: list[dict], where: str) -> Example:
  """A preference pair from plain strings (prompt, chosen, rejected) or from two message
  lists whose last message is the answer and whose other messages are the prompt."""
  chosen, rejected = record[cfg.chosen_field], record[cfg.rejected_field]
  if isinstance(chosen, list):
    prompt = list(chosen[:-1])
    if not any(m["role"] == "system" for m in prompt):
      prompt = head + prompt
    answers = {cfg.chosen_field: chosen[-1], cfg.rejected_field: rejected[-1]}
    for field, message in answers.items():
      if message.get("role") != "assistant" or not str(message.get("content") or "").strip():
        raise ValueError(
          f"{where}: field '{field}' has an empty response: its last message must be a "
          f"non-empty assistant answer, got {message!r}"
        )
    chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
  else:
    prompt = _messages(str(record[cfg.prompt_field]), "", cfg.system_prompt)[:-1]
  return Example(prompt + [{"role": "assistant", "content": str(chosen)}], rejected=str(rejected))


def _rows_to_examples(rows, cfg: DataConfig, source: str, where, pairs: bool) -> list[Example]:
  """`where(i)` names row i for an error: file:line, or the row number."""
  if len(rows) == 0:
    raise ValueError(f"empty dataset: {source}")
  columns = rows.column_names
  if pairs:
    needed = [cfg.chosen_field, cfg.rejected_field]
    if not (cfg.chosen_field in columns and isinstance(rows[0][cfg.chosen_field], list)):
      needed.insert(0, cfg.prompt_field)  # string answers: the prompt is a column of its own
    hint = "set data.prompt_field/chosen_field/rejected_field"
  else:
    needed = [cfg.messages_field] if cfg.messages_field else [cfg.prompt_field, cfg.response_field]
    hint = "set data.prompt_field/response_field or data.messages_field"
  missing = [c for c in needed if c not in columns]
  if missing:
    raise ValueError(f"{source}: missing field(s) {missing}; available columns: {columns} ({hint})")
  head = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
  examples = []
  for i, r in enumerate(rows):
    for field in needed:
      _check_present(r, field, where(i))
    if pairs:
      examples.append(_pair_example(r, cfg, head, where(i)))
    elif cfg.messages_field:
      examples.append(Example(head + list(r[cfg.messages_field])))
    else:
      examples.append(
        Example(_messages(str(r[cfg.prompt_field]), str(r[cfg.response_field]), cfg.system_prompt))
      )
  return examples


def table_examples(
  cfg: DataConfig, pairs: bool = False
) -> tuple[list[Example], list[Example], dict]:
  """Local files or a hub dataset; held-out split from eval files/split or a tail of train."""
  import datasets

  if cfg.source == "files":
    train = _file_examples(cfg.train_files, cfg, pairs)
    held_out = (
      _file_examples(cfg.eval_files, cfg, pairs)[: cfg.eval_size] if cfg.eval_files else None
    )
  else:

    def hub(split):
      source = f"{cfg.hub_name}[{split}]"
      rows = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split)
      return _rows_to_examples(rows, cfg, source, lambda i: f"{source} row {i}", pairs)

    train = hub(cfg.train_split)
    held_out = hub(cfg.eval_split)[: cfg.eval_size] if cfg.eval_split else None
  if held_out is None:  # deterministic split: shuffle once by seed, hold out the tail
    order = np.random.default_rng(cfg.shuffle_seed).permutation(len(train))
    n_eval = min(cfg.eval_size, len(train) // 10)
    held_out = [train[i] for i in order[len(train) - n_eval :]]
    train = [train[i] for i in order[: len(train) - n_eval]]
  if cfg.train_size:
    train = train[: cfg.train_size]
  return train, held_out, {}


def load_examples(
  cfg: DataConfig, pairs: bool = False
) -> tuple[list[Example], list[Example], dict]:
  """(train, held-out, report); `pairs`: preference pairs (reasoning-gym: near misses)."""
  if cfg.source != "reasoning_gym":
    return table_examples(cfg, pairs)
  train, held_out, report = reasoning_gym_examples(cfg)
  if pairs:
    train, held_out = (
      with_near_misses(train, cfg.train_seed),
      with_near_misses(held_out, cfg.eval_seed),
    )
  return train, held_out, report


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

  def local(self, step: int, field: str, index: tuple[slice, ...]) -> np.ndarray:
    """The part `index` of the [A, M, L] (or, for a per-row field, [A, M]) global batch.

    Only the rows that this process's devices hold are gathered, so each
    host touches only its share of the batch.
    """
    ids = self.row_ids(step).reshape(self.shape[:2])[index[0], index[1]]
    return self.rows[field][ids][(..., *index[2:])]


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

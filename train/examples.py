"""Where examples come from: a reasoning-gym task, local files (JSON/JSONL/Parquet/CSV) or a
Hugging Face hub dataset, each record read as a chat conversation (`Example`), or with
`pairs=True` (DPO) as a preference pair whose `rejected` answer sits beside the chosen one.

`train.data` turns these into tokens, packed rows and batches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from pathlib import Path

import numpy as np

from train.config import ConfigError, DataConfig
from train.records import json_kind, jsonl_records, utf8_lines


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
  import reasoning_gym  # here: importing it takes seconds, and only this source needs it

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


class _Records(list):
  """JSON-lines records as written (no type inferred across rows, as HF datasets would:
  "007" stays a string), with the column names `_rows_to_examples` reads."""

  @property
  def column_names(self) -> list[str]:
    return list(dict.fromkeys(key for record in self for key in record))


def _jsonl_records(path: Path) -> tuple[_Records, list[int]]:
  """The records of a JSON-lines file and the line number of each (errors as
  `records.jsonl_records`)."""
  records, lines = _Records(), []
  for line_number, record in jsonl_records(path):
    records.append(record)
    lines.append(line_number)
  return records, lines


def _file_examples(paths: tuple[str, ...], cfg: DataConfig, pairs: bool) -> list[Example]:
  """Each file is loaded on its own, so a bad record is named by file and line (or row)."""
  import datasets  # here: a heavy import that only file and hub sources need

  formats = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
  for name in paths:
    path = Path(name)
    if path.is_dir():
      raise IsADirectoryError(
        f"{path} is a directory, not a data file: list the files in it (of types "
        f"{sorted(formats)}) in data.train_files/data.eval_files"
      )
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
    rows, lines = _jsonl_records(path) if path.suffix == ".jsonl" else (None, None)
    if path.suffix in (".json", ".csv"):  # text read by datasets: checked line by line first
      for _ in utf8_lines(path):
        pass
    if lines == [] or path.stat().st_size == 0:
      raise ValueError(f"empty dataset: {path} holds no records")
    if rows is None:
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


def _text(record: dict, field: str, where: str) -> str:
  """A prompt or response as text: a string as written, a number as it prints; an object,
  array or boolean is refused (its Python repr would be trained on)."""
  value = record[field]
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ValueError(f"{where}: field '{field}' is {json_kind(value)}, expected a string")
  return str(value)


def _check_present(record: dict, field: str, where: str) -> None:
  """Raises for a null, absent or empty value (str(None) would train on the text "None")."""
  value = record.get(field)
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
      prompt, response = (_text(r, f, where(i)) for f in (cfg.prompt_field, cfg.response_field))
      examples.append(Example(_messages(prompt, response, cfg.system_prompt)))
  return examples


def table_examples(
  cfg: DataConfig, pairs: bool = False
) -> tuple[list[Example], list[Example], dict]:
  """Local files or a hub dataset; held-out split from eval files/split or a tail of train."""
  import datasets  # here: a heavy import that only file and hub sources need

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

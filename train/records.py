"""What a run writes for people and programs to read, and reads back: JSON-lines files (the step
log, each evaluation's completions, the study's inputs, training data, HumanEval completions)
and the console line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm


def log(message: str) -> None:
  """Prints `message` once, from process 0, above the progress bar."""
  import jax  # here: reading and writing JSON lines (python -m train.eval) needs no JAX

  if jax.process_index() == 0:
    tqdm.write(message)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
  """One JSON object per line."""
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: str | Path) -> list[dict]:
  """The objects of a JSON-lines file, blank lines skipped (errors as `jsonl_records`)."""
  return [record for _, record in jsonl_records(path)]


def jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
  """Yields (line number, record) for each non-blank line of a JSON-lines file; a line that is
  not UTF-8, not JSON or not an object is an error naming file:line."""
  for line_number, line in utf8_lines(Path(path)):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: malformed JSON line: {e.msg}") from None
      if not isinstance(record, dict):
        raise ValueError(
          f"{path}:{line_number}: a record must be an object, got {json_kind(record)}"
        )
      yield line_number, record


_JSON_KINDS = {
  dict: "an object",
  list: "an array",
  str: "a string",
  int: "a number",
  float: "a number",
  bool: "a boolean",
  type(None): "null",
}


def json_kind(value) -> str:
  """What a value read from JSON is, as an error message names it ("an array", "null"); another
  type (a Parquet or hub dataset's) by its Python name."""
  return _JSON_KINDS.get(type(value), type(value).__name__)


_BOM = "\ufeff"


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
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

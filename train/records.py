"""What a run writes for people and programs to read: JSON-lines files (the step log, each
evaluation's completions, the study's inputs) and the console line."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tqdm.auto import tqdm


def log(message: str) -> None:
  """Prints `message` once, from process 0, above the progress bar."""
  if jax.process_index() == 0:
    tqdm.write(message)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
  """One JSON object per line."""
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: str | Path) -> list[dict]:
  """The objects of a JSON-lines file this project wrote, blank lines skipped."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

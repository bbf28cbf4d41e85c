"""Held-out answers scored: the last number of a completion against the reference, or
reasoning-gym's own scorer for its items (benchmark harnesses: `train.eval.harness`)."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_answer(text: str) -> str:
  """The last number in the completion (the reference's parse), else the stripped text."""
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else text.strip()


def score(prediction: str, item: dict) -> float:
  """reasoning-gym's own scorer when the item comes from it (partial credit), else exact match."""
  entry = item["entry"]
  if entry is not None:
    import reasoning_gym  # here: importing it takes seconds, and only its items need it

    dataset = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
    return float(dataset(prediction, entry))
  return float(exact_match(prediction, item["reference"]))


def exact_match(prediction: str, reference: str) -> bool:
  """The parsed answer equals the reference: stripped text, or the same integer ("+07" == "7")."""
  prediction, reference = prediction.strip(), str(reference).strip()
  try:
    return int(prediction) == int(reference)
  except ValueError:
    return prediction == reference

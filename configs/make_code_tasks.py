"""Writes configs/code_tasks.jsonl: small function-writing exercises for the offline code recipe.

Generated from templates (random names and constants), none of them a
HumanEval problem; each prompt asks to complete a stub in HumanEval's
instruction format (train.eval.harness.HUMANEVAL_INSTRUCTION), each response is
the whole function in a fenced block, as a chat model answers.

    PYTHONPATH=. python configs/make_code_tasks.py  # deterministic; from the repository root
"""

import json
import random
from pathlib import Path

from train.eval.harness import HUMANEVAL_INSTRUCTION

TASKS = [  # (name, signature, docstring with {k}, body with {k})
  ("add_{k}", "(x: int) -> int", "Return x plus {k}.", "return x + {k}"),
  (
    "scale_all",
    "(values: list, k: int = {k}) -> list",
    "Multiply every value by k.",
    "return [v * k for v in values]",
  ),
  (
    "count_above",
    "(values: list) -> int",
    "Count the values greater than {k}.",
    "return sum(1 for v in values if v > {k})",
  ),
  (
    "sum_of_squares",
    "(values: list) -> int",
    "Sum of the squares of the values.",
    "return sum(v * v for v in values)",
  ),
  (
    "count_evens",
    "(values: list) -> int",
    "How many values are even.",
    "return sum(1 for v in values if v % 2 == 0)",
  ),
  (
    "spread",
    "(values: list) -> int",
    "Largest value minus smallest value.",
    "return max(values) - min(values)",
  ),
  (
    "reverse_words",
    "(text: str) -> str",
    "The words of text in reverse order.",
    "return ' '.join(text.split()[::-1])",
  ),
  (
    "count_vowels",
    "(text: str) -> int",
    "Number of vowels (aeiou, any case) in text.",
    "return sum(1 for c in text.lower() if c in 'aeiou')",
  ),
  (
    "is_palindrome",
    "(text: str) -> bool",
    "True when text reads the same backwards.",
    "return text == text[::-1]",
  ),
  ("repeat_{k}", "(text: str) -> str", "text repeated {k} times.", "return text * {k}"),
  (
    "keep_multiples",
    "(values: list) -> list",
    "The values divisible by {k}, in order.",
    "return [v for v in values if v % {k} == 0]",
  ),
  (
    "first_index",
    "(values: list, target) -> int",
    "Index of target in values, or -1.",
    "return values.index(target) if target in values else -1",
  ),
  ("clamp", "(x: int) -> int", "x limited to the range [0, {k}].", "return max(0, min(x, {k}))"),
  (
    "running_total",
    "(values: list) -> list",
    "Cumulative sums of the values.",
    "out, total = [], 0\n    for v in values:\n        total += v\n        out.append(total)\n    return out",
  ),
  (
    "capitalize_words",
    "(text: str) -> str",
    "Each word with its first letter upper-case.",
    "return ' '.join(w[:1].upper() + w[1:] for w in text.split())",
  ),
  (
    "digit_sum",
    "(n: int) -> int",
    "Sum of the decimal digits of abs(n).",
    "return sum(int(d) for d in str(abs(n)))",
  ),
]


def main(size: int = 400, seed: int = 0) -> None:
  rng = random.Random(seed)
  with open(Path(__file__).with_name("code_tasks.jsonl"), "w") as f:
    for _ in range(size):
      name, signature, doc, body = rng.choice(TASKS)
      k = rng.randint(2, 9)
      name, signature, doc, body = (s.format(k=k) for s in (name, signature, doc, body))
      stub = f'def {name}{signature}:\n    """{doc}"""\n'
      f.write(
        json.dumps(
          {
            "question": HUMANEVAL_INSTRUCTION.format(prompt=stub),
            "answer": f"```python\n{stub}    {body}\n```",
          }
        )
        + "\n"
      )


if __name__ == "__main__":
  main()

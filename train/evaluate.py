"""Held-out evaluation: token loss on held-out rows (SFT) or preference metrics of held-out
pairs (DPO), exact-match answer accuracy by greedy decoding, and its statistics (interval,
before/after gain, most common answer).

CLI (a benchmark scored as its harness does, see train/benchmarks.py)::

    python -m train.evaluate --model PATH|smollm2 --benchmark humaneval [--limit N] [--completions FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import dpo
from train.data import ROW_FIELDS
from train.mesh import BATCH_AXES, to_host

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def write_jsonl(path, records: list[dict]) -> None:
  """One JSON object per line (completions and their scores)."""
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _device_chunks(rows: dict, batch_size: int, mesh):
  """Yields (sharded chunk of the token fields, number of real rows), `batch_size` rows at a
  time (rounded up to split evenly over devices), the last chunk padded with empty rows."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = -(-batch_size // shards) * shards
  sharding = NamedSharding(mesh, P(BATCH_AXES, None))
  for start in range(0, len(rows["inputs"]), batch_size):
    chunk = {}
    for name in ROW_FIELDS:
      part = rows[name][start : start + batch_size]
      pad = np.zeros((batch_size - len(part),) + part.shape[1:], part.dtype)  # no loss tokens
      full = np.concatenate([part, pad])
      chunk[name] = jax.make_array_from_callback(full.shape, sharding, lambda i, a=full: a[i])
    yield chunk, len(part)


def held_out_loss(eval_step, params, rows: dict, batch_size: int, mesh) -> float:
  """Mean cross-entropy over the loss tokens of all held-out rows."""
  total, tokens = 0.0, 0.0
  for chunk, _ in _device_chunks(rows, batch_size, mesh):
    loss_sum, count = eval_step(params, chunk)
    total += float(loss_sum)
    tokens += float(count)
  return total / max(tokens, 1.0)


def all_sequence_logps(logps_step, params, rows: dict, batch_size: int, mesh) -> np.ndarray:
  """[N] float32: each row's sequence log-probability (`Steps.logps` of `train.step.build_steps`)."""
  parts = [
    to_host(logps_step(params, chunk))[:real]
    for chunk, real in _device_chunks(rows, batch_size, mesh)
  ]
  return np.concatenate(parts).astype(np.float32)


def preference_stats(
  policy_logps: np.ndarray, reference_logps: np.ndarray, beta: float, label_smoothing: float
) -> dict:
  """Held-out DPO metrics of pairs (rows interleaved: chosen, rejected, ...).

  `eval_loss` is the mean DPO loss; TRL's `rewards/*` and `logps/*` are means over pairs
  (`rewards/accuracies`: the fraction with a positive reward margin, 0 while the policy is
  the reference); `chosen_logp_higher`: the fraction where the policy itself gives the
  chosen response the higher log-probability, which the reference already has.
  """
  losses, statistics = dpo.pair_losses(
    jnp.asarray(policy_logps), jnp.asarray(reference_logps), beta, label_smoothing
  )
  pairs = policy_logps.reshape(-1, 2)
  return {
    "eval_loss": float(jnp.mean(losses)),
    **{name: float(jnp.mean(values)) for name, values in statistics.items()},
    "chosen_logp_higher": float(np.mean(pairs[:, 0] > pairs[:, 1])),
  }


def parse_answer(text: str) -> str:
  """The last number in the completion (the reference's parse), else the stripped text."""
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else text.strip()


def score(prediction: str, item: dict) -> float:
  """reasoning-gym's own scorer when the item comes from it (partial credit), else exact match."""
  entry = item["entry"]
  if entry is not None:
    import reasoning_gym

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


def answer_records(
  model,
  tokenizer,
  items: list[dict],
  *,
  max_new_tokens: int,
  batch_size: int,
  samples_path: Path | None = None,
) -> list[dict]:
  """Greedy completions of the held-out prompts, parsed and scored; saved as JSONL.

  Each record: question, completion, prediction, reference, exact (0/1), score (the task's
  scorer, which may give partial credit).
  """
  from train.generate import generate

  records = []
  for start in range(0, len(items), batch_size):
    chunk = items[start : start + batch_size]
    completions = generate(
      model,
      [it["prompt_ids"] for it in chunk],
      max_new_tokens=max_new_tokens,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id or 0,
    )
    for item, ids in zip(chunk, completions):
      # A model vocabulary larger than the tokenizer's can sample ids it cannot decode.
      text = tokenizer.decode(
        [i for i in ids if i < tokenizer.vocab_size], skip_special_tokens=True
      )
      prediction = parse_answer(text)
      records.append(
        {
          "question": item.get("question", ""),
          "completion": text,
          "prediction": prediction,
          "reference": item["reference"],
          "exact": int(exact_match(prediction, item["reference"])),
          "score": score(prediction, item),
        }
      )
  if samples_path is not None and jax.process_index() == 0:
    write_jsonl(samples_path, records)
  return records


def answer_accuracy(model, tokenizer, items: list[dict], **kwargs) -> float:
  """Exact-match accuracy of the greedy completions (see `answer_records`)."""
  return answer_stats(answer_records(model, tokenizer, items, **kwargs))["accuracy"]


Z95 = 1.959964  # two-sided 95% normal quantile


def answer_stats(records: list[dict]) -> dict:
  """Exact-match accuracy with a 95% Wilson interval, the mean task score (partial credit),
  and the most common prediction with its share of all predictions (a collapse detector)."""
  n = len(records)
  if not n:
    return {"items": 0, "exact_matches": 0, "accuracy": float("nan")}
  hits = sum(int(r["exact"]) for r in records)
  p = hits / n
  centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
  half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
  top, top_count = Counter(r["prediction"] for r in records).most_common(1)[0]
  return {
    "items": n,
    "exact_matches": hits,
    "accuracy": p,
    "accuracy_ci95": [max(0.0, centre - half), min(1.0, centre + half)],
    "score": float(np.mean([r["score"] for r in records])),
    "top_answer": top,
    "top_answer_share": top_count / n,
  }


def paired_gain(before: list[dict], after: list[dict]) -> dict:
  """After minus before exact-match accuracy on the same items, with the 95% interval of the
  paired normal approximation (per-item differences in {-1, 0, 1})."""
  if len(before) != len(after) or not before:
    raise ValueError(f"paired_gain needs the same items: {len(before)} vs {len(after)}")
  diffs = np.array([int(a["exact"]) - int(b["exact"]) for b, a in zip(before, after)], float)
  n, gain = len(diffs), float(diffs.mean())
  half = Z95 * float(diffs.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
  return {
    "accuracy_gain": gain,
    "accuracy_gain_ci95": [gain - half, gain + half],
    "fixed": int((diffs > 0).sum()),
    "broken": int((diffs < 0).sum()),
  }


def seeds_interval(values: list[float]) -> tuple[float, float]:
  """Mean and the half-width of the 95% Student-t interval of per-seed values."""
  values = np.asarray(values, float)
  if len(values) < 2:
    return float(values.mean()), float("inf")
  t = _T975.get(len(values) - 1, Z95)
  return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(len(values)))


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def benchmark_accuracy(
  model,
  tokenizer,
  benchmark: str,
  items: list[dict],
  *,
  max_new_tokens: int,
  batch_size: int,
  samples_path: Path | None = None,
) -> float:
  """Greedy completions of a benchmark's items scored by its harness; records saved as JSONL."""
  from train import benchmarks

  texts = benchmarks.generate_texts(
    model,
    tokenizer,
    [it["instruction"] for it in items],
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
  )
  value, records = benchmarks.score_benchmark(benchmark, items, texts)
  if samples_path is not None and jax.process_index() == 0:
    write_jsonl(samples_path, records)
  return value


def _argument_errors(args) -> list[str]:
  """What is wrong with the command line of `main`, checked before any work."""
  errors = []
  if (args.model is None) == (args.completions is None):
    errors.append("give exactly one of --model and --completions")
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
  from train import benchmarks

  parser = argparse.ArgumentParser(
    description="Score a model (or a completions file) on a benchmark."
  )
  parser.add_argument("--model", help="what model.path takes: HF directory, .gguf, or smollm2")
  parser.add_argument("--benchmark", choices=["humaneval", "gsm8k", "math"], required=True)
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
  parser.add_argument("--output", help="write one JSONL record per problem here")
  args = parser.parse_args(argv)
  errors = _argument_errors(args)
  if errors:
    parser.error("; ".join(errors))  # exit code 2, before any problem is loaded or scored

  items = benchmarks.load_items(args.benchmark, limit=args.limit)
  if args.completions:
    completions = benchmarks.read_completions(args.completions)
    texts = [completions.get(it["task_id"], "") for it in items]
  else:
    from train.gguf_import import default_gguf_path
    from train.pretrained import load_pretrained
    from train.tokenizer import AlpacaTemplate

    model, tokenizer = load_pretrained(
      default_gguf_path() if args.model == "smollm2" else args.model
    )
    if args.template == "alpaca":
      tokenizer = AlpacaTemplate(tokenizer)
    texts = benchmarks.generate_texts(
      model,
      tokenizer,
      [it["instruction"] for it in items],
      max_new_tokens=args.max_new_tokens,
      batch_size=args.batch_size,
    )
  value, records = benchmarks.score_benchmark(args.benchmark, items, texts, args.timeout)
  if args.output:
    write_jsonl(args.output, records)
  correct = sum(r.get("passed", r.get("score")) for r in records)
  name = "pass@1" if args.benchmark == "humaneval" else "accuracy"
  print(f"{args.benchmark} {name} {value:.4f} ({int(correct)}/{len(records)})")


if __name__ == "__main__":
  main()

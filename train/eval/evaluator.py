"""Held-out evaluation on the mesh: token loss of held-out rows (SFT) or preference metrics of
held-out pairs (DPO), exact-match answers by greedy decoding or a benchmark's score.

`Evaluator` is built once per run and called at each evaluation point (before, every
`eval.every` steps, after) with the current parameters; given `stop`, it asks it before each
batch and raises `EvaluationStopped` when it says so (a preempted run stops after the
current batch).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train import dpo
from train.data import ROW_FIELDS
from train.eval import harness
from train.eval.generate import greedy_texts, instruction_prompts
from train.eval.scoring import exact_match, parse_answer, score
from train.mesh import batch_shards, rows_sharding, to_host
from train.metrics import MetricWriter
from train.paths import RunPaths
from train.records import log, write_jsonl
from train.run_setup import Run
from train.stats import answer_stats

# Shown in the one-line log of an evaluation, when present.
_SHOWN = (
  "eval_loss",
  "rewards/accuracies",
  "rewards/margins",
  "accuracy",
  "score",
  "top_answer_share",
)


class EvaluationStopped(Exception):
  """`stop()` was true before a batch: the evaluation was left unfinished."""


def _stop_if_asked(stop) -> None:
  if stop is not None and stop():
    raise EvaluationStopped


def _device_chunks(rows: dict, batch_size: int, mesh, stop=None):
  """Yields (sharded chunk of the token fields, number of real rows), `batch_size` rows at a
  time (rounded up to split evenly over devices), the last chunk padded with empty rows;
  asks `stop` before each."""
  shards = batch_shards(mesh.shape)
  batch_size = -(-batch_size // shards) * shards
  sharding = rows_sharding(mesh)
  for start in range(0, len(rows["inputs"]), batch_size):
    _stop_if_asked(stop)
    chunk = {}
    for name in ROW_FIELDS:
      part = rows[name][start : start + batch_size]
      pad = np.zeros((batch_size - len(part),) + part.shape[1:], part.dtype)  # no loss tokens
      full = np.concatenate([part, pad])
      chunk[name] = jax.make_array_from_callback(full.shape, sharding, lambda i, a=full: a[i])
    yield chunk, len(part)


def held_out_loss(eval_step, params, rows: dict, batch_size: int, mesh, stop=None) -> float:
  """Mean cross-entropy over the loss tokens of all held-out rows."""
  total, tokens = 0.0, 0.0
  for chunk, _ in _device_chunks(rows, batch_size, mesh, stop):
    loss_sum, count = eval_step(params, chunk)
    total += float(loss_sum)
    tokens += float(count)
  return total / max(tokens, 1.0)


def all_sequence_logps(
  logps_step, params, rows: dict, batch_size: int, mesh, stop=None
) -> np.ndarray:
  """[N] float32: each row's sequence log-probability (`Steps.logps` of `train.step.build_steps`)."""
  parts = [
    to_host(logps_step(params, chunk))[:real]
    for chunk, real in _device_chunks(rows, batch_size, mesh, stop)
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


def _greedy_texts(model, tokenizer, prompts, *, max_new_tokens, batch_size, stop) -> list[str]:
  """`greedy_texts`, a batch at a time, asking `stop` before each."""
  texts = []
  for start in range(0, len(prompts), batch_size):
    _stop_if_asked(stop)
    texts += greedy_texts(
      model,
      tokenizer,
      prompts[start : start + batch_size],
      max_new_tokens=max_new_tokens,
      batch_size=batch_size,
    )
  return texts


def answer_records(
  model,
  tokenizer,
  items: list[dict],
  *,
  max_new_tokens: int,
  batch_size: int,
  samples_path: Path | None = None,
  stop=None,
) -> list[dict]:
  """Greedy completions of the held-out prompts, parsed and scored; saved as JSONL.

  Each record: question, completion, prediction, reference, exact (0/1), score (the task's
  scorer, which may give partial credit).
  """
  texts = _greedy_texts(
    model,
    tokenizer,
    [it["prompt_ids"] for it in items],
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
    stop=stop,
  )
  records = []
  for item, text in zip(items, texts):
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


def benchmark_accuracy(
  model,
  tokenizer,
  benchmark: str,
  items: list[dict],
  *,
  max_new_tokens: int,
  batch_size: int,
  samples_path: Path | None = None,
  stop=None,
) -> float:
  """Greedy completions of a benchmark's items scored by its harness; records saved as JSONL."""
  texts = _greedy_texts(
    model,
    tokenizer,
    instruction_prompts(tokenizer, [it["instruction"] for it in items]),
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
    stop=stop,
  )
  _stop_if_asked(stop)  # running the completions can take minutes too
  value, records = harness.score_benchmark(benchmark, items, texts)
  if samples_path is not None and jax.process_index() == 0:
    write_jsonl(samples_path, records)
  return value


@dataclasses.dataclass
class Evaluator:
  """Evaluates parameters on the run's held-out data; completions go to
  ``paths.eval_samples(tag)`` and held-out answers to ``answers[tag]``.

  Attributes:
    setup: the run as `train.run_setup.setup_run` built it: its held-out rows give the
      held-out loss, its held-out prompts (or a benchmark's problems) the accuracy.
    reference_logps: DPO: the reference's log-probabilities of the held-out rows; then the
      rows are pairs and the preference metrics replace the token loss.
  """

  setup: Run
  paths: RunPaths
  writer: MetricWriter
  reference_logps: np.ndarray | None = None
  answers: dict = dataclasses.field(default_factory=dict)

  def __call__(self, tag: str, step: int, params, policy_logps=None, stop=None) -> dict:
    """The metrics at ``step`` (logged under ``eval/``); ``policy_logps`` when already known.

    ``stop``: asked before each batch (on every process alike: it may be collective);
    when true, `EvaluationStopped` is raised and nothing is logged."""
    start = time.time()
    result = self._held_out(params, policy_logps, stop)
    result.update(self._accuracy(tag, params, stop))
    self._report(tag, step, result, f"{time.time() - start:.1f} s")
    return result

  def _report(self, tag: str, step: int, result: dict, note: str) -> None:
    """Logs an evaluation's `result` at `step` under ``eval/``, with one line ending in
    `note`."""
    self.writer.write(
      step, {k: v for k, v in result.items() if isinstance(v, (int, float))}, "eval/"
    )
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k in _SHOWN)
    log(f"[eval {tag}] {shown} ({note})")

  def log_shared(self, tag: str, step: int, result: dict, records: list[dict] | None) -> None:
    """Logs an evaluation that an earlier run in this process made (`train.study`): its
    `result` and, when kept (held-out answers; a benchmark's are not), its answers
    (`records`, to the samples file)."""
    self._report(tag, step, result, "shared with an earlier run")
    if records is not None and jax.process_index() == 0:
      write_jsonl(self.paths.eval_samples(tag), records)

  def _held_out(self, params, policy_logps, stop) -> dict:
    setup = self.setup
    if setup.eval_rows is None:
      return {}
    batch_size = setup.config.eval.batch_size
    if self.reference_logps is None:
      return {
        "eval_loss": held_out_loss(
          setup.steps.eval, params, setup.eval_rows, batch_size, setup.mesh, stop
        )
      }
    if policy_logps is None:
      policy_logps = all_sequence_logps(
        setup.steps.logps, params, setup.eval_rows, batch_size, setup.mesh, stop
      )
    dpo_cfg = setup.config.dpo
    return preference_stats(
      policy_logps, self.reference_logps, dpo_cfg.beta, dpo_cfg.label_smoothing
    )

  def _accuracy(self, tag: str, params, stop) -> dict:
    cfg, items, tokenizer = self.setup.config.eval, self.setup.eval_items, self.setup.tokenizer
    if not cfg.accuracy or (cfg.benchmark == "held_out" and not items):
      return {}
    model = self.setup.model.merged(params)
    options = dict(
      max_new_tokens=cfg.max_new_tokens,
      batch_size=cfg.generate_batch_size,
      samples_path=self.paths.eval_samples(tag),
      stop=stop,
    )
    if cfg.benchmark != "held_out":
      return {"accuracy": benchmark_accuracy(model, tokenizer, cfg.benchmark, items, **options)}
    records = answer_records(model, tokenizer, items[: cfg.size], **options)
    self.answers[tag] = records
    return answer_stats(records)

"""EleutherAI's lm-evaluation-harness on the JAX model: `JaxLM` answers lm-eval's `LM` requests
(`loglikelihood`, `loglikelihood_rolling`, `generate_until`) on a device mesh, and
`evaluate_tasks` runs tasks through `lm_eval.simple_evaluate`::

    python -m train.eval --lm-eval arc_easy,hellaswag --model RUN_DIR|HF_DIR \
      [--lm-eval-include DIR] [--num-fewshot N] [--limit N] [--output results.json]

Requests run in batches of fixed shapes, so a task compiles once per shape, never per request:
scored rows are padded to `batch_size` rows of a power-of-two length, generation prompts to
`batch_size` prompts left-padded to a multiple of 16 tokens (`train.eval.generate`).
Tokenisation is lm-eval's `TemplateLM` with the choices of its `hf` backend (the tokenizer's
own special tokens, BOS as the context of an empty one, contexts cut from the left), so both
score the same tokens.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import simple_evaluate
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

from train.config import MeshConfig
from train.data import ROW_FIELDS
from train.eval.evaluator import all_sequence_logps
from train.eval.generate import greedy_texts
from train.mesh import make_mesh, shard_model
from train.models.gguf_import import resolve_model_path
from train.models.pretrained import load_pretrained
from train.paths import RunPaths
from train.step import cross_entropy, make_rows_step

_SHORTEST_ROW = 16  # tokens: the smallest length bucket


def length_bucket(length: int, max_length: int) -> int:
  """The padded length of a row of `length` tokens: the next power of two (at least 16),
  capped at the model's `max_length`."""
  return min(max(_SHORTEST_ROW, 1 << (length - 1).bit_length()), max_length)


def continuation_scores(model, rows: dict) -> jax.Array:
  """[M, 2] of [M, L] rows: each row's summed log-probability of its loss tokens, and 1.0
  where every one of them is the argmax (lm-eval's `(logprob, is_greedy)`)."""
  hidden, _ = model.hidden_states(
    rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"]
  )
  logits = model.logits(hidden)
  scored = rows["loss_mask"] > 0
  logp = -jnp.sum(jnp.where(scored, cross_entropy(logits, rows["targets"]), 0.0), axis=-1)
  greedy = jnp.all((jnp.argmax(logits, axis=-1) == rows["targets"]) | ~scored, axis=-1)
  return jnp.stack([logp, greedy.astype(jnp.float32)], axis=-1)


def scored_rows(sequences: list[list[int]], scored: list[int], length: int) -> dict:
  """Rows of `length` (train.data's fields) predicting each sequence's tokens from the ones
  before, the loss on its last `scored` targets; right-padded with segment id 0."""
  rows = {name: np.zeros((len(sequences), length), np.int32) for name in ROW_FIELDS}
  rows["loss_mask"] = rows["loss_mask"].astype(np.float32)
  for row, (tokens, count) in enumerate(zip(sequences, scored)):
    inputs = len(tokens) - 1
    rows["inputs"][row, :inputs] = tokens[:-1]
    rows["targets"][row, :inputs] = tokens[1:]
    rows["loss_mask"][row, inputs - count : inputs] = 1.0
    rows["segment_ids"][row, :inputs] = 1
    rows["positions"][row, :inputs] = np.arange(inputs)
  return rows


class JaxLM(TemplateLM):
  """lm-eval's `LM` on a `train.models.decoder.Llama` sharded over `mesh`.

  Args:
    model: the model, its parameters on `mesh` (`load_pretrained(..., mesh=mesh)`).
    tokenizer: its tokenizer (`train.models.tokenizer`).
    batch_size: rows per scoring call and prompts per generation call; rounded up to split
      evenly over the mesh's batch shards.
    max_gen_toks: new tokens of `generate_until` when a task names none (as lm-eval's `hf`).
  """

  def __init__(self, model, tokenizer, mesh, *, batch_size: int = 16, max_gen_toks: int = 256):
    super().__init__()
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.split = shard_model(model, mesh)
    self.batch_size = batch_size
    self.max_length = model.config.max_position_embeddings
    self.max_gen_toks = max_gen_toks
    self._scores = make_rows_step(self.split, mesh, continuation_scores)

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    """The context of an empty one: BOS, else EOS, as the `hf` backend."""
    bos = self.tokenizer.bos_token_id
    return self.eot_token_id if bos is None else bos

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """Token ids with the tokenizer's own special tokens (a BOS its post-processor adds),
    unless told otherwise or `string` already starts with the prefix token's text."""
    if add_special_tokens is None:
      prefix = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
      add_special_tokens = not string.startswith(prefix)
    return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """`(logprob, is_greedy)` of each `((context, continuation), context ids, continuation
    ids)`, the sequence cut from the left to `max_length` + 1 tokens."""
    sequences = [
      (context + continuation)[-(self.max_length + 1) :] for _, context, continuation in requests
    ]
    return self._score(sequences, [len(continuation) for _, _, continuation in requests])

  def _score(self, sequences: list[list[int]], scored: list[int]) -> list[tuple[float, bool]]:
    """`(logprob, is_greedy)` of the last `scored` tokens of each sequence, longest first in
    batches of one length bucket each."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    bucket_of = lambda i: length_bucket(len(sequences[i]) - 1, self.max_length)
    for length, members in itertools.groupby(order, key=bucket_of):
      members = list(members)
      rows = scored_rows([sequences[i] for i in members], [scored[i] for i in members], length)
      # all_sequence_logps keeps each row's output whole: here its [logprob, is_greedy].
      scores = all_sequence_logps(self._scores, self.split.params, rows, self.batch_size, self.mesh)
      for i, (logp, greedy) in zip(members, scores):
        results[i] = (float(logp), bool(greedy))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-probability over windows of `max_length` tokens (lm-eval's rolling
    windows, each predicting its tokens from up to `max_length` before them)."""
    sequences, scored, owners = [], [], []
    for owner, (text,) in enumerate(request.args for request in requests):
      windows = lm_eval_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text),
        prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length,
        context_len=1,
      )
      for context, continuation in map(lm_eval_utils.make_disjoint_window, windows):
        sequences.append((context + continuation)[-(self.max_length + 1) :])
        scored.append(len(continuation))
        owners.append(owner)
    totals = [0.0] * len(requests)
    for owner, (logp, _) in zip(owners, self._score(sequences, scored)):
      totals[owner] += logp
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, cut at the first of the task's `until` strings (and EOS)."""
    results = [""] * len(requests)
    by_options: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      key = json.dumps(request.args[1], sort_keys=True, default=str)
      by_options.setdefault(key, []).append(index)
    for members in by_options.values():
      options = dict(requests[members[0]].args[1])
      until = options.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen_toks = int(options.pop("max_gen_toks", self.max_gen_toks))
      task = requests[members[0]].task_name or "generate_until"
      # As lm-eval's hf backend: do_sample with temperature 0 is greedy; its default is 1.
      if options.pop("do_sample", False) and options.get("temperature", 1.0) != 0:
        raise ValueError(
          f"{task}: generation_kwargs ask for sampling (do_sample, temperature "
          f"{options.get('temperature', 1.0)}); this model decodes greedily only"
        )
      keep = self.max_length - max_gen_toks
      if keep < 1:
        raise ValueError(
          f"{task}: max_gen_toks={max_gen_toks} leaves no room for the prompt in the "
          f"model's {self.max_length} positions"
        )
      prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in members]
      order = sorted(range(len(members)), key=lambda j: -len(prompts[j]))
      # Every call gets `batch_size` prompts (the last batch filled with copies): one shape.
      filled = order + order[-1:] * (-len(order) % self.batch_size)
      texts = greedy_texts(
        self.model,
        self.tokenizer,
        [prompts[j] for j in filled],
        max_new_tokens=max_gen_toks,
        batch_size=self.batch_size,
      )
      for j, text in zip(order, texts):
        for stop in until:
          text = text.split(stop)[0] if stop else text
        results[members[j]] = text
    return results


def model_directory(path: str) -> str:
  """What `--model` names, as `load_pretrained` takes it: a training run's Hugging Face
  export (its summary's `export_dir`, else `<run>/hf`), else `path` (an HF directory, a
  .gguf file or "smollm2")."""
  run = RunPaths(path)
  if not run.config.is_file():
    return resolve_model_path(path)
  if run.summary.is_file():
    export = json.loads(run.summary.read_text()).get("export_dir")
    if export:
      return export
  if run.export.is_dir():
    return str(run.export)
  raise FileNotFoundError(
    f"{path} is a training run without a Hugging Face export: train it with "
    "checkpoint.export=true, or give an HF directory"
  )


def evaluate_tasks(
  model_path: str,
  tasks: list[str],
  *,
  include_path: str | None = None,
  num_fewshot: int | None = None,
  limit: int | None = None,
  batch_size: int = 16,
) -> dict:
  """lm-eval's results of `tasks` (its task names, or those under `include_path`) for the
  model at `model_path`, its parameters split over every device (fsdp) and each batch's rows
  too."""
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
  model, tokenizer = load_pretrained(model_directory(model_path), mesh=mesh)
  return simple_evaluate(
    model=JaxLM(model, tokenizer, mesh, batch_size=batch_size),
    tasks=tasks,
    num_fewshot=num_fewshot,
    limit=limit,
    task_manager=TaskManager(include_path=include_path),
  )


def report(results: dict, output: str | None) -> None:
  """Prints lm-eval's tables of `results` (tasks, then groups); writes them to `output` as
  lm-eval's JSON (its samples left out). Process 0 only."""
  if jax.process_index() != 0:
    return
  print(lm_eval_utils.make_table(results))
  if results.get("groups"):
    print(lm_eval_utils.make_table(results, "groups"))
  if output:
    written = {key: value for key, value in results.items() if key != "samples"}
    Path(output).write_text(
      json.dumps(written, indent=2, default=lm_eval_utils.handle_non_serializable)
    )

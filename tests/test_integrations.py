"""GMT in the trainers people use: Tunix's PeftTrainer and DPOTrainer on a tiny Tunix Llama 3, and
every executable example of docs/integrations.md (optax, Flax NNX, inject_hyperparams, MultiSteps,
Levanter's optimizer in plain optax)."""

import math
import pathlib
import re
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gmt_optax

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
TUNIX_MISSING = (
  "google-tunix is not installed: `pip install -e '.[integrations]'` (Python >= 3.11) runs the "
  "Tunix tests"
)
MASK_RATIO = 0.5
LEARNING_RATE = 1e-2
ACCUMULATION = 2
UPDATES = 6
VOCAB = 64

# Tunix 0.1.7 and its Llama 3 use APIs that flax and jax now deprecate: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def doc_blocks() -> dict:
  """``{section: [(first line, code, reason it is not executed or None)]}``: the ``python``
  blocks of docs/integrations.md under each ``##`` heading."""
  pattern = re.compile(
    r"^## ([^\n]+)|^<!-- not executed: ([^\n]+) -->|^```python\n(.*?)^```", re.M | re.S
  )
  text = DOC.read_text()
  sections, section, not_executed = {}, None, None
  for match in pattern.finditer(text):
    if match[1]:
      section = match[1]
      sections[section] = []
    elif match[2]:
      not_executed = match[2]
    else:
      first_line = text.count("\n", 0, match.start(3))
      sections[section].append((first_line, match[3], not_executed))
      not_executed = None
  return sections


def run_blocks(blocks, namespace: dict) -> dict:
  """Executes ``blocks`` in ``namespace``; tracebacks point at the lines of the page."""
  for first_line, code, not_executed in blocks:
    if not_executed is None:
      exec(compile("\n" * first_line + code, str(DOC), "exec"), namespace)
  return namespace


# -- a tiny Tunix model and data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tunix():
  """Tunix's modules, or a skip saying how to install them."""
  return types.SimpleNamespace(
    peft=pytest.importorskip("tunix.sft.peft_trainer", reason=TUNIX_MISSING),
    dpo=pytest.importorskip("tunix.sft.dpo.dpo_trainer", reason=TUNIX_MISSING),
    sft_utils=pytest.importorskip("tunix.sft.utils", reason=TUNIX_MISSING),
    llama3=pytest.importorskip("tunix.models.llama3.model", reason=TUNIX_MISSING),
  )


def tiny_llama3(tunix, seed=0):
  """Tunix's own Llama 3, at 2 layers of width 32 (about 30k parameters)."""
  config = tunix.llama3.ModelConfig(
    num_layers=2,
    vocab_size=VOCAB,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    rope_theta=10_000,
    norm_eps=1e-5,
  )
  return tunix.llama3.Llama3(config, rngs=nnx.Rngs(seed))


def counting_sequences(rng, rows, length):
  """Rows ``s, s+3, s+6, ...`` (mod VOCAB): a pattern a tiny model learns in a few updates."""
  starts = rng.integers(0, VOCAB, (rows, 1))
  return ((starts + 3 * np.arange(length)) % VOCAB).astype(np.int32)


def sft_batches(micro_batches):
  """Two fixed micro-batches, repeated; the last two tokens of one row are padding."""
  rng = np.random.default_rng(0)
  fixed = []
  for _ in range(ACCUMULATION):
    tokens = counting_sequences(rng, 4, 12)
    mask = np.ones_like(tokens, bool)
    mask[0, -2:] = False
    fixed.append({"input_tokens": tokens, "input_mask": mask})
  return [fixed[i % ACCUMULATION] for i in range(micro_batches)]


def gen_model_input_fn_for(tunix):
  """Tunix's default loss takes positions and a causal attention mask: built from the padding."""

  def gen_model_input_fn(batch):
    mask = batch["input_mask"]
    return {
      "input_tokens": batch["input_tokens"],
      "input_mask": mask,
      "positions": tunix.sft_utils.build_positions_from_mask(mask),
      "attention_mask": tunix.sft_utils.make_causal_attn_mask(mask),
    }

  return gen_model_input_fn


# -- what the optimizer saw and did ---------------------------------------------------------------


class SeenGradient(NamedTuple):
  grads: optax.Updates


def record_gradient() -> optax.GradientTransformation:
  """The identity, keeping the gradient it was given in its state (where a hook can read it)."""
  return optax.GradientTransformation(
    lambda params: SeenGradient(jax.tree_util.tree_map(jnp.zeros_like, params)),
    lambda updates, state, params=None: (updates, SeenGradient(updates)),
  )


def count_runs(runs: list) -> optax.GradientTransformation:
  """The identity, appending to ``runs`` each time it executes on the device."""

  def update(updates, state, params=None):
    jax.debug.callback(lambda: runs.append(1))
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def seen_gradient(opt_state) -> list:
  is_seen = lambda node: isinstance(node, SeenGradient)
  (seen,) = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=is_seen) if is_seen(n)]
  return [np.asarray(g) for g in jax.tree_util.tree_leaves(seen.grads)]


def numpy_keep(g, ratio):
  """Keep ``|g| >= T``, ``T`` the value of rank ``floor(ratio * n)`` of ``|g|``."""
  magnitudes = np.abs(np.asarray(g, np.float64))
  return magnitudes >= np.sort(magnitudes.ravel())[math.floor(ratio * g.size)]


def kept_fraction_logger_class():
  """The training hook of docs/integrations.md, executed from the page."""
  (block,) = [b for b in doc_blocks()["Tunix"] if "class KeptFractionLogger" in b[1]]
  return run_blocks([block], {})["KeptFractionLogger"]


def recording_hook():
  """The documented hook, also keeping the parameters and optimizer state at each step start."""

  class Recorder(kept_fraction_logger_class()):
    def __init__(self):
      super().__init__()
      self.params, self.opt_states = [], []

    def _snapshot(self, trainer):
      self.params.append(jax.device_get(nnx.state(trainer.model, nnx.Param)))
      self.opt_states.append(jax.device_get(trainer.optimizer.opt_state))

    def on_train_step_start(self, trainer):
      self._snapshot(trainer)
      super().on_train_step_start(trainer)

    def on_train_end(self, trainer):
      self._snapshot(trainer)
      super().on_train_end(trainer)

  return Recorder()


def check_updates_against_reference(recorder, mean_gradients, update_steps):
  """After each update the parameters equal a numpy mask of the mean gradient then
  ``optax.adamw``; between updates they do not move. Returns the reference kept fractions."""
  adamw = optax.adamw(LEARNING_RATE)
  params = [jax.tree_util.tree_leaves(p) for p in recorder.params]
  adamw_state = adamw.init(params[0])
  kept_fractions, previous = [], 0
  for step, mean in zip(update_steps, mean_gradients):
    for still in params[previous + 1 : step]:
      for a, b in zip(still, params[previous]):
        np.testing.assert_array_equal(a, b)
    keep = [numpy_keep(g, MASK_RATIO) for g in mean]
    masked = [np.where(k, g, 0.0).astype(np.float32) for k, g in zip(keep, mean)]
    updates, adamw_state = adamw.update(masked, adamw_state, params[previous])
    for got, before, update in zip(params[step], params[previous], updates):
      np.testing.assert_allclose(got, before + np.asarray(update), rtol=1e-5, atol=1e-6)
    kept_fractions.append(sum(k.sum() for k in keep) / sum(k.size for k in keep))
    previous = step
  return np.array(kept_fractions)


def micro_batch_gradients(tunix, trainer):
  """``gradients(params, batches)``: the trainer's own loss differentiated here, one gradient per
  micro-batch, at ``params``."""
  model = tiny_llama3(tunix, seed=1)
  grad = nnx.jit(nnx.grad(lambda m, batch: trainer.loss_fn(m, **trainer.gen_model_input_fn(batch))))

  def gradients(params, batches):
    nnx.update(model, params)
    return [[np.asarray(g) for g in jax.tree_util.tree_leaves(grad(model, b))] for b in batches]

  return gradients


# -- Tunix ----------------------------------------------------------------------------------------


def test_peft_trainer_with_tunix_accumulation(tunix):
  """The drop-in form: ``gmt(adamw)`` and Tunix's ``gradient_accumulation_steps=2``."""
  runs = []
  model = tiny_llama3(tunix)
  trainer = tunix.peft.PeftTrainer(
    model,
    optax.chain(
      record_gradient(),
      gmt_optax.gmt(optax.chain(count_runs(runs), optax.adamw(LEARNING_RATE)), MASK_RATIO),
    ),
    tunix.peft.TrainingConfig(
      eval_every_n_steps=1000, max_steps=UPDATES, gradient_accumulation_steps=ACCUMULATION
    ),
  )
  trainer.with_gen_model_input_fn(gen_model_input_fn_for(tunix))
  recorder = recording_hook()
  trainer.with_training_hooks(recorder)
  batches = sft_batches(UPDATES * ACCUMULATION)
  trainer.train(batches)

  update_steps = [ACCUMULATION * u for u in range(1, UPDATES + 1)]  # snapshots after each update
  means = [seen_gradient(recorder.opt_states[s]) for s in update_steps]
  reference_kept = check_updates_against_reference(recorder, means, update_steps)

  # The optimizer saw the mean of the micro-batches' gradients (accumulated before the mask).
  gradients = micro_batch_gradients(tunix, trainer)
  for u, step in enumerate(update_steps):
    micro = gradients(recorder.params[step - ACCUMULATION], batches[step - ACCUMULATION : step])
    for seen, *per_batch in zip(means[u], *micro):
      np.testing.assert_allclose(seen, np.mean(per_batch, axis=0), rtol=1e-4, atol=1e-6)

  logged = trainer.metrics_logger.get_metric_history("", "kept_fraction", "train")
  np.testing.assert_allclose(logged, reference_kept, rtol=1e-6)
  loss = trainer.metrics_logger.get_metric_history("", "loss", "train")
  assert len(loss) == UPDATES and loss[-1] < 0.8 * loss[0], loss

  # Tunix 0.1.7 wraps the optimizer in optax.MultiSteps: mask and AdamW run on every micro-batch.
  # Its main branch accumulates itself and calls the optimizer once per update.
  own_accumulator = hasattr(tunix.peft, "GradientAccumulator")
  assert len(runs) == UPDATES * (1 if own_accumulator else ACCUMULATION)


def test_peft_trainer_with_gmt_accumulation(tunix):
  """The documented form: ``gmt(adamw, accumulation_steps=2)`` and Tunix's accumulation off."""
  runs = []
  model = tiny_llama3(tunix)
  trainer = tunix.peft.PeftTrainer(
    model,
    optax.chain(
      record_gradient(),
      gmt_optax.gmt(
        optax.chain(count_runs(runs), optax.adamw(LEARNING_RATE)),
        MASK_RATIO,
        accumulation_steps=ACCUMULATION,
      ),
    ),
    tunix.peft.TrainingConfig(eval_every_n_steps=1000, max_steps=UPDATES * ACCUMULATION),
  )
  trainer.with_gen_model_input_fn(gen_model_input_fn_for(tunix))
  recorder = recording_hook()
  trainer.with_training_hooks(recorder)
  trainer.train(sft_batches(UPDATES * ACCUMULATION))

  # Tunix steps are micro-batches now; the recorder sees each micro-batch's gradient, and gmt's
  # running mean adds g / k per micro-batch in float32: the same sums, in the same order, here.
  seen = [seen_gradient(s) for s in recorder.opt_states]
  update_steps = [ACCUMULATION * u for u in range(1, UPDATES + 1)]
  means = [
    [
      sum(g / np.float32(ACCUMULATION) for g in leaf)
      for leaf in zip(*seen[s + 1 - ACCUMULATION : s + 1])
    ]
    for s in update_steps
  ]
  reference_kept = check_updates_against_reference(recorder, means, update_steps)

  logged = trainer.metrics_logger.get_metric_history("", "kept_fraction", "train")
  assert len(logged) == UPDATES * ACCUMULATION  # one per Tunix step
  np.testing.assert_allclose(logged[ACCUMULATION - 1 :: ACCUMULATION], reference_kept, rtol=1e-6)
  loss = trainer.metrics_logger.get_metric_history("", "loss", "train")
  assert np.mean(loss[-ACCUMULATION:]) < 0.8 * np.mean(loss[:ACCUMULATION]), loss
  assert len(runs) == UPDATES  # the mask and AdamW ran once per update


def dpo_batches(tunix, micro_batches):
  """Preference pairs: the prompt's counting continuation is chosen over random tokens."""
  rng = np.random.default_rng(1)
  fixed = []
  for _ in range(ACCUMULATION):
    sequences = counting_sequences(rng, 4, 10)
    prompt_mask = np.ones((4, 6), bool)
    prompt_mask[0, :2] = False  # left padding
    fixed.append(
      tunix.dpo.TrainingInput(
        prompt_ids=np.where(prompt_mask, sequences[:, :6], 0),
        prompt_mask=prompt_mask,
        chosen_ids=sequences[:, 6:],
        chosen_mask=np.ones((4, 4), bool),
        rejected_ids=rng.integers(0, VOCAB, (4, 4)).astype(np.int32),
        rejected_mask=np.ones((4, 4), bool),
      )
    )
  return [fixed[i % ACCUMULATION] for i in range(micro_batches)]


def test_dpo_trainer(tunix):
  model = tiny_llama3(tunix)
  trainer = tunix.dpo.DPOTrainer(
    model,
    tiny_llama3(tunix),  # the frozen reference: the same initial weights
    optax.chain(record_gradient(), gmt_optax.gmt(optax.adamw(LEARNING_RATE), MASK_RATIO)),
    tunix.dpo.DPOTrainingConfig(
      eval_every_n_steps=1000,
      max_steps=UPDATES,
      gradient_accumulation_steps=ACCUMULATION,
      beta=0.5,
    ),
  )
  recorder = recording_hook()
  trainer.with_training_hooks(recorder)
  trainer.train(dpo_batches(tunix, UPDATES * ACCUMULATION))

  update_steps = [ACCUMULATION * u for u in range(1, UPDATES + 1)]
  means = [seen_gradient(recorder.opt_states[s]) for s in update_steps]
  reference_kept = check_updates_against_reference(recorder, means, update_steps)
  logger = trainer.metrics_logger
  np.testing.assert_allclose(
    logger.get_metric_history("", "kept_fraction", "train"), reference_kept, rtol=1e-6
  )
  loss = logger.get_metric_history("", "loss", "train")
  assert loss[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
  assert loss[-1] < 0.8 * loss[0], loss
  assert logger.get_metric_history("", "rewards/accuracy", "train")[-1] > 0.5


# -- docs/integrations.md -------------------------------------------------------------------------


def executable_sections():
  return [s for s, blocks in doc_blocks().items() if any(b[2] is None for b in blocks)]


def check_plain_optax_and_flax_nnx(namespace, printed):
  """The regressor learns, with half of each tensor's entries kept; the injected schedule's
  ratios and the kept fractions they give; accumulation in gmt is a numpy mask of the mean
  gradient followed by ``optax.adamw``, as ``optax.MultiSteps`` is."""
  losses = namespace["losses"]
  assert len(losses) == 30 and np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
  # Each tensor keeps n - floor(n / 2) of its n entries (no ties at the threshold here).
  sizes = [x.size for x in jax.tree_util.tree_leaves(nnx.state(namespace["model"], nnx.Param))]
  half = sum(n - n // 2 for n in sizes) / sum(sizes)
  kept = float(gmt_optax.kept_fraction(namespace["optimizer"].opt_state))
  assert kept == pytest.approx(half, abs=1e-6) and 0.5 <= kept < 0.51
  assert float(printed[0]) == kept  # "about 0.5 (ties are kept)"

  # inject_hyperparams: the scheduled ratio per update, and what it keeps of the fixed gradient.
  ratios, grads = namespace["ratios"], jax.tree_util.tree_leaves(namespace["grads"])
  np.testing.assert_allclose(ratios, [0.2, 0.4, 0.6, 0.8], rtol=1e-6)
  expected = [
    sum(numpy_keep(g, r).sum() for g in grads) / sum(g.size for g in grads) for r in ratios
  ]
  np.testing.assert_allclose(namespace["kept"], expected, rtol=1e-6)

  # MultiSteps: two updates of two micro-batches each, against numpy and optax.adamw.
  micro = [np.asarray(g["w"]) for g in namespace["micro_grads"]]
  adamw = optax.adamw(1e-2)
  params = {"w": np.zeros((32, 32), np.float32)}
  state = adamw.init(params)
  for pair in (micro[:2], micro[2:]):
    mean = sum(g / np.float32(2) for g in pair)
    masked = {"w": np.where(numpy_keep(mean, 0.5), mean, 0.0).astype(np.float32)}
    updates, state = adamw.update(masked, state, params)
    params = optax.apply_updates(params, updates)
  for got in (namespace["ours"]["w"], namespace["multi"]["w"]):
    np.testing.assert_allclose(got, params["w"], rtol=1e-5, atol=1e-7)
  assert np.mean(np.asarray(namespace["ours"]["w"]) != 0) >= 0.5  # kept entries moved


def check_tunix(namespace, printed, initial_params):
  """The documented hook logs one kept fraction per Tunix step: 1 before the first update,
  changing only on update steps (every ``accumulation``-th), the last one the final state's;
  the model trained (the loss fell, the parameters moved); the DPO trainer is configured."""
  trainer, accumulation = namespace["trainer"], namespace["accumulation"]
  logged = trainer.metrics_logger.get_metric_history("", "kept_fraction", "train")
  assert len(logged) == trainer.train_steps == 3 * accumulation, logged
  assert logged[0] == 1.0  # gmt's initial state: no update yet
  for step in range(2, len(logged) + 1):  # Tunix's steps count from 1
    if step % accumulation:  # a micro-step: the previous update's fraction
      assert logged[step - 1] == logged[step - 2], (step, logged)
    else:
      assert 0.5 <= logged[step - 1] < 1.0, (step, logged)
  assert logged[-1] == float(gmt_optax.kept_fraction(trainer.optimizer.opt_state))
  shown = " ".join(printed)  # the page prints the logged history, a numpy array
  shown = shown[shown.rindex("[") + 1 : shown.rindex("]")]
  np.testing.assert_allclose(np.array(shown.split(), float), logged, rtol=1e-6)
  loss = trainer.metrics_logger.get_metric_history("", "loss", "train")
  assert len(loss) == len(logged) and loss[-1] < loss[0], loss
  trained = jax.tree_util.tree_leaves(jax.device_get(nnx.state(namespace["model"], nnx.Param)))
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(initial_params), trained)
  )

  dpo = namespace["dpo"]
  assert type(dpo).__name__ == "DPOTrainer" and dpo.config.max_steps == 3 * accumulation
  assert type(dpo.training_hooks).__name__ == "KeptFractionLogger"
  assert float(gmt_optax.kept_fraction(dpo.optimizer.opt_state)) == 1.0  # found, not yet run


def check_levanter(namespace, printed):
  """After 3 updates the warm-up is done (learning rate 6e-4) and half of the 64 entries are
  kept; the parameters are Levanter's AdamW (plain optax) applied to a numpy mask of the
  gradient."""
  assert float(namespace["state"][1].hyperparams["learning_rate"]) == pytest.approx(6e-4)
  assert float(gmt_optax.kept_fraction(namespace["state"])) == 0.5
  assert [float(line) for line in printed] == pytest.approx([6e-4, 0.5])
  grads = np.asarray(namespace["grads"]["w"])
  masked = {"w": np.where(numpy_keep(grads, MASK_RATIO), grads, 0.0).astype(np.float32)}
  reference = optax.inject_hyperparams(namespace["levanter_adam"])(
    learning_rate=namespace["schedule"]
  )
  params = {"w": np.ones((8, 8), np.float32)}
  state = reference.init(params)
  for _ in range(3):
    updates, state = reference.update(masked, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(namespace["params"]["w"], params["w"], rtol=1e-6, atol=1e-8)


DOC_CHECKS = {
  "Plain optax and Flax NNX": check_plain_optax_and_flax_nnx,
  "Tunix": check_tunix,
  "Levanter": check_levanter,
}


@pytest.mark.parametrize("section", executable_sections())
def test_docs_examples_run(section, request, capsys):
  """Each section's examples run as written (Tunix's with a tiny Llama 3 and counting data),
  and the values they compute and print are the ones the page describes."""
  assert section in DOC_CHECKS, f"add a check of what the {section!r} examples compute"
  namespace, extra = {}, ()
  if section == "Tunix":
    tunix = request.getfixturevalue("tunix")
    namespace.update(
      model=tiny_llama3(tunix),
      train_ds=sft_batches(6),
      gen_model_input_fn=gen_model_input_fn_for(tunix),
    )
    extra = (jax.device_get(nnx.state(namespace["model"], nnx.Param)),)
  capsys.readouterr()
  run_blocks(doc_blocks()[section], namespace)
  printed = capsys.readouterr().out.splitlines()
  DOC_CHECKS[section](namespace, printed, *extra)


def test_docs_name_every_block_that_does_not_run():
  """A block is skipped only under a ``<!-- not executed: reason -->`` line: MaxText and
  Levanter, which do not install beside this Python."""
  skipped = {s: [b[2] for b in blocks if b[2]] for s, blocks in doc_blocks().items()}
  assert {s for s, reasons in skipped.items() if reasons} == {"MaxText", "Levanter"}
  assert "Tunix" in executable_sections() and "Plain optax and Flax NNX" in executable_sections()

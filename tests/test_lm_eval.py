"""lm-evaluation-harness on the JAX model (train/eval/lm_eval_adapter.py), offline, against
lm-eval's own `hf` backend on the model that train's export_pretrained wrote: the same
loglikelihoods, rolling loglikelihoods and greedy continuations request by request, and
`python -m train.eval --lm-eval` over local tasks (tests/fixtures/lm_eval: multiple choice,
generation, perplexity) with the same scores."""

import json
import os

import numpy as np
import pytest

from tests.conftest import FIXTURES
from train.config import MeshConfig
from train.eval.cli import main
from train.mesh import make_mesh
from train.models.pretrained import export_pretrained, load_pretrained

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from train.eval.lm_eval_adapter import JaxLM  # noqa: E402

TASKS = os.path.join(FIXTURES, "lm_eval")
TASK_NAMES = ["tiny_choice", "tiny_generate", "tiny_rolling"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
  """The tiny Llama fixture (128 positions) written by train's export_pretrained."""
  model, tokenizer = load_pretrained(os.path.join(FIXTURES, "llama"))
  out = tmp_path_factory.mktemp("export") / "hf"
  export_pretrained(model, tokenizer, str(out))
  return str(out)


@pytest.fixture(scope="module")
def hf_backend(exported):
  """lm-eval's `hf` backend (transformers, float32 on the CPU) on the export, one request per
  call: in its padded batches a rolling window scores differently with its batch (the same
  passage twice in tiny_rolling, 0.45 nats apart)."""
  pytest.importorskip("accelerate")  # the hf backend imports it
  from lm_eval.models.huggingface import HFLM

  return HFLM(pretrained=exported, device="cpu", dtype="float32", batch_size=1)


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
  return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def test_requests_score_as_lm_evals_hf_backend_in_fixed_shapes(exported, hf_backend):
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))  # 8 devices: rows split over data and fsdp
  model, tokenizer = load_pretrained(exported, mesh=mesh)
  lm = JaxLM(model, tokenizer, mesh, batch_size=4)
  pairs = [
    ("Question: what color is the sky?\nAnswer:", " blue"),
    ("Question: what color is the sky?\nAnswer: ", "green"),  # the space moves to the answer
    ("", "a continuation with no context"),  # BOS as its context
    ("word " * 40, " past the model's 128 positions: cut from the left"),
  ] + [(f"Item {i}:", f" answer {i}") for i in range(6)]  # more than a batch in one bucket
  ours = lm.loglikelihood(_requests("loglikelihood", pairs))
  reference = hf_backend.loglikelihood(_requests("loglikelihood", pairs))
  np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in reference], rtol=1e-5)
  assert [greedy for _, greedy in ours] == [greedy for _, greedy in reference]
  # One compilation per length bucket (16, 32, 64, 128 tokens), whatever the batch holds.
  compiled = lm._scores._cache_size()
  assert compiled <= 4
  lm.loglikelihood(_requests("loglikelihood", pairs[::3]))
  assert lm._scores._cache_size() == compiled

  texts = [("The quick brown fox jumps over the lazy dog. " * 7,), ("A short one.",)]
  np.testing.assert_allclose(
    lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)),
    hf_backend.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)),
    rtol=1e-5,
  )

  prompts = [
    ("Question: what color is the sky?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8}),
    ("Once upon a time", {"until": ["."], "max_gen_toks": 8, "do_sample": False}),
    ("Hello", {"until": ["\n"], "max_gen_toks": 8}),
  ]
  assert lm.generate_until(_requests("generate_until", prompts)) == hf_backend.generate_until(
    _requests("generate_until", prompts)
  )
  with pytest.raises(ValueError, match="ask for sampling.*decodes greedily only"):
    lm.generate_until(_requests("generate_until", [("Hello", {"do_sample": True})]))


def test_the_cli_scores_local_tasks_of_a_run_as_the_hf_backend(
  exported, hf_backend, tmp_path, capsys
):
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  run = tmp_path / "run"  # a training run whose summary names its export
  run.mkdir()
  (run / "config.yaml").write_text("{}\n")
  (run / "summary.json").write_text(json.dumps({"export_dir": exported}))
  output = tmp_path / "results.json"
  main(
    ["--model", str(run), "--lm-eval", ",".join(TASK_NAMES), "--lm-eval-include", TASKS]
    + ["--batch-size", "4", "--output", str(output)]
  )
  table = capsys.readouterr().out
  assert all(f"|{name}" in table for name in TASK_NAMES) and "|acc" in table
  ours = json.loads(output.read_text())["results"]
  reference = simple_evaluate(
    model=hf_backend,
    tasks=TASK_NAMES,
    task_manager=TaskManager(include_path=TASKS, include_defaults=False),
  )["results"]
  assert ours["tiny_choice"]["acc,none"] == reference["tiny_choice"]["acc,none"]
  assert ours["tiny_generate"]["exact_match,none"] == reference["tiny_generate"]["exact_match,none"]
  for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
    assert ours["tiny_rolling"][metric] == pytest.approx(
      reference["tiny_rolling"][metric], rel=1e-5
    )


def test_a_run_without_an_export_or_a_missing_lm_eval_is_a_usage_error(
  tmp_path, monkeypatch, capsys
):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.yaml").write_text("{}\n")
  with pytest.raises(SystemExit) as stopped:
    main(["--model", str(run), "--lm-eval", "tiny_choice"])
  assert stopped.value.code == 2
  assert "training run without a Hugging Face export" in capsys.readouterr().err

  from importlib import util

  find_spec = util.find_spec
  monkeypatch.setattr(
    util, "find_spec", lambda name: None if name == "lm_eval" else find_spec(name)
  )
  with pytest.raises(SystemExit) as stopped:
    main(["--model", str(run), "--lm-eval", "tiny_choice"])
  assert stopped.value.code == 2
  assert 'lm_eval is not installed: pip install "gmt-optax[lm-eval]"' in capsys.readouterr().err

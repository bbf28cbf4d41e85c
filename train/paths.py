"""Every path a run reads or writes under its `train.output_dir`, named in one place.

config.yaml          the resolved config (a resume keeps it and adds config.resumed-<step>.yaml)
run.lock             held by the live run (`train.run_dir.RunLock`)
train_log.jsonl      one JSON record per logged step
eval_log.jsonl       one JSON record per evaluation (before, every eval.every steps, after)
checkpoints/<step>/  Orbax training state
tensorboard/         TensorBoard event files
wandb/               Weights & Biases' files of the run, and its run id (`metrics.loggers`)
profile/             jax.profiler traces of `train.profile_steps`
eval_<tag>.jsonl     completions and scores of one evaluation (before, step<N>, after)
summary.json         the final metrics
hf/                  the Hugging Face export (`checkpoint.export`; or `checkpoint.export_dir`)
study_result.json    a finished run of `python -m train.study`
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """The files and directories of the run in ``root``."""

  root: Path

  def __post_init__(self):
    object.__setattr__(self, "root", Path(self.root))

  @property
  def config(self) -> Path:
    return self.root / "config.yaml"

  @property
  def lock(self) -> Path:
    return self.root / "run.lock"

  @property
  def train_log(self) -> Path:
    return self.root / "train_log.jsonl"

  @property
  def eval_log(self) -> Path:
    return self.root / "eval_log.jsonl"

  @property
  def checkpoints(self) -> Path:
    return self.root / "checkpoints"

  @property
  def tensorboard(self) -> Path:
    return self.root / "tensorboard"

  @property
  def wandb(self) -> Path:
    """The folder `wandb.init(dir=root)` writes (its name is W&B's)."""
    return self.root / "wandb"

  @property
  def wandb_run_id(self) -> Path:
    """The id of the run's W&B run: a resume continues that run."""
    return self.wandb / "run_id"

  @property
  def profile(self) -> Path:
    return self.root / "profile"

  @property
  def summary(self) -> Path:
    return self.root / "summary.json"

  @property
  def export(self) -> Path:
    return self.root / "hf"

  @property
  def study_result(self) -> Path:
    return self.root / "study_result.json"

  def resumed_config(self, step: int) -> Path:
    """The config of a run that resumed at ``step``, beside the original."""
    return self.root / f"config.resumed-{step}.yaml"

  def eval_samples(self, tag: str) -> Path:
    """Completions and scores of the evaluation ``tag`` (``before``, ``step<N>``, ``after``)."""
    return self.root / f"eval_{tag}.jsonl"

"""Fine-tune Llama-family LLMs with Gradient-Mask Tuning (Flax NNX + optax).

`train.run(config)` runs the whole job (data, model, training, evaluation,
checkpoints) and returns the final metrics; `python -m train` is its CLI.
"""


def run(config="configs/default.yaml", overrides=None) -> dict:
  """Runs training from a YAML path, a dict or a `train.config.Config`.

  `overrides` are dotted `key=value` strings (or a nested dict) applied on top.
  Imported lazily so that `import train.models.decoder` stays light.
  """
  from train.loop import run as run_training

  return run_training(config, overrides)


__all__ = ["run"]

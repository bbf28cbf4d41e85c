"""Test-wide set-up: 8 simulated CPU devices so the sharding tests run anywhere."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# --doctest-modules (pyproject.toml, for gmt_optax) would otherwise import the
# fixture generators, which need torch and write files when run.
collect_ignore_glob = ["fixtures/*"]

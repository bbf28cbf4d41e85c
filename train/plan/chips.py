"""What each accelerator generation can do per chip, in one table, with where each number comes
from. The step-time model (`train.plan.roofline`) and the memory report read it."""

from __future__ import annotations

import dataclasses
import math

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip of a generation.

  Attributes:
    name: the generation as topologies name it (`v5p`).
    device_kind: what `jax.Device.device_kind` says for it.
    hbm_bytes: HBM capacity.
    peak_flops: dense bf16 matmul FLOP/s.
    hbm_bytes_per_s: HBM bandwidth.
    ici_bytes_per_s: inter-chip interconnect bandwidth per chip (the published "ICI bandwidth
      per chip" in Gbps, over 8).
    dcn_bytes_per_s: data-center network bandwidth per chip between slices: the host's NICs
      shared by its chips.
    matmul_efficiency: the fraction of `peak_flops` a large matmul fusion reaches in the model;
      the one constant fitted per generation (docs/benchmarks.md, "Step-time model").
    source: where the numbers come from.
  """

  name: str
  device_kind: str
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  dcn_bytes_per_s: float
  matmul_efficiency: float
  source: str


# Fitted on MaxText's published runs (benchmarks/step_model_calibration.py --fit): v5p on
# Llama-2-70B, v5p-512, sequence 4096 (692 tokens/s per chip); v6e on Llama-3.1-8B, v6e-256,
# sequence 8192 (7,207 tokens/s per chip). docs/benchmarks.md, "Step-time model".
V5P_MATMUL_EFFICIENCY = 0.877
V6E_MATMUL_EFFICIENCY = 0.553
_CLOUD_TPU = "Cloud TPU system architecture pages (docs.cloud.google.com/tpu/docs/{})"
CHIPS = {
  chip.name: chip
  for chip in (
    Chip(
      "v4",
      "TPU v4",
      32 * GiB,
      275e12,
      1228e9,
      2400e9 / 8,
      100e9 / 8 / 4,  # 100 Gbps NIC per 4-chip host
      V5P_MATMUL_EFFICIENCY,  # not fitted (no published v4 run checked): v5p's
      _CLOUD_TPU.format("v4"),
    ),
    Chip(
      "v5e",
      "TPU v5 lite",
      16 * GiB,
      197e12,
      819e9,
      1600e9 / 8,
      2 * 100e9 / 8 / 8,  # 2 x 100 Gbps NICs per 8-chip host
      V6E_MATMUL_EFFICIENCY,  # not fitted (no published v5e run checked): v6e's, its successor
      _CLOUD_TPU.format("v5e"),
    ),
    Chip(
      "v5p",
      "TPU v5",
      95 * GiB,
      459e12,
      2765e9,
      4800e9 / 8,
      200e9 / 8 / 4,  # 200 Gbps per 4-chip host
      V5P_MATMUL_EFFICIENCY,
      _CLOUD_TPU.format("v5p"),
    ),
    Chip(
      "v6e",
      "TPU v6 lite",
      32 * GiB,
      918e12,
      1640e9,
      3584e9 / 8,
      25.6e12 / 8 / 256,  # 25.6 Tbps of data-center network per 256-chip pod
      V6E_MATMUL_EFFICIENCY,
      _CLOUD_TPU.format("v6e"),
    ),
  )
}
CHIP_OF_KIND = {chip.device_kind: chip for chip in CHIPS.values()}
# HBM per chip by `device_kind`, GPUs included (no step-time constants for them).
HBM_BYTES = {chip.device_kind: chip.hbm_bytes for chip in CHIPS.values()} | {
  "NVIDIA H100 80GB HBM3": 80 * 10**9,
  "NVIDIA H200": 141 * 10**9,
}


def chip_of(topology: str | Chip) -> Chip:
  """The chip of a topology name (`v5p:4x4x4`, `v6e-256`, `v5e`) or a `Chip` itself."""
  if isinstance(topology, Chip):
    return topology
  name = topology.partition(":")[0].partition("-")[0].lower()
  name = {"v5": "v5p", "v5litepod": "v5e", "v6": "v6e"}.get(name, name)
  if name not in CHIPS:
    raise ValueError(
      f"topology {topology!r}: no step-time constants for {name!r} ({sorted(CHIPS)})"
    )
  return CHIPS[name]


def chips_in(topology: str) -> int:
  """Chips in a slice name: `v5p:4x4x4` -> 64, `v5e:16x16` -> 256, `v6e-256` -> 256."""
  kind, _, shape = topology.partition(":")
  if shape:
    return math.prod(int(n) for n in shape.split("x"))
  count = int(kind.rpartition("-")[2])
  return count // 2 if kind.startswith(("v4", "v5p")) else count  # v4/v5p names count cores

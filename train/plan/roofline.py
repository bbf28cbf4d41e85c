"""A step-time model of a compiled program: each instruction on the chip's roofline, collectives on
its interconnect, overlapped as the compiler scheduled them.

- An instruction takes `max(FLOPs / (peak FLOP/s x matmul efficiency), HBM bytes / HBM
  bandwidth)`: the slower of its matmul units and its memory (`train.plan.hlo` counts both).
- Between slices, a chip's transfers over the data-center network take their bytes over its
  share of the hosts' DCN bandwidth.
- A collective takes its bytes over the chip's ICI bandwidth, times the ring algorithm's
  factor for its group of n chips: all-gather and all-to-all (n-1)/n of the result, all-reduce
  2(n-1)/n, reduce-scatter (n-1) times its (scattered) result, a permute its bytes once.
- An asynchronous collective (`*-start` ... `*-done`) runs under the instructions the compiler
  scheduled between its start and its done; only what is left at the done is exposed.
  Collectives in flight share the interconnect, first started first served. A synchronous one
  is exposed whole.
- A while loop costs its body (and condition) times its trips; a conditional its slowest branch.

The constants sit in `train.plan.chips.CHIPS`; the one fitted constant per generation is
`matmul_efficiency` (docs/benchmarks.md says on what).
"""

from __future__ import annotations

import collections
import dataclasses
import re

from train.plan.chips import Chip, chip_of
from train.plan.hlo import Instruction, Module

# A fusion, dot or kernel is put in the attention row when its op name says it is attention.
_ATTENTION = re.compile(r"attention|attn|splash|flash|dot_product|mha|softmax", re.I)
_STARTS = {f"{kind}-start" for kind in ("all-gather", "all-reduce", "collective-permute", "async")}
_STARTS.add("send")
_DONES = {f"{kind}-done" for kind in ("all-gather", "all-reduce", "collective-permute", "async")}
_DONES.add("send-done")
KINDS = ("matmul", "attention", "update", "other")


@dataclasses.dataclass
class _Totals:
  """What running a computation once costs: seconds and work, by kind."""

  step_s: float = 0.0
  flops: float = 0.0
  hbm_bytes: float = 0.0
  collective_s: float = 0.0
  exposed_collective_s: float = 0.0
  dcn_bytes: float = 0.0
  seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kind_flops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kind_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, other: _Totals, times: float = 1.0) -> None:
    self.step_s += times * other.step_s
    self.flops += times * other.flops
    self.hbm_bytes += times * other.hbm_bytes
    self.collective_s += times * other.collective_s
    self.exposed_collective_s += times * other.exposed_collective_s
    self.dcn_bytes += times * other.dcn_bytes
    for mine, theirs in (
      (self.seconds, other.seconds),
      (self.kind_flops, other.kind_flops),
      (self.kind_bytes, other.kind_bytes),
    ):
      for key, value in theirs.items():
        mine[key] += times * value


def kind_of(instruction: Instruction, flops: float) -> str:
  """`attention` (by op name), `matmul` (any FLOPs), `update` (outside the gradient: no `jvp`
  in its op name, e.g. the optimizer and the accumulation) or `other`."""
  name = instruction.op_name
  if flops and _ATTENTION.search(name):
    return "attention"
  if flops:
    return "matmul"
  if name and "jvp(" not in name:
    return "update"
  return "other"


def collective_seconds(kind: str, size: float, participants: int, bytes_per_s: float) -> float:
  """Seconds a ring collective of `size` result bytes over `participants` chips takes."""
  n = max(participants, 1)
  factor = {
    "all-gather": (n - 1) / n,
    "all-to-all": (n - 1) / n,
    "all-reduce": 2 * (n - 1) / n,
    "reduce-scatter": n - 1,
  }.get(kind, 1.0)
  return factor * size / bytes_per_s if n > 1 or kind == "collective-permute" else 0.0


class _Simulation:
  def __init__(self, module: Module, chip: Chip):
    self.module, self.chip = module, chip
    self.done: dict[str, _Totals] = {}

  def computation(self, name: str) -> _Totals:
    if name not in self.done:
      self.done[name] = self._run(self.module.computations.get(name, []))
    return self.done[name]

  def _run(self, body: list[Instruction]) -> _Totals:
    totals = _Totals()
    in_flight: collections.OrderedDict[str, float] = collections.OrderedDict()

    def elapse(seconds: float) -> None:  # compute time drains the collectives in flight
      totals.step_s += seconds
      while in_flight and seconds > 0:
        first = next(iter(in_flight))
        used = min(seconds, in_flight[first])
        in_flight[first] -= used
        seconds -= used
        if in_flight[first] <= 0:
          in_flight.pop(first)

    def wait_for(name: str) -> None:  # a done: what is left up to this collective is exposed
      if name not in in_flight:
        return
      for first in list(in_flight):
        left = in_flight.pop(first)
        totals.step_s += left
        totals.exposed_collective_s += left
        if first == name:
          return

    for instruction in body:
      opcode = instruction.opcode
      collective = self.module.collective(instruction)
      if collective:
        kind, size, participants = collective
        if kind.startswith("dcn-"):  # what this chip sends to other slices, once
          seconds = size / self.chip.dcn_bytes_per_s
          totals.dcn_bytes += size
        else:
          seconds = collective_seconds(kind, size, participants, self.chip.ici_bytes_per_s)
        totals.collective_s += seconds
        if opcode in _STARTS:
          in_flight[instruction.name] = seconds
        else:
          totals.step_s += seconds
          totals.exposed_collective_s += seconds
      elif opcode in _DONES:
        wait_for(instruction.operands[0] if instruction.operands else "")
      elif opcode in ("while", "call", "conditional"):
        inner = self._control_flow(instruction)
        before = inner.step_s
        inner.step_s = 0.0
        totals.add(inner)
        elapse(before)
      else:
        elapse(self._instruction(instruction, totals))
    for name in list(in_flight):
      wait_for(name)
    return totals

  def _control_flow(self, instruction: Instruction) -> _Totals:
    """The totals of a loop (body and condition times trips), a call, or the slowest branch."""
    inner = _Totals()
    if instruction.opcode == "conditional":
      branches = [self.computation(name) for name, _ in self.module.callees(instruction)]
      if branches:
        inner.add(max(branches, key=lambda t: t.step_s))
      return inner
    for name, times in self.module.callees(instruction):
      inner.add(self.computation(name), times)
    return inner

  def _instruction(self, instruction: Instruction, totals: _Totals) -> float:
    flops = self.module.flops(instruction)
    hbm = self.module.hbm_bytes(instruction)
    seconds = max(
      flops / (self.chip.peak_flops * self.chip.matmul_efficiency),
      hbm / self.chip.hbm_bytes_per_s,
    )
    kind = kind_of(instruction, flops)
    totals.flops += flops
    totals.hbm_bytes += hbm
    totals.seconds[kind] += seconds
    totals.kind_flops[kind] += flops
    totals.kind_bytes[kind] += hbm
    return seconds


def fit_matmul_efficiency(
  compiled, topology: str | Chip, tokens_per_chip: float, tokens_per_s_per_chip: float
) -> float:
  """The `matmul_efficiency` at which `step_model` gives `tokens_per_s_per_chip` (a measured
  throughput): the one constant a generation's table entry is fitted with. Bisection in
  (0, 1]; 1.0 when even the chip's peak is too slow to reach it."""
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  chip = chip_of(topology)
  low, high = 1e-3, 1.0
  for _ in range(40):  # step time falls as the efficiency rises
    middle = (low + high) / 2
    model = step_model(text, dataclasses.replace(chip, matmul_efficiency=middle), tokens_per_chip)
    low, high = (
      (middle, high) if model["tokens_per_s_per_chip"] < tokens_per_s_per_chip else (low, middle)
    )
  return high


def step_model(
  compiled, topology: str | Chip, tokens_per_chip: float, model_flops_per_chip: float | None = None
) -> dict:
  """The modeled step of a compiled program on one chip of `topology`.

  Args:
    compiled: a compiled jax program (`jit(f).lower(...).compile()`), or its HLO text.
    topology: a slice (`v5p:4x4x4`, `v6e-256`), a generation (`v5e`) or a `Chip`.
    tokens_per_chip: tokens one chip processes per step (batch tokens / chips).
    model_flops_per_chip: the model's FLOPs per chip per step (6N per token plus attention, no
      recomputation) for MFU; without it MFU counts the compiler's FLOPs (hardware FLOPs).

  Returns:
    ``{"step_s", "tokens_per_s_per_chip", "mfu", "flops_per_step", "hbm_bytes_per_step",
    "collective_s", "exposed_collective_s", "dcn_bytes_per_step", "seconds_by_kind", "flops_by_kind",
    "hbm_bytes_by_kind", "chip"}``: seconds, FLOPs and bytes per chip per step, each loop's body
    counted once per trip.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  chip = chip_of(topology)
  module = Module.parse(text)
  totals = _Simulation(module, chip).computation(module.entry)
  step_s = totals.step_s
  useful = totals.flops if model_flops_per_chip is None else model_flops_per_chip
  return {
    "step_s": step_s,
    "tokens_per_s_per_chip": tokens_per_chip / step_s if step_s else None,
    "mfu": useful / (step_s * chip.peak_flops) if step_s else None,
    "mfu_counts": "compiler FLOPs" if model_flops_per_chip is None else "model FLOPs",
    "flops_per_step": totals.flops,
    "hbm_bytes_per_step": totals.hbm_bytes,
    "collective_s": totals.collective_s,
    "exposed_collective_s": totals.exposed_collective_s,
    "dcn_bytes_per_step": totals.dcn_bytes,
    "seconds_by_kind": {k: totals.seconds[k] for k in KINDS}
    | {"exposed collectives": totals.exposed_collective_s},
    "flops_by_kind": {k: totals.kind_flops[k] for k in KINDS},
    "hbm_bytes_by_kind": {k: totals.kind_bytes[k] for k in KINDS},
    "chip": chip.name,
  }

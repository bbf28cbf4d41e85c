"""train.plan's costs per step (loop trips counted) and its step-time model, on programs whose
answer is known by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from train.plan import Chip, collectives, step_model
from train.plan.hlo import Module
from train.plan.roofline import collective_seconds, fit_matmul_efficiency

# Round numbers, so that every modeled second below can be checked by hand.
CHIP = Chip(
  name="test",
  device_kind="test",
  hbm_bytes=2**30,
  peak_flops=1e12,
  hbm_bytes_per_s=1e9,
  ici_bytes_per_s=1e8,
  dcn_bytes_per_s=1e7,
  matmul_efficiency=0.5,
  source="by hand",
)

# An outer loop of 5 trips (the compiler's known_trip_count) around an inner `lax.scan`-style
# loop of 3 trips (condition `i < 3`). The inner body slices one layer out of a stacked
# [3,64,64] weight in a fusion, multiplies [32,64] x [64,64] in another, and overlaps an async
# all-reduce of 4096 bytes over 4 chips with that matmul.
HLO = """\
HloModule hand_built, is_scheduled=true

%slice_layer (p0: f32[3,64,64], p1: s32[]) -> f32[64,64] {
  %p0 = f32[3,64,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %zero, %zero), dynamic_slice_sizes={1,64,64}
  ROOT %b = f32[64,64]{1,0} bitcast(%ds)
}

%matmul (q0: f32[32,64], q1: f32[64,64]) -> f32[32,64] {
  %q0 = f32[32,64]{1,0} parameter(0)
  %q1 = f32[64,64]{1,0} parameter(1)
  ROOT %d = f32[32,64]{1,0} dot(%q0, %q1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/dot_general"}
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}

%inner_body (ib: (s32[], f32[32,64], f32[3,64,64], f32[1024])) -> (s32[], f32[32,64], f32[3,64,64], f32[1024]) {
  %ib = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%ib), index=0
  %h = f32[32,64]{1,0} get-tuple-element(%ib), index=1
  %w = f32[3,64,64]{2,1,0} get-tuple-element(%ib), index=2
  %g = f32[1024]{0} get-tuple-element(%ib), index=3
  %ar-start = f32[1024]{0} all-reduce-start(%g), channel_id=1, replica_groups=[1,4]<=[4], to_apply=%sum
  %layer = f32[64,64]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_layer
  %h2 = f32[32,64]{1,0} fusion(%h, %layer), kind=kOutput, calls=%matmul, metadata={op_name="jit(step)/jvp()/dot_general"}
  %ar-done = f32[1024]{0} all-reduce-done(%ar-start)
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) tuple(%i2, %h2, %w, %ar-done)
}

%inner_cond (ic: (s32[], f32[32,64], f32[3,64,64], f32[1024])) -> pred[] {
  %ic = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) parameter(0)
  %j = s32[] get-tuple-element(%ic), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

%outer_body (ob: (s32[], f32[32,64], f32[3,64,64], f32[1024])) -> (s32[], f32[32,64], f32[3,64,64], f32[1024]) {
  %ob = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) parameter(0)
  ROOT %inner = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) while(%ob), condition=%inner_cond, body=%inner_body
}

%outer_cond (oc: (s32[], f32[32,64], f32[3,64,64], f32[1024])) -> pred[] {
  %oc = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main (a: f32[32,64], b: f32[3,64,64], c: f32[1024]) -> (s32[], f32[32,64], f32[3,64,64], f32[1024]) {
  %a = f32[32,64]{1,0} parameter(0)
  %b = f32[3,64,64]{2,1,0} parameter(1)
  %c = f32[1024]{0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) tuple(%zero, %a, %b, %c)
  ROOT %outer = (s32[], f32[32,64]{1,0}, f32[3,64,64]{2,1,0}, f32[1024]{0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
}
"""
TRIPS = 5 * 3
MATMUL_FLOPS = 2 * 32 * 64 * 64
# The slice fusion reads one [64,64] layer (not the stack) and its s32 index, and writes the
# layer; the matmul fusion reads [32,64] and [64,64] and writes [32,64].
SLICE_BYTES = 2 * 64 * 64 * 4 + 4
MATMUL_BYTES = (32 * 64 + 64 * 64 + 32 * 64) * 4
ADD_BYTES = 3 * 4  # the counter's add: two s32 in, one out
COMPARE_BYTES = 2 * 4 + 1  # the inner loop's condition, each trip: two s32 in, a pred out


def test_runs_per_step_multiply_nested_trips():
  runs = Module.parse(HLO).runs_per_step()
  assert runs["outer_body"] == 5 and runs["inner_body"] == TRIPS and runs["matmul"] == TRIPS


def test_work_per_step_counts_each_trip_and_only_the_slice_of_a_stacked_weight():
  flops, hbm = Module.parse(HLO).work_per_step()
  assert flops == TRIPS * MATMUL_FLOPS
  assert hbm == TRIPS * (SLICE_BYTES + MATMUL_BYTES + ADD_BYTES + COMPARE_BYTES)


def test_collective_bytes_per_step_count_trips():
  assert collectives(HLO) == {
    "all-reduce": {"count": 1, "bytes": 4096, "bytes_per_step": TRIPS * 4096}
  }


def test_step_time_by_hand():
  """Each op on the roofline; the all-reduce hides under the matmul it was scheduled around."""
  model = step_model(HLO, CHIP, tokens_per_chip=32)
  matmul_s = max(MATMUL_FLOPS / (1e12 * 0.5), MATMUL_BYTES / 1e9)  # memory-bound: 49 us
  slice_s = SLICE_BYTES / 1e9
  add_s = (ADD_BYTES + COMPARE_BYTES) / 1e9
  all_reduce_s = 2 * 3 / 4 * 4096 / 1e8  # ring: 2(n-1)/n of the bytes, 61 us
  # The all-reduce starts before the slice fusion: it hides under the slice and the matmul,
  # and only the rest waits at its done.
  exposed = max(0.0, all_reduce_s - slice_s - matmul_s)
  assert model["collective_s"] == pytest.approx(TRIPS * all_reduce_s)
  assert model["exposed_collective_s"] == pytest.approx(TRIPS * exposed)
  assert model["step_s"] == pytest.approx(TRIPS * (slice_s + matmul_s + exposed + add_s))
  assert model["seconds_by_kind"]["matmul"] == pytest.approx(TRIPS * matmul_s)
  assert model["tokens_per_s_per_chip"] == pytest.approx(32 / model["step_s"])
  assert model["mfu"] == pytest.approx(TRIPS * MATMUL_FLOPS / (model["step_s"] * 1e12))


@pytest.mark.parametrize(
  "kind, participants, seconds",
  [
    ("all-gather", 4, 3 / 4 * 1e6 / 1e8),
    ("all-reduce", 4, 2 * 3 / 4 * 1e6 / 1e8),
    ("reduce-scatter", 4, 3 * 1e6 / 1e8),
    ("all-to-all", 8, 7 / 8 * 1e6 / 1e8),
    ("collective-permute", 0, 1e6 / 1e8),
    ("all-reduce", 1, 0.0),
  ],
)
def test_collective_seconds_by_hand(kind, participants, seconds):
  assert collective_seconds(kind, 1e6, participants, 1e8) == pytest.approx(seconds)


def test_compute_bound_matmul_by_hand():
  """A large matmul runs at peak x efficiency, not at its bytes' time."""
  n = 4096  # 2n^3 FLOPs take 0.27 s at 0.5 TFLOP/s; its 3n^2 floats 0.2 s at 1 GB/s
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
  model = step_model(compiled, CHIP, tokens_per_chip=n)
  flops = 2 * n**3
  assert model["flops_per_step"] == flops
  assert model["seconds_by_kind"]["matmul"] == pytest.approx(flops / (1e12 * 0.5))


def test_a_scan_of_matmuls_counts_every_trip():
  """XLA's cost analysis counts the loop body once; the plan counts it N times."""
  layers, m, k = 7, 64, 128

  def forward(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

  compiled = (
    jax.jit(forward)
    .lower(
      jax.ShapeDtypeStruct((layers, k, k), jnp.float32), jax.ShapeDtypeStruct((m, k), jnp.float32)
    )
    .compile()
  )
  assert step_model(compiled, CHIP, m)["flops_per_step"] == layers * 2 * m * k * k
  assert Module.parse(compiled.as_text()).work_per_step()[0] == layers * 2 * m * k * k


def test_fitting_the_efficiency_reproduces_a_measured_throughput():
  """A compute-bound program: the fitted efficiency gives back the throughput it was fitted
  on, and is the ratio of that throughput to the model's at efficiency 1."""
  n = 4096
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)
  text = jax.jit(lambda a, b: a @ b).lower(x, x).compile().as_text()
  fast = dataclasses.replace(CHIP, hbm_bytes_per_s=1e15, matmul_efficiency=1.0)
  at_peak = step_model(text, fast, tokens_per_chip=n)["tokens_per_s_per_chip"]
  efficiency = fit_matmul_efficiency(text, fast, n, 0.4 * at_peak)
  assert efficiency == pytest.approx(0.4, rel=1e-6)
  fitted = dataclasses.replace(fast, matmul_efficiency=efficiency)
  assert step_model(text, fitted, n)["tokens_per_s_per_chip"] == pytest.approx(0.4 * at_peak)

"""An optimized HLO module's text, read as a program: its computations, how many times each runs
per step, and what each instruction costs (FLOPs, HBM bytes, collective bytes).

XLA's own cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, so the
scanned layers, micro-batches and loss chunks of a train step count as one trip. Here each
computation's instructions are weighted by the trips of the loops around them: the loop's
`known_trip_count` when the compiler wrote one, else `N` of the condition `i < N` that
`lax.scan` compiles to.

Costs follow XLA's HloCostAnalysis where it matters at LLM scale:

- FLOPs: `2 * output elements * contracted elements` for each `dot` and `convolution`, inside
  fusions too (the TPU compiler writes matmuls as convolutions in fused computations), and the
  `flops` a Pallas kernel declares in its custom call's cost estimate.
- HBM bytes: operands read plus the result written, per top-level instruction (a fusion is one
  pass over memory). A fusion operand that is only sliced (`dynamic-slice`: a scanned layer's
  weights) counts the slice, and a `dynamic-update-slice` counts its update, written in place.
  Values the TPU compiler placed in on-chip memory (a layout's `S(n)` memory space) count none.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
# Instructions that move no data of their own: aliases, control flow (its bodies are costed
# instead), the second half of async pairs, and buffers the compiler only reserves.
FREE = {
  "parameter",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "constant",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "add-dependency",
  "while",
  "conditional",
  "call",
  "copy-done",
  "async-update",
  "async-done",
  "all-gather-done",
  "all-reduce-done",
  "collective-permute-done",
  "send-done",
  "recv-done",
  "recv",
}
# [length, length] x [length, head_dim] products per attention kernel, by the name in its op
# name: the forward (QK^T, PV), the backward's dK/dV (QK^T again, dP, dV, dK) and dQ (QK^T,
# dP, dQ) kernels, or one fused backward.
ATTENTION_PRODUCTS = {
  "dkv": 4,
  "bwd_dq": 3,
  "_dq_": 3,
  "fused_bwd": 5,
  "bwd": 5,
  "fwd": 2,
  "flash_attention": 2,
}
CAUSAL_FRACTION = 0.5
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_OPERAND = re.compile(r"%([\w.\-]+)")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_BOUND = re.compile(r"constant\((\d+)\)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=([^_]+)_([^-]+)->(\w+)")
_WINDOW = re.compile(r"window=\{([^}]*)\}")
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{[^}]*"flops":"?(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DCN_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  result: str  # the result's type text: `bf16[8,128]{1,0}` or a tuple `(f32[], ...)`
  operands: tuple[str, ...]
  attributes: str  # everything after the operand list
  line: str = dataclasses.field(repr=False)

  @property
  def called(self) -> dict[str, str]:
    """{role: computation} for `calls=`, `to_apply=`, `body=` and `condition=`."""
    return dict(_CALLED.findall(self.attributes))

  @property
  def op_name(self) -> str:
    found = _OP_NAME.search(self.attributes)
    return found.group(1) if found else ""


def shape_bytes(type_text: str, on_chip_too: bool = False) -> float:
  """Bytes of every array in a type (all elements of a tuple); arrays the compiler placed in an
  on-chip memory space count 0 unless `on_chip_too`."""
  total = 0.0
  for dtype, dims, layout in _SHAPE.findall(type_text):
    if not on_chip_too and layout and _ON_CHIP.search(layout):
      continue
    total += math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
  return total


def _dims(type_text: str) -> list[int]:
  found = _SHAPE.search(type_text)
  return [int(d) for d in found.group(2).split(",") if d] if found else []


def _split_operands(text: str, start: int) -> tuple[str, int]:
  """The text inside the parentheses opening at `text[start]`, and the index after them."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return text[start + 1 : i], i + 1
  return text[start + 1 :], len(text)


def parse_instruction(line: str) -> Instruction | None:
  named = _NAME.match(line)
  if not named:
    return None
  rest = line[named.end() :]
  if rest.startswith("("):  # a tuple type: up to its matching parenthesis
    result, end = _split_operands(rest, 0)
    result, rest = f"({result})", rest[end:]
  else:
    result, _, rest = rest.partition(" ")
    rest = " " + rest
  opcode = _OPCODE.match(rest)
  if not opcode:
    return None
  operands, end = _split_operands(rest, opcode.end() - 1)
  return Instruction(
    name=named.group(1),
    opcode=opcode.group(1),
    result=result,
    operands=tuple(_OPERAND.findall(operands)),
    attributes=rest[end:],
    line=line,
  )


@dataclasses.dataclass
class Module:
  """An HLO module: its computations (instructions in schedule order) and the entry's name."""

  computations: dict[str, list[Instruction]]
  entry: str | None
  by_name: dict[str, Instruction]

  @classmethod
  def parse(cls, hlo_text: str) -> Module:
    computations, entry, current, lines = {}, None, None, []
    for line in hlo_text.splitlines():
      header = _HEADER.match(line)
      if header:
        current = header.group(2)
        computations[current] = lines = []
        entry = current if header.group(1) else entry
      elif line == "}":  # (a custom call's backend config may hold lines starting with "}")
        current = None
      elif current is not None:
        if _NAME.match(line) or not lines:
          lines.append(line)
        else:  # a kernel's metadata may span lines: they belong to the instruction above
          lines[-1] += "\n" + line
    for name, body in computations.items():
      computations[name] = [i for i in map(parse_instruction, body) if i is not None]
    by_name = {i.name: i for body in computations.values() for i in body}
    return cls(computations, entry, by_name)

  def trips(self, loop: Instruction) -> int:
    """Iterations of a while loop: the compiler's `known_trip_count` when it wrote one, else N
    of a condition `counter < N` (what `lax.scan` compiles to); 1 when neither is known."""
    known = _KNOWN_TRIPS.search(loop.attributes)
    if known:
      return int(known.group(1))
    condition = self.computations.get(loop.called.get("condition"), [])
    bounds = {int(n) for i in condition for n in _TRIP_BOUND.findall(i.line)}
    return bounds.pop() if len(bounds) == 1 else 1

  def callees(self, instruction: Instruction):
    """(computation, runs per run of `instruction`) for each computation it calls."""
    called = instruction.called
    trips = self.trips(instruction) if instruction.opcode == "while" else 1
    for role, name in called.items():
      yield name, trips if role in ("body", "condition") else 1
    for branches in _BRANCHES.findall(instruction.attributes):
      for name in branches.replace("%", "").split(","):
        yield name.strip(), 1

  def runs_per_step(self) -> collections.Counter:
    """{computation: times it runs per call of the entry}: loop bodies times their trips."""
    order, seen = [], set()

    def visit(name):  # depth first: each computation lands after every one it calls
      if name not in seen:
        seen.add(name)
        for instruction in self.computations.get(name, []):
          for callee, _ in self.callees(instruction):
            visit(callee)
        order.append(name)

    if self.entry is None:
      return collections.Counter()
    visit(self.entry)
    runs = collections.Counter({self.entry: 1})
    for name in reversed(order):  # callers before callees
      for instruction in self.computations.get(name, []):
        for callee, times in self.callees(instruction):
          runs[callee] += runs[name] * times
    return runs

  def work_per_step(self) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one call of the entry, each instruction times its runs."""
    runs = self.runs_per_step()
    inside = {  # computations that are parts of an instruction, costed with it
      name
      for body in self.computations.values()
      for instruction in body
      for role, name in instruction.called.items()
      if role in ("calls", "to_apply")
    }
    flops = hbm = 0.0
    for name, body in self.computations.items():
      if name in inside or not runs.get(name):
        continue
      for instruction in body:
        flops += runs[name] * self.flops(instruction)
        hbm += runs[name] * self.hbm_bytes(instruction)
    return flops, hbm

  def users(self, computation: str) -> dict[str, list[Instruction]]:
    found = collections.defaultdict(list)
    for instruction in self.computations.get(computation, []):
      for operand in instruction.operands:
        found[operand].append(instruction)
    return found

  def flops(self, instruction: Instruction) -> float:
    """Matmul FLOPs of one run of `instruction` (a fusion: of every dot inside it)."""
    opcode = instruction.opcode
    if opcode == "dot":
      lhs = _dims(self.by_name[instruction.operands[0]].result)
      contracting = _CONTRACTING.search(instruction.attributes)
      axes = [int(a) for a in contracting.group(1).split(",") if a] if contracting else []
      return 2 * math.prod(_dims(instruction.result)) * math.prod(lhs[a] for a in axes)
    if opcode == "convolution":
      return 2 * math.prod(_dims(instruction.result)) * self._window_macs(instruction)
    if opcode == "fusion":
      return self._computation_flops(instruction.called["calls"])
    if opcode == "custom-call":
      declared = _KERNEL_FLOPS.search(instruction.attributes)  # a Pallas kernel's own estimate
      return float(declared.group(1)) if declared else self._attention_kernel_flops(instruction)
    return 0.0

  def _attention_kernel_flops(self, kernel: Instruction) -> float:
    """FLOPs of a flash/splash attention kernel that declares none, from its query's shape
    [..., heads, length, head_dim]: 2 per multiply-add of each [length, length] product it
    computes (`ATTENTION_PRODUCTS`), half of them under a causal mask (assumed: LM training)."""
    name = kernel.op_name
    pass_ = next((p for p in ATTENTION_PRODUCTS if p in name), None)
    if pass_ is None:
      return 0.0
    floats = [
      _dims(self.by_name[o].result)
      for o in kernel.operands
      if o in self.by_name and re.match(r"\(?(bf16|f16|f32)\[", self.by_name[o].result)
    ]
    query = max(floats, key=math.prod, default=[])
    if len(query) < 3:
      return 0.0
    return 2 * ATTENTION_PRODUCTS[pass_] * math.prod(query) * query[-2] * CAUSAL_FRACTION

  def _window_macs(self, convolution: Instruction) -> float:
    """Multiply-adds per output element of a convolution: its input features times the
    kernel positions that land on the input, not on padding (the TPU compiler writes some
    matmuls as a window over a padded size-1 input: one real position per output)."""
    lhs = _dims(self.by_name[convolution.operands[0]].result)
    kernel = _dims(self.by_name[convolution.operands[1]].result)
    labels = _DIM_LABELS.search(convolution.attributes)
    if not labels:
      return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    out = _dims(convolution.result)
    window = _WINDOW.search(convolution.attributes)
    settings = dict(
      item.split("=", 1) for item in (window.group(1).split() if window else []) if "=" in item
    )
    pads = [p.split("_") for p in settings.get("pad", "").split("x") if p]
    strides = [int(n) for n in settings.get("stride", "").split("x") if n]
    macs = float(kernel[kernel_labels.index("i")])
    for d, label in enumerate(sorted(c for c in kernel_labels if c.isdigit())):
      size = kernel[kernel_labels.index(label)]
      if d < len(pads) and (not strides or strides[d] == 1):
        macs *= _valid_positions(
          lhs[lhs_labels.index(label)], size, out[out_labels.index(label)], int(pads[d][0])
        )
      else:
        macs *= size
    return macs

  def _computation_flops(self, computation: str) -> float:
    cache = self.__dict__.setdefault("_flops_cache", {})
    if computation not in cache:
      cache[computation] = sum(self.flops(i) for i in self.computations.get(computation, []))
    return cache[computation]

  def hbm_bytes(self, instruction: Instruction) -> float:
    """HBM bytes one run of `instruction` reads and writes (0 for collectives: `collective`)."""
    opcode = instruction.opcode
    if opcode in FREE or self.collective(instruction) or opcode.endswith("-start"):
      return 0.0
    if opcode in ("dynamic-slice", "slice"):
      return 2 * shape_bytes(instruction.result)
    if opcode == "dynamic-update-slice":
      return 2 * self._operand_bytes(instruction, 1)
    if opcode == "fusion":
      fused = instruction.called["calls"]
      return self._fusion_reads(instruction, fused) + self._fusion_writes(fused)
    return shape_bytes(instruction.result) + sum(
      self._operand_bytes(instruction, i) for i in range(len(instruction.operands))
    )

  def _operand_bytes(self, instruction: Instruction, index: int) -> float:
    operand = self.by_name.get(instruction.operands[index])
    return shape_bytes(operand.result) if operand else 0.0

  def _fusion_reads(self, fusion: Instruction, fused: str) -> float:
    users = self.users(fused)
    total = 0.0
    for parameter in self.computations.get(fused, []):
      index = (
        re.search(r"parameter\((\d+)\)", parameter.line)
        if parameter.opcode == "parameter"
        else None
      )
      if index is None or int(index.group(1)) >= len(fusion.operands):
        continue
      full = self._operand_bytes(fusion, int(index.group(1)))
      partial = _sliced_read(parameter.name, users)
      total += full if partial is None else min(partial, full)
    return total

  def _fusion_writes(self, fused: str) -> float:
    body = self.computations.get(fused, [])
    root = next(
      (i for i in body if i.line.lstrip().startswith("ROOT ")), body[-1] if body else None
    )
    if root is None:
      return 0.0
    named = {i.name: i for i in body}
    outputs = [named[o] for o in root.operands if o in named] if root.opcode == "tuple" else [root]
    total = 0.0
    for output in outputs:
      while output.opcode == "bitcast" and output.operands[0] in named:
        output = named[output.operands[0]]
      in_place = output.opcode == "dynamic-update-slice" and output.operands[1] in named
      total += shape_bytes(named[output.operands[1]].result if in_place else output.result)
    return total

  def collective(self, instruction: Instruction) -> tuple[str, float, int] | None:
    """(kind, bytes, participants) when `instruction` is a collective (sync, `-start`, or an
    `async-start` wrapping one); bytes are the result's (an async all-gather's or permute's
    output alone). Participants: the replica group's size (0 when it names none). A transfer
    between slices is `dcn-<kind>` with the bytes this chip sends."""
    opcode = instruction.opcode
    if opcode == "send":  # between slices, the runtime's DCN transfers are sends and receives
      transfer = _DCN_TRANSFER.search(instruction.attributes)
      payload = _SHAPE.search(instruction.result)
      if not (transfer and payload):
        return None
      kind = "dcn-" + transfer.group(1).lower().replace("_", "-")
      return kind, shape_bytes(payload.group(0), on_chip_too=True), 0
    if opcode == "async-start":
      inner = [
        i
        for i in self.computations.get(instruction.called.get("calls"), [])
        if i.opcode in COLLECTIVES
      ]
      return self.collective(inner[0]) if inner else None
    kind = opcode.removesuffix("-start")
    if kind not in COLLECTIVES:
      return None
    sizes = [shape_bytes(f"{d}[{s}]") for d, s, _ in _SHAPE.findall(instruction.result)]
    output_only = opcode.endswith("-start") and kind in ("all-gather", "collective-permute")
    size = max(sizes, default=0) if output_only else sum(sizes)
    return kind, size, _group_size(instruction.attributes)


def _valid_positions(size: int, window: int, outputs: int, pad_low: int) -> float:
  """Mean number of a stride-1 window's positions per output that fall inside an input of
  `size` (not in the padding): output o, window position k read input o + k - pad_low."""
  pairs = sum(
    max(0, min(outputs - 1, x + pad_low) - max(0, x + pad_low - window + 1) + 1)
    for x in range(size)
  )
  return pairs / outputs


def _sliced_read(name: str, users: dict) -> float | None:
  """Bytes read of value `name` inside a fused computation when it is only sliced or updated
  in place (through bitcasts); None when some user reads all of it."""
  total = 0.0
  for user in users.get(name, []):
    if user.opcode == "bitcast":
      inner = _sliced_read(user.name, users)
      if inner is None:
        return None
      total += inner
    elif user.opcode in ("dynamic-slice", "slice") and user.operands[0] == name:
      total += shape_bytes(user.result)
    elif not (user.opcode == "dynamic-update-slice" and user.operands[0] == name):
      return None
  return total


def _group_size(attributes: str) -> int:
  mesh = _GROUPS_MESH.search(attributes)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes.get(axis, 1)) for axis in re.findall(r"'([^']+)'", mesh.group(2)))
  iota = _GROUPS_IOTA.search(attributes)
  if iota:
    return int(iota.group(2))
  listed = _GROUPS_LIST.search(attributes)
  return len(listed.group(1).split(",")) if listed and listed.group(1) else 0


def collectives(hlo_text: str) -> dict:
  """{kind: {"count", "bytes", "bytes_per_step"}} of the collectives (and sorts) in an HLO
  module's text.

  `count` and `bytes` count each op in the program once; `bytes_per_step` counts it as
  many times as it runs in one call of the program: ops in a loop body (layers, micro-steps,
  loss chunks) times the loop's trips. Bytes are those of each op's result: all tensors
  of a combined op; the output alone of an async all-gather or collective-permute, whose
  `-start` tuple also holds its input.
  """
  module = Module.parse(hlo_text)
  runs = module.runs_per_step()
  found = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "bytes_per_step": 0})
  for name, body in module.computations.items():
    for instruction in body:
      if instruction.opcode == "sort":
        kind, size = "sort", shape_bytes(instruction.result, on_chip_too=True)
      elif instruction.opcode != "async-start" and module.collective(instruction):  # not twice
        kind, size, _ = module.collective(instruction)
      else:
        continue
      found[kind]["count"] += 1
      found[kind]["bytes"] += int(size)
      found[kind]["bytes_per_step"] += int(size) * runs.get(name, 1)
  return dict(found)

"""A step time at the chip's roofline, from a compiled program's optimized (per-chip SPMD) HLO text.

Each op the step executes costs max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth); the estimate is their
sum. Ops in a while loop count once per iteration (the scanned layers); a fusion moves its operands and
outputs through HBM and does the FLOPs of the dots, convolutions and elementwise work fused into it; of a
conditional, the costliest branch counts. Collectives are listed with their bytes, not timed (no interconnect
model). jaxlib 0.10 gives XLA's cost analysis only as module totals (`Compiled.cost_analysis()`), not per
instruction, hence the parse.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2}
DTYPE_BYTES |= {"f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
DTYPE_BYTES |= {"c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
# One FLOP per output element (transcendentals included).
ELEMENTWISE = frozenset(
  "abs add and atan2 cbrt ceil clamp compare cosine divide erf exponential exponential-minus-one floor "
  "is-finite log log-plus-one logistic maximum minimum multiply negate not or popcnt power remainder "
  "round-nearest-afz round-nearest-even rsqrt select shift-left shift-right-arithmetic shift-right-logical "
  "sign sine sqrt subtract tan tanh xor".split()
)
COLLECTIVES = frozenset(
  "all-gather all-reduce all-to-all collective-broadcast collective-permute ragged-all-to-all reduce-scatter "
  "send recv".split()
)
# No work of their own (aliases, bookkeeping); the "-done" half of an async pair is skipped too.
FREE = frozenset(
  "add-dependency after-all async-update bitcast constant domain get-tuple-element opt-barrier parameter "
  "partition-id replica-id tuple".split()
)
SLICES = frozenset(("dynamic-slice", "slice", "gather"))

_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\](\{[^}]*\})?")
_HEAD = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


# Parsing.


@dataclasses.dataclass(frozen=True)
class Instr:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str
  root: bool = False
  args: str = ""  # the text between the parentheses: a parameter's number, a constant's value

  def called(self, key: str) -> str | None:
    """The computation attribute `key` names (calls, body, condition, to_apply), if any."""
    m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  def attr(self, pattern: str) -> str | None:
    m = re.search(pattern, self.attrs)
    return m.group(1) if m else None

  @property
  def source(self) -> str:
    """The jax op that produced it (metadata op_name), if recorded."""
    return self.attr(r'op_name="([^"]*)"') or ""


def _close(text: str, start: int) -> int:
  """Index just past the bracket group that opens at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += (text[i] in "({[") - (text[i] in ")}]")
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def _instruction(line: str) -> Instr | None:
  head = _HEAD.match(line)
  if not head:
    return None
  i = head.end()
  j = _close(line, i) if line[i] == "(" else line.index(" ", i)  # a tuple shape, or one array's
  rest = line[j:].lstrip()
  m = re.match(r"([\w\-]+)\(", rest)
  if not m:
    return None
  close = _close(rest, m.end() - 1)
  inside = rest[m.end() : close - 1]
  operands = tuple(re.findall(r"%([\w.\-]+)", inside))
  return Instr(head.group(2), line[i:j], m.group(1), operands, rest[close:], bool(head.group(1)), inside)


def parse(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
  """HLO text -> ({computation: {instruction name: Instr}}, the entry computation's name)."""
  computations: dict[str, dict[str, Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and not line.startswith("HloModule"):
        current = computations.setdefault(m.group(2), {})
        entry = m.group(2) if m.group(1) else entry
    elif line.startswith("}"):  # "}" or "}, execution_thread=..."
      current = None
    elif instr := _instruction(line):
      current[instr.name] = instr
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text: pass compiled.as_text()")
  return computations, entry


def _root(comp: dict[str, Instr]) -> Instr:
  return next(i for i in comp.values() if i.root)


def _parameter(comp: dict[str, Instr], number: int) -> str:
  return next(i.name for i in comp.values() if i.opcode == "parameter" and int(i.args) == number)


# Sizes.


def arrays(shape: str) -> list[tuple[str, tuple[int, ...], int]]:
  """The arrays of a (tuple) shape: (dtype, dims, memory space); space 0 is HBM, S(1) is a TPU's VMEM."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype in DTYPE_BYTES:
      space = re.search(r"S\((\d+)\)", layout or "")
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
  return out


def elements(shape: str) -> int:
  return sum(math.prod(dims) for _, dims, _ in arrays(shape))


def shape_bytes(shape: str, hbm_only: bool = True) -> float:
  """Logical bytes (no layout padding) of the arrays in HBM, or of all of them."""
  return sum(DTYPE_BYTES[t] * math.prod(d) for t, d, space in arrays(shape) if space == 0 or not hbm_only)


# FLOPs.


def dot_flops(instr: Instr, comp: dict[str, Instr]) -> float:
  """2 x output elements (batch dimensions included) x the contracted size."""
  lhs = arrays(comp[instr.operands[0]].shape)[0][1]
  contracting = instr.attr(r"lhs_contracting_dims=\{([\d,]*)\}") or ""
  return 2.0 * elements(instr.shape) * math.prod(lhs[int(d)] for d in contracting.split(",") if d)


def valid_taps(out: int, size: int, stride: int, pad_low: int, lhs_dilate: int, rhs_dilate: int, base: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that meet an input element, not padding
  or a hole of lhs dilation (how XLA writes transposed convolutions, and batch dimensions of dots on TPU)."""
  extent, rows = (base - 1) * lhs_dilate + 1, max(1, 2**22 // max(size, 1))
  taps, count = np.arange(size)[None, :] * rhs_dilate - pad_low, 0
  for start in range(0, out, rows):  # bounded memory for long windows
    pos = np.arange(start, min(out, start + rows))[:, None] * stride + taps
    count += int(np.count_nonzero((pos >= 0) & (pos < extent) & (pos % lhs_dilate == 0)))
  return count


def convolution_flops(instr: Instr, comp: dict[str, Instr]) -> float:
  """2 x output batch x output features x kernel input features x the valid taps of each spatial dimension."""
  lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs).groups()
  lhs, kernel = arrays(comp[instr.operands[0]].shape)[0][1], arrays(comp[instr.operands[1]].shape)[0][1]
  out = arrays(instr.shape)[0][1]
  window = dict(item.split("=") for item in (instr.attr(r"window=\{([^}]*)\}") or "").split())
  flops = 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")]
  for d in range(sum(c.isdigit() for c in out_labels)):
    get = lambda key, d=d: int(window[key].split("x")[d]) if key in window else 1  # noqa: E731
    pad_low = int(window["pad"].split("x")[d].split("_")[0]) if "pad" in window else 0
    out_size, base = out[out_labels.index(str(d))], lhs[lhs_labels.index(str(d))]
    flops *= valid_taps(out_size, get("size"), get("stride"), pad_low, get("lhs_dilate"), get("rhs_dilate"), base)
  return flops


def instruction_flops(instr: Instr, comp: dict[str, Instr], computations: dict) -> float:
  if instr.opcode == "dot":
    return dot_flops(instr, comp)
  if instr.opcode == "convolution":
    return convolution_flops(instr, comp)
  if instr.opcode == "fusion":
    inner = computations[instr.called("calls")]
    return sum(instruction_flops(i, inner, computations) for i in inner.values())
  if instr.opcode in ("reduce", "reduce-window"):  # one per input element reduced
    return float(sum(elements(comp[o].shape) for o in instr.operands[: len(instr.operands) // 2]))
  return float(elements(instr.shape)) if instr.opcode in ELEMENTWISE else 0.0


# HBM bytes of a fusion.


def _is_view(instr: Instr, computations: dict) -> bool:
  """A bitcast or reshape inside a fusion, or a nested fusion of nothing else (TPU): no data moves."""
  if instr.opcode in ("bitcast", "reshape"):
    return True
  called = instr.called("calls") if instr.opcode == "fusion" else None
  return called is not None and all(
    i.opcode in ("bitcast", "reshape", "parameter") for i in computations[called].values()
  )


def bytes_read(comp: dict[str, Instr], name: str, full: float, computations: dict) -> float:
  """Bytes of value `name` a fused computation reads: the slices where only slices read it (a scanned
  layer's share of a stacked array), none where it is the buffer a dynamic-update-slice updates in
  place, else all of it, once."""
  total = 0.0
  for instr in comp.values():
    for k, operand in enumerate(instr.operands):
      if operand != name:
        continue
      if _is_view(instr, computations):
        total += bytes_read(comp, instr.name, full, computations)
      elif instr.opcode in SLICES and k == 0:
        total += shape_bytes(instr.shape, hbm_only=False)
      elif instr.opcode == "dynamic-update-slice" and k == 0:
        continue
      elif instr.opcode == "fusion":
        inner = computations[instr.called("calls")]
        total += bytes_read(inner, _parameter(inner, k), full, computations)
      else:
        return full
  return min(total, full)


def bytes_written(comp: dict[str, Instr], instr: Instr, computations: dict) -> float:
  """Bytes a fused output writes: only the update where a dynamic-update-slice writes it in place."""
  while instr.opcode in ("bitcast", "reshape"):
    instr = comp[instr.operands[0]]
  if instr.opcode == "dynamic-update-slice":
    return shape_bytes(comp[instr.operands[1]].shape, hbm_only=False)
  if instr.opcode == "fusion":
    inner = computations[instr.called("calls")]
    return bytes_written(inner, _root(inner), computations)
  return shape_bytes(instr.shape, hbm_only=False)


def fusion_bytes(instr: Instr, caller: dict[str, Instr], computations: dict, whole: bool = False) -> float:
  """HBM bytes a fusion reads and writes; operands and outputs held on chip (TPU VMEM) move nothing.
  whole=True: every operand and output in full, as XLA's own cost analysis counts them."""
  fused = computations[instr.called("calls")]
  root = _root(fused)
  outputs = [fused[o] for o in root.operands] if root.opcode == "tuple" else [root]
  total = 0.0
  for out, (_, _, space) in zip(outputs, arrays(instr.shape)):
    if space == 0:
      total += shape_bytes(out.shape, False) if whole else bytes_written(fused, out, computations)
  for k, operand in enumerate(instr.operands):
    full = shape_bytes(caller[operand].shape)
    if full:
      total += full if whole else bytes_read(fused, _parameter(fused, k), full, computations)
  return total


# Loops.


def _unfused(instr: Instr, comp: dict[str, Instr], computations: dict) -> tuple[Instr, list[Instr]]:
  """(the op, its operand instructions), looking through a fusion that wraps one scalar op (XLA:CPU)."""
  if instr.opcode != "fusion":
    return instr, [comp[o] for o in instr.operands]
  inner = computations[instr.called("calls")]
  outer = {i.name: comp[instr.operands[int(i.args)]] for i in inner.values() if i.opcode == "parameter"}
  root = _root(inner)
  return root, [outer.get(o, inner[o]) for o in root.operands]


def _copied(instr: Instr, comp: dict[str, Instr]) -> Instr:
  """What a chain of copies, bitcasts and converts starts from."""
  while instr.opcode in ("copy", "bitcast", "convert") and instr.operands:
    instr = comp[instr.operands[0]]
  return instr


def _tuple_index(instr: Instr, comp: dict[str, Instr]) -> int | None:
  instr = _copied(instr, comp)
  index = instr.attr(r"index=(\d+)")
  return int(index) if instr.opcode == "get-tuple-element" and index else None


def _constant(instr: Instr, comp: dict[str, Instr]) -> int | None:
  instr = _copied(instr, comp)
  return int(instr.args) if instr.opcode == "constant" and re.fullmatch(r"-?\d+", instr.args) else None


def trip_count(loop: Instr, caller: dict[str, Instr], computations: dict) -> int | None:
  """Iterations of a while loop: XLA's known_trip_count where it wrote one (XLA:CPU), else read off the
  loop (TPU): `i < N` (<=, >, >=) in its condition, i's start in the init tuple, its step in the body.
  None where the loop is not of that form."""
  known = loop.attr(r'"known_trip_count":\{"n":"(\d+)"')
  if known:
    return int(known)
  cond = computations[loop.called("condition")]
  compare, operands = _unfused(_root(cond), cond, computations)
  direction = compare.attr(r"direction=(\w+)")
  init = caller.get(loop.operands[0])
  if compare.opcode != "compare" or len(operands) != 2 or init is None or init.opcode != "tuple":
    return None
  i, limit = operands
  if _tuple_index(i, cond) is None:  # N > i is i < N
    i, limit, direction = limit, i, {"GT": "LT", "GE": "LE"}.get(direction)
  index, n = _tuple_index(i, cond), _constant(limit, cond)
  if index is None or n is None or direction not in ("LT", "LE"):
    return None
  start = _constant(caller[init.operands[index]], caller)
  body = computations[loop.called("body")]
  add, terms = _unfused(body[_root(body).operands[index]], body, computations)
  steps = [_constant(t, body) for t in terms if _tuple_index(t, body) != index]
  if start is None or add.opcode != "add" or len(steps) != 1 or not steps[0] or steps[0] < 0:
    return None
  return max(-(-(n - start + (direction == "LE")) // steps[0]), 0)


# The estimate.


@dataclasses.dataclass(frozen=True)
class Op:
  """One op of the step: FLOPs and HBM bytes per execution, and how many times a step executes it."""

  name: str
  kind: str
  flops: float
  bytes: float
  times: int = 1
  source: str = ""

  def seconds(self, peak_flops: float, hbm_bytes_per_s: float) -> float:
    return self.times * max(self.flops / peak_flops, self.bytes / hbm_bytes_per_s)

  def bound(self, peak_flops: float, hbm_bytes_per_s: float) -> str:
    return "compute" if self.flops / peak_flops >= self.bytes / hbm_bytes_per_s else "memory"


@dataclasses.dataclass(frozen=True)
class Estimate:
  """One chip's step at the roofline: its ops, and what is left out of the time."""

  ops: tuple[Op, ...]
  collectives: tuple[Op, ...]  # bytes per chip; not in `seconds`
  unknown_trip_counts: tuple[str, ...]  # while loops counted once: no trip count found
  peak_flops: float
  hbm_bytes_per_s: float

  def op_seconds(self, op: Op) -> float:
    return op.seconds(self.peak_flops, self.hbm_bytes_per_s)

  @property
  def seconds(self) -> float:
    return sum(map(self.op_seconds, self.ops))

  @property
  def compute_bound_seconds(self) -> float:
    peaks = (self.peak_flops, self.hbm_bytes_per_s)
    return sum(self.op_seconds(op) for op in self.ops if op.bound(*peaks) == "compute")

  @property
  def flops(self) -> float:
    return sum(op.times * op.flops for op in self.ops)

  @property
  def bytes(self) -> float:
    return sum(op.times * op.bytes for op in self.ops)

  @property
  def collective_bytes(self) -> float:
    return sum(op.times * op.bytes for op in self.collectives)

  def once(self) -> tuple[float, float]:
    """(FLOPs, bytes) with every instruction counted once, loops not unrolled: what cost_analysis() counts."""
    return sum(op.flops for op in self.ops), sum(op.bytes for op in self.ops)

  def top(self, n: int = 10) -> list[dict]:
    """The n costliest ops as rows: name, kind, executions, GFLOP and MB over the step, ms, bound, jax op."""
    peaks = (self.peak_flops, self.hbm_bytes_per_s)
    return [
      {
        "name": op.name,
        "kind": op.kind,
        "times": op.times,
        "gflop": round(op.times * op.flops / 1e9, 2),
        "mb": round(op.times * op.bytes / 1e6, 1),
        "ms": round(self.op_seconds(op) * 1e3, 3),
        "bound": op.bound(*peaks),
        "source": op.source,
      }
      for op in sorted(self.ops, key=self.op_seconds, reverse=True)[:n]
    ]


def _fusion_kind(name: str, computations: dict) -> str:
  """A fusion named by the heaviest work fused into it."""
  codes = {i.opcode for i in computations[name].values()}
  codes |= {_fusion_kind(i.called("calls"), computations) for i in computations[name].values() if i.opcode == "fusion"}
  heavy = ("convolution", "dot", "scatter", "gather", "reduce-window", "reduce", "dynamic-update-slice")
  return next((k for k in heavy + ("dynamic-slice", "transpose", "copy") if k in codes), "elementwise")


@dataclasses.dataclass
class _Walk:
  """Collects the ops of a computation and of what it calls, each with its executions per step."""

  computations: dict
  peaks: tuple[float, float]
  whole: bool
  ops: list = dataclasses.field(default_factory=list)
  collectives: list = dataclasses.field(default_factory=list)
  unknown: list = dataclasses.field(default_factory=list)

  def computation(self, name: str, times: int) -> _Walk:
    comp = self.computations[name]
    for instr in comp.values():
      self.instruction(instr, comp, times)
    return self

  def instruction(self, instr: Instr, comp: dict, times: int) -> None:
    code = instr.opcode
    allocation = instr.attr(r'custom_call_target="(AllocateBuffer)"')  # moves no data; XLA counts its output
    if code in FREE or code.endswith("-done") or (allocation and not self.whole):
      return
    if code == "while":
      n = trip_count(instr, comp, self.computations)
      if n is None:
        self.unknown.append(instr.name)
      self.computation(instr.called("body"), times * (1 if n is None else n))
      self.computation(instr.called("condition"), times * (1 if n is None else n + 1))
    elif code in ("call", "call-start"):  # call-start: an async call (TPU: a SparseCore offload)
      self.computation(instr.called("to_apply"), times)
    elif code == "conditional":  # the costliest branch
      names = re.findall(r"%?([\w.\-]+)", instr.attr(r"branch_computations=\{([^}]*)\}") or "")
      names = names or [instr.called("true_computation"), instr.called("false_computation")]
      walks = [_Walk(self.computations, self.peaks, self.whole).computation(b, times) for b in names]
      best = max(walks, key=lambda w: sum(op.seconds(*self.peaks) for op in w.ops))
      self.ops += best.ops
      self.collectives += best.collectives
      self.unknown += best.unknown
    else:
      kind = code.removesuffix("-start")
      if code == "async-start":  # named by what it wraps
        kind = _root(self.computations[instr.called("calls")]).opcode
      if kind in COLLECTIVES:
        moved = max(sum(shape_bytes(comp[o].shape, False) for o in instr.operands), shape_bytes(instr.shape, False))
        self.collectives.append(Op(instr.name, kind, 0.0, moved, times, instr.source))
      else:
        self.ops.append(Op(instr.name, *self.cost(instr, comp, kind), times, instr.source))

  def cost(self, instr: Instr, comp: dict, kind: str) -> tuple[str, float, float]:
    """(kind, FLOPs, HBM bytes) of one execution of a top-level op."""
    code, flops = instr.opcode, instruction_flops(instr, comp, self.computations)
    if code == "fusion":
      fused = instr.called("calls")
      return (
        f"fusion:{_fusion_kind(fused, self.computations)}",
        flops,
        fusion_bytes(instr, comp, self.computations, self.whole),
      )
    if code == "copy-start":  # between HBM and on-chip memory: the data moves once
      return kind, 0.0, shape_bytes(comp[instr.operands[0]].shape, False)
    if code in SLICES:  # reads the slice, writes it
      return kind, 0.0, 2 * shape_bytes(instr.shape)
    if code == "dynamic-update-slice":  # in place: reads the update, writes it
      return kind, 0.0, 2 * shape_bytes(comp[instr.operands[1]].shape)
    return kind, flops, sum(shape_bytes(comp[o].shape) for o in instr.operands) + shape_bytes(instr.shape)


def estimate(hlo, peak_flops: float, hbm_bytes_per_s: float, whole_operands: bool = False) -> Estimate:
  """One chip's step at the roofline, from `compiled.as_text()` (or its parse()) and the chip's peaks.
  whole_operands=True counts every operand and output in full (XLA's cost-analysis rules), for comparing
  with it."""
  computations, entry = parse(hlo) if isinstance(hlo, str) else hlo
  walk = _Walk(computations, (peak_flops, hbm_bytes_per_s), whole_operands).computation(entry, 1)
  return Estimate(tuple(walk.ops), tuple(walk.collectives), tuple(walk.unknown), peak_flops, hbm_bytes_per_s)

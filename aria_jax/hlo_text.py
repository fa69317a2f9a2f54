"""Optimized HLO text, parsed: computations, instructions, array shapes, loop trip counts.

What `hlo_cost` needs of the text `compiled.as_text()` prints, and no more: each instruction's
result shape, opcode, operands and attributes (the computations it calls, its backend config).
Trip counts come from a loop's `known_trip_count` when the compiler recorded one, else from the
induction pattern every `fori_loop` and `scan` compiles to: a counter starting at a constant,
compared with a constant in the condition, and stepped by a constant in the body.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cached_property

_ELEMENT_BITS = {"pred": 8, "token": 0, "bf16": 16, "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b(pred|token|bf16|c64|c128|f8e\w+|[suf]\d+)\[([^\]]*)\](\{[^}]*\})?")


def _element_bits(element_type: str) -> int:
    if element_type in _ELEMENT_BITS:
        return _ELEMENT_BITS[element_type]
    if element_type.startswith("f8"):
        return 8
    return int(element_type[1:])


@dataclasses.dataclass(frozen=True)
class Array:
    dims: tuple[int, ...]
    bits: int
    memory_space: int  # 0: HBM (device memory); TPU's S(1) is on-chip VMEM

    @property
    def bytes(self) -> int:
        return math.prod(self.dims) * self.bits // 8


def arrays_of(shape: str) -> list[Array]:
    """Every array of a (possibly tuple) shape, in order."""
    found = []
    for element_type, dims, layout in _ARRAY.findall(shape):
        sizes = tuple(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
        space = re.search(r"S\((\d+)\)", layout or "")
        found.append(Array(sizes, _element_bits(element_type), int(space.group(1)) if space else 0))
    return found


def hbm_bytes(shape: str) -> int:
    return sum(array.bytes for array in arrays_of(shape) if array.memory_space == 0)


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    operand_text: str
    attributes: str
    is_root: bool

    def called(self, key: str) -> list[str]:
        """Computations named by `key=%c` or `key={%a, %b}`."""
        match = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attributes)
        return re.findall(r"%?([\w.\-]+)", match.group(1).strip("{}")) if match else []

    @cached_property
    def estimated_cycles(self) -> int | None:
        match = re.search(r'"estimated_cycles":"(\d+)"', self.attributes)
        return int(match.group(1)) if match else None

    @property
    def custom_call_target(self) -> str | None:
        match = re.search(r'custom_call_target="([^"]*)"', self.attributes)
        return match.group(1) if match else None

    @property
    def source(self) -> str:
        """The JAX operation it was compiled from (its `op_name` metadata)."""
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""

    def integer_list(self, key: str) -> list[int]:
        match = re.search(rf"\b{key}=\{{([\d,]*)\}}", self.attributes)
        return [int(v) for v in match.group(1).split(",") if v] if match else []


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]

    @cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {instruction.name: instruction for instruction in self.instructions}

    @cached_property
    def root(self) -> Instruction:
        return next((i for i in self.instructions if i.is_root), self.instructions[-1])

    @cached_property
    def users(self) -> dict[str, list[Instruction]]:
        users: dict[str, list[Instruction]] = {}
        for instruction in self.instructions:
            for operand in instruction.operands:
                users.setdefault(operand, []).append(instruction)
        return users

    def parameter(self, index: int) -> Instruction | None:
        return next(
            (i for i in self.instructions if i.opcode == "parameter" and i.operand_text.strip() == str(index)), None
        )


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] in "({[":
            depth += 1
        elif text[index] in ")}]":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced brackets in HLO: {text[start : start + 80]!r}")


def parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    is_root, name, rest = bool(match.group(1)), match.group(2), match.group(3)
    if rest.startswith("("):
        shape_end = _closing(rest, 0) + 1
    else:
        shape_end = 0
        while shape_end < len(rest) and rest[shape_end] != " ":
            shape_end = _closing(rest, shape_end) + 1 if rest[shape_end] in "({[" else shape_end + 1
    shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
    opcode_match = re.match(r"([a-z][\w\-]*)\(", rest)
    if not opcode_match:
        return None
    open_paren = opcode_match.end() - 1
    close_paren = _closing(rest, open_paren)
    operand_text = rest[open_paren + 1 : close_paren]
    return Instruction(
        name,
        shape,
        opcode_match.group(1),
        re.findall(r"%([\w.\-]+)", operand_text),
        operand_text,
        rest[close_paren + 1 :],
        is_root,
    )


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str
    num_partitions: int

    @classmethod
    def parse(cls, text: str) -> "Module":
        computations, entry, current = {}, None, None
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header:
                current = Computation(header.group(2), [])
                computations[current.name] = current
                if header.group(1):
                    entry = current.name
            elif line.startswith("}"):
                current = None
            elif current is not None:
                instruction = parse_instruction(line)
                if instruction is not None:
                    current.instructions.append(instruction)
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        partitions = re.search(r"num_partitions=(\d+)", text)
        return cls(computations, entry, int(partitions.group(1)) if partitions else 1)


def trip_count(module: Module, loop: Instruction, computation: Computation) -> int | None:
    """How many times the `while` instruction `loop` (in `computation`) runs its body; None when
    that depends on data."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
    if known:
        return int(known.group(1))
    return induction_trip_count(module, loop, computation)


def _through_copies(computation: Computation, instruction: Instruction | None) -> Instruction | None:
    while (
        instruction is not None
        and instruction.opcode in ("copy", "bitcast", "reshape", "convert")
        and instruction.operands
    ):
        instruction = computation.by_name.get(instruction.operands[0])
    return instruction


def _constant_value(instruction: Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "constant":
        return None
    try:
        return int(instruction.operand_text.strip())
    except ValueError:
        return None


def _tuple_index(instruction: Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "get-tuple-element":
        return None
    match = re.search(r"\bindex=(\d+)", instruction.attributes)
    return int(match.group(1)) if match else None


def induction_trip_count(module: Module, loop: Instruction, computation: Computation) -> int | None:
    """Trip count of `counter = start; while counter <op> limit: ...; counter += step` with
    constant start, limit and step; None for any other loop."""
    condition = module.computations[loop.called("condition")[0]]
    body = module.computations[loop.called("body")[0]]
    compare = condition.root
    if compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", compare.attributes)
    sides = [_through_copies(condition, condition.by_name.get(name)) for name in compare.operands]
    indices, limits = [_tuple_index(side) for side in sides], [_constant_value(side) for side in sides]
    if indices[0] is not None and limits[1] is not None:
        index, limit, op = indices[0], limits[1], direction.group(1) if direction else ""
    elif indices[1] is not None and limits[0] is not None:
        flipped = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}
        index, limit, op = indices[1], limits[0], flipped.get(direction.group(1) if direction else "", "")
    else:
        return None

    initial = computation.by_name.get(loop.operands[0]) if loop.operands else None
    initial = _through_copies(computation, initial)
    if initial is None or initial.opcode != "tuple" or index >= len(initial.operands):
        return None
    start = _constant_value(_through_copies(computation, computation.by_name.get(initial.operands[index])))

    if body.root.opcode != "tuple" or index >= len(body.root.operands):
        return None
    update = _through_copies(body, body.by_name.get(body.root.operands[index]))
    if update is None or update.opcode != "add" or len(update.operands) != 2:
        return None
    terms = [_through_copies(body, body.by_name.get(name)) for name in update.operands]
    steps = [_constant_value(term) for term in terms]
    counters = [_tuple_index(term) for term in terms]
    if steps[1] is not None and counters[0] == index:
        step = steps[1]
    elif steps[0] is not None and counters[1] == index:
        step = steps[0]
    else:
        return None
    if start is None or not step:
        return None
    if op == "LT" and step > 0:
        return max(0, -(-(limit - start) // step))
    if op == "LE" and step > 0:
        return max(0, -(-(limit - start + 1) // step))
    if op == "GT" and step < 0:
        return max(0, -(-(start - limit) // -step))
    if op == "GE" and step < 0:
        return max(0, -(-(start - limit + 1) // -step))
    return None
